"""pretrain: a tiny MeDUET pretraining run through the stage on a synthetic latent cache (a real local Ray)."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from meduet.config import ConfigError, MeduetConfig, Paths, PretrainConfig, config_from_dict
from meduet.data.latents import LatentRecord, save_array, write_manifest, write_scale
from meduet.engine.checkpoint import read_checkpoint
from meduet.engine.pretrain_training import TERMS, param_groups
from meduet.models.architectures import MeduetArchitecture
from meduet.models.meduet import PRESETS, MeduetModel
from meduet.stages import StageError, pretrain

STEPS = 30


def _write_cache(root: Path, domains: tuple[str, ...] = ("site_a", "site_b"), per_domain: int = 2) -> Path:
    """``(4, 12, 12, 12)`` latents: smooth shared anatomy, a per-site offset and gain (the 'style')."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(0, np.pi, 12)] * 3, indexing="ij"))  # (3, 12, 12, 12)
    records, arrays = [], []
    for index, domain in enumerate(domains):
        for case in range(per_domain):
            phase = rng.uniform(0, np.pi, size=(4, 3))
            content = np.stack([np.sin(grid[0] + p[0]) * np.cos(grid[1] + p[1]) + np.sin(grid[2] + p[2])
                                for p in phase])
            latent = ((1 + 0.5 * index) * content + index).astype(np.float32)
            key = f"{domain}__case{case}"
            save_array(root / "latents" / f"{key}.npy", latent)
            arrays.append(latent)
            records.append(LatentRecord(
                key=key, dataset=domain, case_id=f"case{case}", domain=domain, domain_index=index, body_part="x",
                split="train" if case < per_domain - 1 or per_domain == 1 else "held_out",
                latent=f"latents/{key}.npy", latent_shape=list(latent.shape), affine=list(np.eye(4).ravel()),
                orig_spacing=[1.0, 1.0, 1.0], image_sha256="0", vae_sha256="0"))
    write_manifest(root, records)
    write_scale(root, arrays)
    return root


def _config(**pretrain_overrides) -> MeduetConfig:
    return MeduetConfig.model_validate({
        "pretrain": {"steps": STEPS, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "log_every": 1,
                     "mftd_start_fraction": 0.0, **pretrain_overrides},
        "ray": {"checkpoint_every": 10, "keep_checkpoints": 5, "local_num_cpus": 2, "max_failures": 0},
    })


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pretrain_project")
    cfg = _config(method={"recipe": "faithful"})  # the authors' terms; the improved recipe: test_reproducible
    paths = Paths.resolve(cfg, root)
    _write_cache(paths.latents, per_domain=3)
    return cfg, paths, pretrain.run(cfg.pretrain, paths, ray=cfg.ray)


def _checkpoints(paths: Paths) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in (paths.work / "ray_results").glob("pretrain-*/checkpoint_*/state.pt")}


def test_pretraining_lowers_the_loss_and_writes_every_output(pretrained):
    cfg, paths, result = pretrained
    history = (paths.reports / "pretrain" / "history.csv").read_text().splitlines()
    header = history[0].split(",")
    assert header[0] == "step" and set(TERMS) | {"lr", "momentum"} <= set(header) and len(history) == 1 + STEPS
    # Every term the encoder minimises goes down; the content site loss is adversarial (the
    # encoder ascends it through the gradient reversal), so it has no direction to assert.
    for term in ("total", "rec", "domain_style", "mftd", "siqc"):
        values = [float(row.split(",")[header.index(term)]) for row in history[1:]]
        assert np.mean(values[-5:]) < np.mean(values[:5]), (term, values)
    assert (paths.reports / "pretrain" / "loss.png").stat().st_size > 2000

    metrics = result.metrics
    assert metrics["steps"] == STEPS and metrics["domains"] == ["site_a", "site_b"] and metrics["train_latents"] == 4
    assert set(metrics["final"]) == set(TERMS) and metrics["final"]["mftd"] > 0 and metrics["final"]["siqc"] > 0
    assert (paths.reports / "pretrain" / "metrics.json").is_file()

    saved = torch.load(paths.models / "pretrain" / "meduet.pt", weights_only=True)
    assert saved["domains"] == ["site_a", "site_b"] and saved["config"] == cfg.pretrain.model_dump(mode="json")
    assert saved["architecture"]["num_domains"] == 2 and saved["steps"] == STEPS
    for which in ("student", "teacher"):
        model = MeduetModel(MeduetArchitecture.from_dict(saved["architecture"]))
        model.load_state_dict(saved[which])
    student, teacher = saved["student"], saved["teacher"]
    assert not torch.equal(student["blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"])  # EMA lags


def test_checkpoint_holds_everything_a_resume_needs(pretrained):
    _, paths, _ = pretrained
    latest = max(_checkpoints(paths)).parent
    state = read_checkpoint(str(latest))
    assert {"student", "teacher", "optimizer", "scheduler", "step", "rng"} <= set(state)
    assert state["step"] == STEPS and state["scheduler"]["last_epoch"] == STEPS
    assert "logit_scale_content" in state["student"]  # SiQC temperatures travel with the model
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [1e-2, 0.0]


def test_rerun_of_a_finished_run_resumes_without_redoing_steps(pretrained):
    cfg, paths, first = pretrained
    before = _checkpoints(paths)
    history = (paths.reports / "pretrain" / "history.csv").read_text()
    again = pretrain.run(cfg.pretrain, paths, ray=cfg.ray)
    assert _checkpoints(paths) == before  # no step ran again, so no checkpoint was rewritten
    assert again.metrics == first.metrics
    assert (paths.reports / "pretrain" / "history.csv").read_text() == history


