"""The per-worker MeDUET pretraining loop (run by ``meduet.distributed.fit`` on every worker).

Each optimizer step is ``meduet.engine.pretrain_step.train_step`` over ``grad_accumulation``
micro-batches (latent crops and mixing masks drawn from ``(seed, step, rank)``, so a resumed
run sees the same data), then the cosine LR step and the EMA update of the teacher with the
cosine momentum of this step. MFTD joins from step ``mftd_start``; before that the teacher
only serves SiQC's keys. Each reported row holds the mean losses of the steps since the
previous row (``lr`` and ``momentum`` are those of the reported step).

The student goes through ``dist.prepare_model`` (DDP with several workers) wrapped in
``PretrainObjective``. The teacher is held outside DDP (it is not trained; every rank applies
the same EMA update to the same weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from meduet import distributed as dist
from meduet.data.latent_crops import LatentCropSampler, step_generator
from meduet.engine.ema import build_teacher, cosine_momentum, ema_update
from meduet.engine.precision import amp_dtype
from meduet.engine.pretrain_step import TERMS, PretrainObjective, build_optimizer, train_step
from meduet.engine.schedules import warmup_cosine
from meduet.losses import LossWeights
from meduet.losses.mixing import random_mix_mask
from meduet.models.meduet import MeduetConfig, MeduetModel

__all__ = ["TERMS", "PretrainSettings", "build_model", "pretrain_worker"]

_MASK_STREAM = 1  # generator stream of the mixing masks (stream 0 = the crops)


@dataclass(frozen=True)
class PretrainSettings:
    """Everything one worker needs; plain values so Ray can ship them.

    ``model`` is ``MeduetConfig.to_dict()`` (``num_domains`` = sites in the latent cache);
    ``latents``/``domains`` are the training latents' files and site indices.
    """

    model: dict
    latents: list[str]
    domains: list[int]
    scale: float
    batch_size: int
    steps: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    grad_accumulation: int
    amp: bool
    cpu_bf16: bool
    weights: dict  # LossWeights fields
    mftd_start: int
    ema_start: float
    ema_end: float
    use_mftd: bool
    use_siqc: bool
    log_every: int
    seed: int


def build_model(model: dict) -> MeduetModel:
    """A ``MeduetModel`` from ``MeduetConfig.to_dict()`` (lists from JSON/Ray become tuples)."""
    return MeduetModel(MeduetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}))


def pretrain_worker(config: dict) -> None:
    """Pretrain MeDUET on latent crops; checkpoints and metrics go through ``meduet.distributed``."""
    s = PretrainSettings(**config)
    torch.manual_seed(s.seed)  # same initial weights on every rank (DDP also broadcasts them)
    device = dist.device()
    student = build_model(s.model)
    teacher = build_teacher(student).to(device)  # starts equal to the student
    objective = dist.prepare_model(PretrainObjective(student))
    student = dist.unwrap(objective).student
    optimizer = build_optimizer(student, lr=s.lr, betas=tuple(s.betas), weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(s.warmup_steps, s.steps))
    weights = LossWeights(**s.weights)

    parts = {"student": student, "teacher": teacher, "optimizer": optimizer, "scheduler": scheduler}
    start = dist.resume(**parts)

    sampler = LatentCropSampler([Path(p) for p in s.latents], s.domains, student.config.input_size[0], s.scale,
                                s.seed)
    precision = amp_dtype(device, amp=s.amp, cpu_bf16=s.cpu_bf16)
    rank = dist.world_rank()
    num_tokens, mask_ratio = student.config.num_tokens, student.config.mask_ratio

    def micro_batches(step: int):
        # With several workers every micro-batch all-reduces its gradients (no DDP no_sync
        # branch here): correct, and the loop stays free of distributed special cases.
        for micro in range(s.grad_accumulation):
            index = step * s.grad_accumulation + micro  # micro-batch index: resumable, like the step
            x, domain = sampler.batch(index, s.batch_size, rank)  # (B, C, d, h, w), (B,)
            mask = random_mix_mask(s.batch_size, num_tokens, mask_ratio,
                                   generator=step_generator(s.seed, index, rank, _MASK_STREAM))  # (B, N)
            yield x.to(device), domain.to(device), mask.to(device)

    window: dict[str, torch.Tensor] = {}  # loss sums since the last report: rows are interval means
    window_steps = 0
    for step in range(start, s.steps):
        lr = scheduler.get_last_lr()[0]  # the rate of this step
        losses = train_step(objective, teacher, optimizer, micro_batches(step), accumulation=s.grad_accumulation,
                            weights=weights, use_mftd=s.use_mftd and step >= s.mftd_start, use_siqc=s.use_siqc,
                            grad_clip=s.grad_clip, amp_dtype=precision)
        scheduler.step()
        momentum = cosine_momentum(step, s.steps, start=s.ema_start, end=s.ema_end)
        ema_update(teacher, student, momentum)
        window = {term: window.get(term, 0.0) + losses[term] for term in TERMS}
        window_steps += 1

        done = step + 1
        checkpoint = dist.training_state(done, **parts) if dist.checkpoint_due(done, s.steps) else None
        if checkpoint is not None or done % s.log_every == 0 or done == s.steps:
            dist.report({"step": done, **{term: (window[term] / window_steps).item() for term in TERMS}, "lr": lr,
                         "momentum": momentum}, checkpoint)
            window, window_steps = {}, 0
