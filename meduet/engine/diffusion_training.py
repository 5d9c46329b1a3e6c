"""The latent-diffusion trainer: its parts for the shared loop (``meduet.engine.loop``).

Per micro-batch: random crops of the train split's latents (``LatentCropSampler``); the frozen
MeDUET teacher encodes each clean crop into content tokens, pooled content and pooled style
(token means, as ``extract-factors`` pools them); with ``style_condition: volume`` the crop's
style is replaced by its whole volume's (the window mean ``synthesize``'s site styles are made
of, computed once per volume before training); noise, timesteps and condition drops come
from a second step-indexed stream. Everything is drawn from ``(seed, index, rank)``, so a
resumed run sees exactly the batches of an uninterrupted one. The DiT regresses the process's
target (``ε`` for DDPM, the velocity for rectified flow); with ``meduet_repa`` an intermediate
block's tokens are also aligned with the teacher's content tokens. After each optimizer step
the EMA of the DiT follows (``after_step``).

The DiT (and REPA's projector) go through ``dist.prepare_model`` wrapped in
``DiffusionObjective``; the teacher and the EMA stay outside DDP (never trained; every rank
applies the same EMA update to the same weights).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from meduet import distributed as dist
from meduet.artifacts.pretrained import load_meduet
from meduet.config import TrainDiffusionConfig
from meduet.data.latent_crops import LatentCropSampler, step_generator
from meduet.diffusion import Process, build_process
from meduet.diffusion.guidance import condition_drops
from meduet.diffusion.repa import RepaProjector, repa_loss
from meduet.engine.ema import build_teacher, ema_update
from meduet.engine.loop import Trainer
from meduet.engine.optim import adamw
from meduet.engine.precision import amp_dtype
from meduet.engine.schedules import warmup_cosine
from meduet.engine.volume_factors import pooled_factors
from meduet.models.architectures import DiTArchitecture
from meduet.models.dit import ConditionedDiT
from meduet.models.dit_init import init_from_meduet
from meduet.models.meduet import MeduetModel

TERMS = ("diffusion", "repa", "total")
_NOISE_STREAM = 1  # generator stream of noise, timesteps and drops (stream 0 = the crops)
_VALIDATION_STREAM = 2


class DiffusionBatch(NamedTuple):
    """One micro-batch (a plain 6-tuple of the first fields is one too)."""

    x0: torch.Tensor  # clean latents (B, C, d, h, w)
    noise: torch.Tensor  # like x0
    t: torch.Tensor  # timesteps (B,)
    drop_content: torch.Tensor  # (B,) bool, each
    drop_style: torch.Tensor
    drop_tokens: torch.Tensor
    style: torch.Tensor | None = None  # (B, S): the style to condition on; None: each crop's own


@torch.no_grad()
def teacher_factors(teacher: MeduetModel, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MeDUET's conditioning of clean latents ``x0 (B, C, d, h, w)``.

    Returns:
        content tokens ``(B, N, E)``, content ``(B, E)`` and style ``(B, S)`` (token means).
    """
    tokens, style, _ = teacher.encode_full(x0)  # (B, N, E), (B, N, S)
    return tokens, tokens.mean(dim=1), style.mean(dim=1)


