"""The diffusion trainer's parts: the loss falls on a tiny overfit, the validation loss's known answer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from meduet.config import TrainDiffusionConfig
from meduet.data.latent_crops import step_generator
from meduet.diffusion import build_process
from meduet.diffusion.repa import RepaProjector
from meduet.engine.diffusion_training import (
    DiffusionBatch,
    DiffusionObjective,
    diffusion_trainer,
    teacher_factors,
    validation_loss,
)
from meduet.engine.ema import build_teacher
from meduet.engine.loop import optimizer_step
from meduet.models.architectures import MEDUET_PRESETS
from meduet.models.dit import PRESETS, ConditionedDiT
from meduet.models.meduet import MeduetModel

STEPS = 80


def _teacher() -> MeduetModel:
    torch.manual_seed(0)
    return MeduetModel(MEDUET_PRESETS["tiny"]).eval().requires_grad_(False)


@pytest.mark.parametrize(("objective", "spatial", "init"), [("ddpm", True, "meduet_repa"), ("rflow", False, "scratch")])
def test_losses_fall_when_overfitting_one_batch(objective: str, spatial: bool, init: str) -> None:
    cfg = TrainDiffusionConfig(objective=objective, spatial_content=spatial, init=init, steps=STEPS, lr=3e-3,
                               warmup_steps=0, batch_size=4, ema_decay=0.5)
    teacher = _teacher()
    arch = dataclasses.replace(PRESETS["tiny"], spatial_content=spatial)
    torch.manual_seed(1)
    dit = ConditionedDiT(arch)
    projector = RepaProjector(dim=arch.hidden_size, target_dim=arch.content_dim) if init == "meduet_repa" else None
    process = build_process(objective)
    objective_module = DiffusionObjective(dit, process, projector=projector, repa_layer=1, repa_weight=0.5)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 4, 8, 8, 8, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = process.sample_time(4, gen)
    kept = torch.zeros(4, dtype=torch.bool)
    batch = (x0, noise, t, kept, kept, kept)  # the same draws every step: a pure overfit
    ema = build_teacher(dit)
    trainer = diffusion_trainer(cfg=cfg, objective=objective_module, teacher=teacher, ema=ema,
                                batches=lambda step: [batch], device=torch.device("cpu"))
    history = []
    for step in range(STEPS):
        history.append({k: v.item() for k, v in optimizer_step(trainer, trainer.batches(step)).items()})
        trainer.scheduler.step()
        trainer.after_step(step)
    first, last = history[0], history[-1]
    assert last["diffusion"] < 0.5 * first["diffusion"], (first, last)
    if projector is not None:
        assert 0 < last["repa"] < 0.5 * first["repa"] and last["total"] == pytest.approx(
            last["diffusion"] + 0.5 * last["repa"], rel=1e-5)
    else:
        assert last["repa"] == 0.0 and last["total"] == last["diffusion"]
    assert not torch.equal(ema.blocks[0].gates.weight, torch.zeros_like(ema.blocks[0].gates.weight))  # EMA moved
    assert set(trainer.checkpointed) == {"dit", "ema", "optimizer", "scheduler"} | (
        {"projector"} if projector is not None else set())


class _RecordingObjective(DiffusionObjective):
    """The objective, keeping the style each call conditions on."""

    def forward(self, *args: torch.Tensor) -> dict[str, torch.Tensor]:
        self.style = args[5]
        return super().forward(*args)


def test_a_batchs_style_replaces_the_crops_own_and_moves_the_loss() -> None:
    teacher = _teacher()
    torch.manual_seed(1)
    dit = ConditionedDiT(PRESETS["tiny"])
    for layer in (dit.final.modulation, dit.final.linear):  # leave adaLN-Zero's start: the condition matters
        torch.nn.init.normal_(layer.weight, std=0.5)
    objective = _RecordingObjective(dit, build_process("rflow"))
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 4, 8, 8, 8, generator=gen)
    kept = torch.zeros(4, dtype=torch.bool)
    own = DiffusionBatch(x0, torch.randn(x0.shape, generator=gen), torch.rand(4, generator=gen), kept, kept, kept)
    given = own._replace(style=torch.randn(4, PRESETS["tiny"].style_dim, generator=gen))
    trainer = diffusion_trainer(cfg=TrainDiffusionConfig(steps=1, warmup_steps=0), objective=objective,
                                teacher=teacher, ema=build_teacher(dit), batches=lambda step: [],
                                device=torch.device("cpu"))
    with torch.no_grad():
        loss_own = trainer.loss(tuple(own[:6]))["diffusion"]  # a plain 6-tuple: the crop's own style
        torch.testing.assert_close(objective.style, teacher_factors(teacher, x0)[2])
        loss_given = trainer.loss(given)["diffusion"]
    assert torch.equal(objective.style, given.style) and loss_given != loss_own


@pytest.mark.parametrize("objective", ["ddpm", "rflow"])
def test_validation_loss_of_a_fresh_model_is_the_targets_mean_square(objective: str) -> None:
    teacher = _teacher()
    process = build_process(objective)
    crops = torch.randn(6, 4, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    dit = ConditionedDiT(PRESETS["tiny"]).eval()  # predicts exactly 0 (adaLN-Zero)
    got = validation_loss(dit, teacher, process, crops, seed=0, batch_size=4)
    assert got == validation_loss(dit, teacher, process, crops, seed=0, batch_size=6)  # fixed draws
    assert got != validation_loss(dit, teacher, process, crops, seed=1)
    noise = torch.randn(crops.shape, generator=step_generator(0, 0, 0, 2))
    target = noise if objective == "ddpm" else noise - crops
    assert got == pytest.approx(target.pow(2).mean().item(), rel=1e-5)


def test_teacher_factors_are_token_means() -> None:
    teacher = _teacher()
    x0 = torch.randn(3, 4, 8, 8, 8)
    tokens, content, style = teacher_factors(teacher, x0)
    content_tokens, style_tokens, _ = teacher.encode_full(x0)
    assert tokens.shape == (3, MEDUET_PRESETS["tiny"].num_tokens, MEDUET_PRESETS["tiny"].embed_dim)
    torch.testing.assert_close(content, content_tokens.mean(1))
    torch.testing.assert_close(style, style_tokens.mean(1))
    assert not tokens.requires_grad