def test_param_groups_keep_norms_biases_and_tokens_out_of_weight_decay():
    model = MeduetModel(PRESETS["tiny"])
    decay, no_decay = param_groups(model, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert {"cls_token", "mask_token", "norm.weight", "norm.bias", "blocks.0.norm1.weight",
            "blocks.0.attn.qkv.bias", "decoder_pred.bias"} <= set(no_decay["names"])
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "decoder_pred.weight"} <= set(decay["names"])
    assert all(p.ndim >= 2 for p in decay["params"])
    assert "logit_scale_content" not in decay["names"] + no_decay["names"]  # frozen unless learnable
    learnable = MeduetModel(dataclasses.replace(PRESETS["tiny"], learnable_logit_scale=True))
    assert "logit_scale_content" in param_groups(learnable, 0.05)[1]["names"]


def test_missing_cache_and_single_site_are_clear_errors(tmp_path):
    cfg = _config()
    paths = Paths.resolve(cfg, tmp_path)
    with pytest.raises(StageError, match="run the encode-latents stage first"):
        pretrain.run(cfg.pretrain, paths, ray=cfg.ray)
    _write_cache(paths.latents, domains=("site_a",))
    with pytest.raises(StageError, match="at least 2 sites"):
        pretrain.run(cfg.pretrain, paths, ray=cfg.ray)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"batch_size": 3}, "must be even"),
    ({"crop": 16}, "must equal preset 'tiny''s input size"),
    ({"preset": "base"}, "must equal preset 'base''s input size"),
    ({"mask_ratio": 0.25}, "use_siqc needs mask_ratio 0.5"),
    ({"ema_start": 0.9999}, "must not exceed ema_end"),
    ({"learnable_logit_scale": True, "use_siqc": False}, "learnable_logit_scale needs use_siqc"),
    ({"weights": {"domain": 0.2, "typo": 1}}, "pretrain.weights.typo: unknown key"),
])
def test_invalid_pretrain_sections_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"pretrain": overrides})


def test_params_yaml_pretrain_section_validates():
    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    assert PretrainConfig.model_validate(params["pretrain"]).preset == "tiny"


def test_run_key_changes_with_config_data_scaling_and_code(tmp_path, monkeypatch):
    from meduet.engine import runs

    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("key\ncase0\n")
    monkeypatch.setattr(runs, "PACKAGE_ROOT", package)
    key = runs.run_key("cfg1", manifest)
    assert key == runs.run_key("cfg1", manifest) and len(key) == 16
    assert runs.run_key("cfg2", manifest) != key
    (package / "a.py").write_text("x = 2\n")  # a code change: the old run's weights no longer apply
    changed_code = runs.run_key("cfg1", manifest)
    assert changed_code != key
    manifest.write_text("key\ncase1\n")
    new_data = runs.run_key("cfg1", manifest)
    assert new_data != changed_code
    # Another worker count or device changes each step's batch and numerics: another run,
    # so a rerun with ray.num_workers changed never returns the old run's weights.
    one, two = runs.Scaling(num_workers=1), runs.Scaling(num_workers=2, cpus_per_worker=0.5)
    keys = {runs.run_key("cfg1", manifest, one), runs.run_key("cfg1", manifest, two),
            runs.run_key("cfg1", manifest, runs.Scaling(num_workers=1, use_gpu=True)), new_data}
    assert len(keys) == 4
    assert runs.run_key("cfg1", manifest, runs.Scaling(num_workers=1, cpus_per_worker=2.0)) == \
        runs.run_key("cfg1", manifest, one)  # resources per worker do not change what is computed


def test_mae_section_is_pretrain_with_its_own_keys_changed():
    cfg = config_from_dict({"pretrain": {"steps": 7, "lr": 2e-3, "method": {"recipe": "faithful"}},
                            "pretrain_mae": {"lr": 5e-4, "method": {"crops_per_volume": 2}}})
    mae = cfg.pretrain_mae
    assert (mae.objective, mae.steps, mae.lr) == ("mae", 7, 5e-4)
    assert (mae.method.recipe, mae.method.crops_per_volume) == ("faithful", 2)  # nested keys merged one by one
    assert cfg.pretrain.objective == "meduet" and cfg.pretrain.lr == 2e-3
    assert config_from_dict({}).pretrain_mae.objective == "mae"
    with pytest.raises(ConfigError, match="pretrain.objective must be meduet"):
        config_from_dict({"pretrain": {"objective": "mae"}})
    with pytest.raises(ConfigError, match="pretrain_mae.objective must be mae"):
        config_from_dict({"pretrain_mae": {"objective": "meduet"}})


def test_mae_baseline_stage_trains_the_same_network_into_its_own_folder(tmp_path):
    cfg = _config()
    paths = Paths.resolve(cfg, tmp_path)
    _write_cache(paths.latents, per_domain=3)
    result = pretrain.run(cfg.pretrain_mae, paths, ray=cfg.ray)
    assert not (paths.models / "pretrain").exists() and not (paths.reports / "pretrain").exists()
    history = (paths.reports / "pretrain_mae" / "history.csv").read_text().splitlines()
    header = history[0].split(",")
    rec = [float(row.split(",")[header.index("rec")]) for row in history[1:]]
    assert len(rec) == STEPS and np.mean(rec[-5:]) < np.mean(rec[:5])
    for term in ("domain_content", "domain_style", "mftd", "siqc", "clean_content"):
        assert result.metrics["final"][term] == 0.0
    saved = torch.load(paths.models / "pretrain_mae" / "meduet.pt", weights_only=True)
    assert saved["config"]["objective"] == "mae"
    meduet = MeduetModel(MeduetArchitecture.from_dict(saved["architecture"]))
    meduet.load_state_dict(saved["teacher"])  # the same network: a fine-tuning init like MeDUET's
