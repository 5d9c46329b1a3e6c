"""train-diffusion: a tiny DiT run through the stage on a synthetic latent cache and a tiny saved MeDUET (real Ray)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from meduet.artifacts.diffusion import load_dit
from meduet.artifacts.pretrained import load_meduet
from meduet.config import ConfigError, MeduetConfig, Paths, TrainDiffusionConfig, config_from_dict
from meduet.data.latents import read_manifest, read_scale
from meduet.engine.checkpoint import read_checkpoint
from meduet.engine.diffusion_training import TERMS, DiffusionBatch, build_trainer, indexed_sampler, validation_crops
from meduet.engine.volume_factors import volume_windows
from meduet.stages import StageError, train_diffusion
from tests.stages.test_factors import _save_tiny_model
from tests.stages.test_pretrain import _write_cache
from tests.stages.trainers import TRAINERS

DIFFUSION = TRAINERS["train-diffusion"]
STEPS = DIFFUSION.steps


def _config(**overrides) -> MeduetConfig:
    params = DIFFUSION.params
    return MeduetConfig.model_validate({**params, "train_diffusion": {**params["train_diffusion"], **overrides}})


@pytest.fixture(scope="module")
def trained(uninterrupted_run):
    """A synthetic latent cache (4 train, 2 held out), a tiny saved MeDUET and the DiT trained on them: the
    session's uninterrupted train-diffusion run (tests/stages/trainers.py), the kill/resume test's reference."""
    root = uninterrupted_run("train-diffusion")
    cfg = _config()
    paths = Paths.resolve(cfg, root)
    return cfg, paths


def test_training_writes_the_model_metrics_and_history(trained) -> None:
    cfg, paths = trained
    rows = (paths.reports / "train_diffusion" / "history.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[0] == "step" and set(TERMS) <= set(header) and len(rows) == 1 + STEPS
    repa = [float(row.split(",")[header.index("repa")]) for row in rows[1:]]
    assert np.mean(repa[-5:]) < np.mean(repa[:5]), repa  # the alignment is learnt
    validated = {int(row.split(",")[0]): row.split(",")[header.index("val_loss")] for row in rows[1:]}
    assert [step for step, value in validated.items() if value] == [10, 20, 30]  # val_every
    assert (paths.reports / "train_diffusion" / "loss.png").stat().st_size > 2000

    metrics = json.loads((paths.reports / "train_diffusion" / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["train_latents"] == 4 and metrics["held_out_latents"] == 2
    assert metrics["init"] == "meduet_repa" and (metrics["init_loaded"], metrics["init_folded"]) == (18, 8)
    assert metrics["init_skipped"] > 0 and metrics["init_kept"] > 0
    for key in ("val_loss", "val_loss_ema"):
        assert math.isfinite(metrics[key]) and 0 < metrics[key] < 2, metrics
    # the curve's last point is the stage's final validation: same crops, noise and weights
    assert float(validated[STEPS]) == pytest.approx(metrics["val_loss"], rel=1e-5)
    assert set(metrics["final"]) == set(TERMS) and metrics["final"]["repa"] > 0

    meduet_file = paths.models / "pretrain" / "meduet.pt"
    for weights in ("ema", "model"):
        model, meta = load_dit(paths.models / "diffusion" / "dit.pt", weights)
        assert model.config.spatial_content and model.config.content_dim == 32 and model.config.style_dim == 8
    assert meta["config"] == cfg.train_diffusion.model_dump(mode="json") and meta["steps"] == STEPS
    assert meta["meduet_sha256"] == hashlib.sha256(meduet_file.read_bytes()).hexdigest()
    assert meta["scale_factor"] == read_scale(paths.latents)
    assert meta["validation"] == {"model": metrics["val_loss"], "ema": metrics["val_loss_ema"]}
    assert len(meta["init_report"]["loaded"]) == 18 and len(meta["init_report"]["skipped"]) == metrics["init_skipped"]
    assert meta["init_report"]["skipped"]["decoder_pred.weight"] == "MAE decoder"


def test_checkpoint_holds_everything_a_resume_needs(trained) -> None:
    _, paths = trained
    latest = max((paths.work / "ray_results").glob("train_diffusion-*/checkpoint_*/state.pt")).parent
    state = read_checkpoint(str(latest))
    assert {"dit", "ema", "projector", "optimizer", "scheduler", "step", "rng"} <= set(state)
    assert state["step"] == STEPS and state["scheduler"]["last_epoch"] == STEPS
    assert not torch.equal(state["dit"]["blocks.0.gates.weight"], state["ema"]["blocks.0.gates.weight"])


def test_batches_depend_on_the_step_alone(trained) -> None:
    cfg, paths = trained
    train = [str(paths.latents / r.latent) for r in read_manifest(paths.latents) if r.split == "train"]
    arch = train_diffusion.architecture(cfg.train_diffusion, train_diffusion.load_meduet(
        paths.models / "pretrain" / "meduet.pt")[0].config)

    def batch(step: int) -> list[torch.Tensor]:
        torch.manual_seed(step + 100)  # the global generator must not matter
        trainer = build_trainer(cfg=cfg.train_diffusion, architecture=arch, meduet_file=str(
            paths.models / "pretrain" / "meduet.pt"), latents=train, scale=read_scale(paths.latents))
        return list(next(iter(trainer.batches(step))))

    again, other = batch(3), batch(4)
    assert cfg.train_diffusion.style_condition == "volume" and again[-1].shape == (4, 8)  # (B, S): the volumes' styles
    for a, b in zip(batch(3), again):
        assert torch.equal(a, b)
    assert not torch.equal(again[0], other[0]) and not torch.equal(again[1], other[1])


def _volume_style(paths: Paths, latent: str) -> torch.Tensor:
    """The teacher style extract-factors stores for a volume (its windows' mean): synthesize's site styles
    average these, so the trainer's volume condition must be the same vector."""
    teacher = load_meduet(paths.models / "pretrain" / "meduet.pt", "teacher")[0]
    _, style, _ = volume_windows(teacher, np.load(latent), read_scale(paths.latents), np.eye(4), 4)
    return style.mean(dim=0)


def test_volume_style_condition_gives_every_crop_its_volumes_pooled_style(trained) -> None:
    cfg, paths = trained
    records = read_manifest(paths.latents)
    train = [str(paths.latents / r.latent) for r in records if r.split == "train"]
    held_out = [str(paths.latents / r.latent) for r in records if r.split == "held_out"]
    meduet_file = paths.models / "pretrain" / "meduet.pt"
    arch = train_diffusion.architecture(cfg.train_diffusion, load_meduet(meduet_file)[0].config)
    section = cfg.train_diffusion.model_copy(update={"batch_size": 8})  # style_condition: volume, the default
    own = section.model_copy(update={"style_condition": "crop"})
    scale = read_scale(paths.latents)

    def first_batch(section) -> DiffusionBatch:
        trainer = build_trainer(cfg=section, architecture=arch, meduet_file=str(meduet_file), latents=train,
                                scale=scale)
        return next(iter(trainer.batches(3)))

    by_volume, by_crop = first_batch(section), first_batch(own)
    assert torch.equal(by_volume.x0, by_crop.x0) and torch.equal(by_volume.noise, by_crop.noise)  # same draws
    assert by_crop.style is None  # each crop's own style, from the teacher in the loss
    _, volume = indexed_sampler(train, arch.input_size[0], scale, section.seed).batch(3, 8)
    assert len(set(volume.tolist())) > 1  # crops of several volumes, each with its own volume's style
    for row, index in enumerate(volume.tolist()):
        torch.testing.assert_close(by_volume.style[row], _volume_style(paths, train[index]), rtol=1e-5, atol=1e-6)

    teacher = load_meduet(meduet_file, "teacher")[0]
    crops, styles = validation_crops(section, teacher, held_out, arch.input_size[0], scale)
    assert validation_crops(own, None, held_out, arch.input_size[0], scale)[1] is None
    assert torch.equal(crops, validation_crops(own, None, held_out, arch.input_size[0], scale)[0])
    _, volume = indexed_sampler(held_out, arch.input_size[0], scale, section.seed).batch(0, section.val_crops)
    for row, index in enumerate(volume.tolist()):
        torch.testing.assert_close(styles[row], _volume_style(paths, held_out[index]), rtol=1e-5, atol=1e-6)


def test_missing_model_and_misaligned_preset_are_clear_errors(tmp_path: Path) -> None:
    cfg = _config()
    paths = Paths.resolve(cfg, tmp_path)
    with pytest.raises(StageError, match="run the encode-latents stage first"):
        train_diffusion.run(cfg.train_diffusion, paths, ray=cfg.ray)
    _write_cache(paths.latents)
    with pytest.raises(StageError, match="run the pretrain stage first"):
        train_diffusion.run(cfg.train_diffusion, paths, ray=cfg.ray)
    _save_tiny_model(paths, ["site_a", "site_b"], read_scale(paths.latents))
    small = _config(preset="small", crop=16)
    with pytest.raises(StageError, match="their tokens must align"):
        train_diffusion.run(small.train_diffusion, paths, ray=small.ray)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"crop": 16}, "must equal preset 'tiny''s input size"),
    ({"preset": "base"}, "must equal preset 'base''s input size"),
    ({"repa_layer": 3}, "exceeds preset 'tiny''s depth 2"),
    ({"objective": "edm"}, "train_diffusion.objective"),
    ({"cond_drop": 1.0}, "train_diffusion.cond_drop"),
])
def test_invalid_sections_are_named(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"train_diffusion": overrides})


def test_params_yaml_section_validates_and_repa_layer_defaults_to_a_third_of_the_depth() -> None:
    params = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    section = TrainDiffusionConfig.model_validate(params["train_diffusion"])
    assert section.preset == "tiny" and section.cond_drop == 0.2 and section.repa_weight == 0.5
    assert TrainDiffusionConfig(preset="base", crop=24).repa_block == 4
    assert TrainDiffusionConfig(repa_layer=2).repa_block == 2