class DiffusionObjective(nn.Module):
    """The DiT, REPA's projector and the diffusion loss as one ``forward`` (so DDP can wrap them).

    Args:
        dit: the trained ``ConditionedDiT``.
        process: ``DDPM`` or ``RectifiedFlow`` (``meduet.diffusion.build_process``).
        projector: REPA's projector, or ``None`` (no alignment).
        repa_layer: 1-based DiT block whose tokens REPA aligns.
        repa_weight: weight of the REPA term in ``total``.
    """

    def __init__(self, dit: ConditionedDiT, process: Process, *, projector: RepaProjector | None = None,
                 repa_layer: int = 1, repa_weight: float = 0.0) -> None:
        super().__init__()
        self.dit, self.process, self.projector = dit, process, projector
        self.repa_layer, self.repa_weight = repa_layer, repa_weight

    def forward(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor,
                content: torch.Tensor, style: torch.Tensor, drop_content: torch.Tensor, drop_style: torch.Tensor,
                drop_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms for clean latents ``x0 (B, C, d, h, w)``, ``noise`` like it, ``t (B,)``, the teacher's
        ``tokens (B, N, E)``, ``content (B, E)``, ``style (B, S)`` and drops ``(B,)`` bool each."""
        x_t, target = self.process.corrupt(x0, t, noise)
        spatial = self.dit.config.spatial_content
        pred, hidden = self.dit.forward_features(
            x_t, self.process.model_time(t), content, style, tokens if spatial else None, drop_content=drop_content,
            drop_style=drop_style, drop_tokens=drop_tokens if spatial else None,
            layer=self.repa_layer if self.projector is not None else None)
        diffusion = F.mse_loss(pred.float(), target.float())
        if self.projector is None:
            return {"diffusion": diffusion, "repa": diffusion.new_zeros(()), "total": diffusion}
        repa = repa_loss(self.projector(hidden), tokens)
        return {"diffusion": diffusion, "repa": repa, "total": diffusion + self.repa_weight * repa}


def diffusion_trainer(*, cfg: TrainDiffusionConfig, objective: nn.Module, teacher: MeduetModel, ema: ConditionedDiT,
                      batches: Callable[[int], Iterable[DiffusionBatch]], device: torch.device,
                      validate: Callable[[], float] | None = None) -> Trainer:
    """The loop's parts around a built objective, teacher and EMA.

    Shared by :func:`build_trainer` and ``benchmarks/diffusion_step.py``, so the benchmark
    times the step the pipeline runs. ``validate``: the held-out loss of the current weights,
    added to the history as ``val_loss`` every ``cfg.val_every`` steps (the convergence curve).
    """
    inner = dist.unwrap(objective)
    optimizer = adamw(inner.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps))

    def loss(batch: DiffusionBatch) -> dict[str, torch.Tensor]:
        b = DiffusionBatch(*batch)
        tokens, content, style = teacher_factors(teacher, b.x0)  # before the DiT's forward: no stacked temporaries
        return objective(b.x0, b.noise, b.t, tokens, content, style if b.style is None else b.style, b.drop_content,
                         b.drop_style, b.drop_tokens)

    def update_ema(step: int) -> dict[str, float]:
        ema_update(ema, inner.dit, cfg.ema_decay)
        if validate is not None and cfg.val_every and (step + 1) % cfg.val_every == 0:
            return {"val_loss": validate()}
        return {}

    checkpointed = {"dit": inner.dit, "ema": ema, "optimizer": optimizer, "scheduler": scheduler}
    if inner.projector is not None:
        checkpointed["projector"] = inner.projector
    return Trainer(checkpointed=checkpointed, optimizer=optimizer, scheduler=scheduler, loss=loss, batches=batches,
                   terms=TERMS, device=device, accumulation=cfg.grad_accumulation, grad_clip=cfg.grad_clip,
                   amp_dtype=amp_dtype(device, amp=cfg.amp, cpu_bf16=cfg.cpu_bf16), after_step=update_ema)


def build_dit(cfg: TrainDiffusionConfig, architecture: DiTArchitecture, teacher: MeduetModel) -> ConditionedDiT:
    """A fresh DiT, initialised from the teacher's encoder unless ``init`` is ``scratch``."""
    dit = ConditionedDiT(architecture)
    if cfg.init != "scratch":
        init_from_meduet(dit, teacher.state_dict())  # the stage reports what maps (plan_meduet_init)
    return dit


@torch.no_grad()
def volume_styles(teacher: MeduetModel, sampler: LatentCropSampler, batch_size: int = 16) -> torch.Tensor:
    """``(V, S)``: the teacher style of each of ``sampler``'s whole latents (the mean over its windows)."""
    return torch.stack([torch.from_numpy(pooled_factors(teacher, array, sampler.scale, batch_size)[1])
                        for array in sampler.arrays])


def indexed_sampler(latents: list[str], crop: int, scale: float, seed: int) -> LatentCropSampler:
    """Crops of ``latents`` labelled with their volume's index (so a crop's volume style can be looked up)."""
    return LatentCropSampler([Path(p) for p in latents], list(range(len(latents))), crop, scale, seed)


def build_trainer(*, cfg: TrainDiffusionConfig, architecture: DiTArchitecture, meduet_file: str, latents: list[str],
                  scale: float, val_latents: list[str] | None = None) -> Trainer:
    """The conditioned DiT trained on crops of the latent cache.

    Args:
        architecture: the DiT's shape (content and style widths of the teacher).
        meduet_file: the pretrained MeDUET file; its EMA teacher conditions (and initialises).
        latents: ``.npy`` files of the training latents.
        scale: the latent cache's scale factor.
        val_latents: ``.npy`` files of the held-out latents: with ``cfg.val_every``, their
            ``cfg.val_crops`` validation crops (the stage's final ones) are scored during training.
    """
    device = dist.device()
    teacher = load_meduet(Path(meduet_file), "teacher")[0].requires_grad_(False).to(device)
    dit = build_dit(cfg, architecture, teacher)
    ema = build_teacher(dit).to(device)  # starts equal to the (initialised) DiT
    projector = RepaProjector(dim=architecture.hidden_size, target_dim=architecture.content_dim) \
        if cfg.init == "meduet_repa" else None
    process = build_process(cfg.objective, flow_time=cfg.flow_time)
    objective = dist.prepare_model(DiffusionObjective(dit, process, projector=projector, repa_layer=cfg.repa_block,
                                                      repa_weight=cfg.repa_weight))
    sampler = indexed_sampler(latents, architecture.input_size[0], scale, cfg.seed)
    styles = volume_styles(teacher, sampler) if cfg.style_condition == "volume" else None  # (V, S)
    rank = dist.world_rank()

    def batches(step: int) -> Iterable[DiffusionBatch]:
        for micro in range(cfg.grad_accumulation):
            index = step * cfg.grad_accumulation + micro  # micro-batch index: resumable, like the step
            x0, volume = sampler.batch(index, cfg.batch_size, rank)  # (B, C, d, h, w), (B,)
            gen = step_generator(cfg.seed, index, rank, _NOISE_STREAM)
            noise = torch.randn(x0.shape, generator=gen)
            t = process.sample_time(cfg.batch_size, gen)
            drops = condition_drops(cfg.batch_size, cfg.cond_drop, gen)
            yield DiffusionBatch(*(v.to(device) for v in (x0, noise, t, drops.content, drops.style, drops.tokens)),
                                 style=None if styles is None else styles[volume].to(device))

    validate = None
    if val_latents and cfg.val_every and cfg.val_crops:
        crops, val_styles = validation_crops(cfg, teacher, val_latents, architecture.input_size[0], scale)

        def validate() -> float:
            # its own noise stream and eval mode for the pass only: the training run is unchanged
            model = dist.unwrap(objective).dit
            try:
                return validation_loss(model.eval(), teacher, process, crops.to(device), seed=cfg.seed,
                                       styles=val_styles)
            finally:
                model.train()

    return diffusion_trainer(cfg=cfg, objective=objective, teacher=teacher, ema=ema, batches=batches, device=device,
                             validate=validate)


def validation_crops(cfg: TrainDiffusionConfig, teacher: MeduetModel, latents: list[str], crop: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fixed held-out crops ``(n, C, d, h, w)`` of the validation loss and, with ``style_condition:
    volume``, their volumes' styles ``(n, S)`` (else ``None``: each crop's own)."""
    sampler = indexed_sampler(latents, crop, scale, cfg.seed)
    crops, volume = sampler.batch(0, cfg.val_crops)
    if cfg.style_condition == "crop":
        return crops, None
    return crops, volume_styles(teacher, sampler)[volume]


@torch.no_grad()
def validation_loss(dit: ConditionedDiT, teacher: MeduetModel, process: Process, crops: torch.Tensor, *, seed: int,
                    batch_size: int = 16, styles: torch.Tensor | None = None) -> float:
    """Mean diffusion loss on fixed crops with fixed noise and timesteps, every condition kept.

    The timesteps are the process's evenly spread grid (shuffled over the crops), so the loss
    weighs all noise levels alike and two runs (other inits, objectives' own scale aside)
    are compared on the same draws.

    Args:
        crops: ``(n, C, d, h, w)`` scaled clean latents (held-out crops).
        seed: fixes noise and the timestep order.
        styles: ``(n, S)`` the style each crop is conditioned on; ``None``: its own (teacher token mean).
    """
    gen = step_generator(seed, 0, 0, _VALIDATION_STREAM)
    noise = torch.randn(crops.shape, generator=gen)
    t = process.grid_time(len(crops))[torch.randperm(len(crops), generator=gen)]
    total = 0.0
    for start in range(0, len(crops), batch_size):
        x0, eps, tt = (v[start:start + batch_size] for v in (crops, noise, t))
        tokens, content, style = teacher_factors(teacher, x0)
        if styles is not None:
            style = styles[start:start + batch_size].to(style)
        x_t, target = process.corrupt(x0, tt, eps)
        pred = dit(x_t, process.model_time(tt), content, style, tokens if dit.config.spatial_content else None)
        total += F.mse_loss(pred, target, reduction="sum").item()
    return total / crops.numel()
