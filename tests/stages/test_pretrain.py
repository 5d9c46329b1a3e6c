"""pretrain: a tiny MeDUET pretraining run through the stage on a synthetic latent cache (a real local Ray)."""

import contextlib
import csv
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from meduet import distributed as dist
from meduet.config import ConfigError, MeduetConfig, Paths, PretrainConfig, config_from_dict
from meduet.data.latents import LatentRecord, save_array, write_manifest, write_scale
from meduet.engine.pretrain_step import param_groups
from meduet.engine.pretrain_training import TERMS, build_model
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
    cfg = _config()
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
    assert saved["model_config"]["num_domains"] == 2 and saved["steps"] == STEPS
    for which in ("student", "teacher"):
        model = build_model(saved["model_config"])
        model.load_state_dict(saved[which])
    student, teacher = saved["student"], saved["teacher"]
    assert not torch.equal(student["blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"])  # EMA lags


def test_checkpoint_holds_everything_a_resume_needs(pretrained):
    _, paths, _ = pretrained
    latest = max(_checkpoints(paths)).parent
    state = dist.read_checkpoint(str(latest))
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


def _history(paths: Paths) -> list[dict[str, float]]:
    with open(paths.reports / "pretrain" / "history.csv", newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(fh)]


def _kill_session(session: int) -> None:
    """SIGKILL every live process of ``session`` (Ray's processes may sit in other process groups)."""
    for _ in range(100):
        listing = subprocess.run(["ps", "-o", "pid=,stat=", "-s", str(session)], capture_output=True, text=True)
        alive = [int(pid) for pid, stat in (line.split() for line in listing.stdout.splitlines()) if "Z" not in stat]
        if not alive:
            return
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise AssertionError(f"processes of session {session} survive SIGKILL: {alive}")


@pytest.mark.services
def test_killed_pretraining_resumes_at_its_last_checkpoint_and_ends_like_an_uninterrupted_run(tmp_path):
    steps = 40  # 4 checkpoints, all kept
    cfg = _config(steps=steps)
    reference = Paths.resolve(cfg, tmp_path / "reference")
    _write_cache(reference.latents, per_domain=3)
    pretrain.run(cfg.pretrain, reference, ray=cfg.ray)

    root = tmp_path / "killed"
    paths = Paths.resolve(cfg, root)
    _write_cache(paths.latents, per_domain=3)
    (root / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    command = [sys.executable, "-m", "meduet.cli", "pretrain", "--params", str(root / "params.yaml")]
    repo = Path(__file__).resolve().parents[2]
    # SIGKILL of the whole process group (driver, local Ray, worker) once a checkpoint exists:
    # nothing gets to clean up, as when a node dies.
    process = subprocess.Popen(command, cwd=repo, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        while not _checkpoints(paths) and process.poll() is None:
            time.sleep(0.02)
    finally:
        _kill_session(process.pid)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    before = _checkpoints(paths)
    kept = {int(p.parent.name.split("_")[1]) for p in before}
    assert kept and max(kept) < steps
    assert not (paths.models / "pretrain" / "meduet.pt").exists()

    resumed = subprocess.run(command, cwd=repo, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _history(paths)
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))  # no step lost, none repeated
    after = _checkpoints(paths)
    assert all(after[p] == mtime for p, mtime in before.items())  # resumed: checkpoints up to the kill not redone
    assert len(after) == steps // 10
    for got, want in zip(rows, _history(reference), strict=True):
        assert got["total"] == pytest.approx(want["total"], rel=1e-4), got["step"]
    got = torch.load(paths.models / "pretrain" / "meduet.pt", weights_only=True)
    want = torch.load(reference.models / "pretrain" / "meduet.pt", weights_only=True)
    for which in ("student", "teacher"):
        for key, value in want[which].items():
            torch.testing.assert_close(got[which][key], value, rtol=1e-4, atol=1e-5, msg=f"{which}.{key}")


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


def test_run_key_changes_with_config_data_and_code(tmp_path, monkeypatch):
    from meduet import stages

    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("key\ncase0\n")
    monkeypatch.setattr(stages, "PACKAGE_ROOT", package)
    key = stages.run_key("cfg1", manifest)
    assert key == stages.run_key("cfg1", manifest) and len(key) == 16
    assert stages.run_key("cfg2", manifest) != key
    (package / "a.py").write_text("x = 2\n")  # a code change: the old run's weights no longer apply
    changed_code = stages.run_key("cfg1", manifest)
    assert changed_code != key
    manifest.write_text("key\ncase1\n")
    assert stages.run_key("cfg1", manifest) != changed_code
