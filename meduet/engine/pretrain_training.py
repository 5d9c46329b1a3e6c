"""The MeDUET pretraining trainer: its parts for the shared loop (``meduet.engine.loop``).

Each optimizer step is the loop's ``optimizer_step`` over ``grad_accumulation`` micro-batches
of ``pretrain_losses`` (latent crops and mixing masks drawn from ``(seed, index, rank)``, so a
resumed run sees the same data), then the cosine LR step and, in ``after_step``, the EMA
update of the teacher with the cosine momentum of this step. MFTD joins from step
``mftd_start_fraction * steps``; before that the teacher only serves SiQC's keys.

The student goes through ``dist.prepare_model`` (DDP with several workers) wrapped in
``PretrainObjective``. The teacher is held outside DDP (it is not trained; every rank applies
the same EMA update to the same weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from meduet import distributed as dist
from meduet.config import PretrainConfig
from meduet.data.latent_crops import GroupedCropSampler, step_generator
from meduet.engine.ema import build_teacher, cosine_momentum, ema_update
from meduet.engine.loop import Trainer
from meduet.engine.optim import adamw
from meduet.engine.precision import amp_dtype
from meduet.engine.schedules import warmup_cosine
from meduet.losses import LossWeights, pretrain_losses
from meduet.losses.mae import mae_loss
from meduet.losses.mixing import random_mix_mask
from meduet.losses.site_free import SiteMeanQueue
from meduet.models.meduet import MeduetArchitecture, MeduetModel

TERMS = ("rec", "domain_content", "domain_style", "mftd", "siqc", "clean_content", "clean_style", "decorrelation",
         "site_alignment", "total")
# Name parts of parameters kept out of weight decay besides every parameter with ndim < 2.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")
_MASK_STREAM = 1  # generator stream of the mixing masks (stream 0 = the crops)

# One micro-batch: latents (B, C, d, h, w), sites (B,), mixing mask (B, N), volume slots (B,), the same
# latents unaugmented (B, C, d, h, w), and its step.
PretrainBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]


class PretrainObjective(nn.Module):
    """The student plus its pretraining loss as one ``forward`` (so DDP can wrap it).

    DDP synchronises gradients only for computation done inside its ``forward``, and
    ``pretrain_losses`` calls the student's encoder and decoder methods, not its ``forward``.

    Args:
        student: the trained ``MeduetModel``.
        queue_size: crops in the site-alignment queue (0: no queue).
        same_site_negatives: SiQC content negatives from the query's site only.
        objective: ``meduet`` (``pretrain_losses``) or ``mae``, the masked-autoencoder baseline
            (``meduet.losses.mae``: the mask hides tokens instead of mixing in the partner's).
    """

    def __init__(self, student: MeduetModel, *, queue_size: int = 0, same_site_negatives: bool = False,
                 objective: str = "meduet") -> None:
        super().__init__()
        if objective not in ("meduet", "mae"):
            raise ValueError(f"objective must be 'meduet' or 'mae', got {objective!r}")
        self.student = student
        self.site_queue = SiteMeanQueue(queue_size, student.config.embed_dim) if queue_size else None
        self.same_site_negatives = same_site_negatives
        self.objective = objective

    def forward(self, x: torch.Tensor, domain: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor,
                canonical: torch.Tensor, teacher: MeduetModel, *, weights: LossWeights, use_mftd: bool,
                use_siqc: bool) -> dict[str, torch.Tensor]:
        """Loss terms of ``pretrain_losses`` for latents ``x (B, C, d, h, w)``, sites ``(B,)``, mask ``(B, N)``,
        volume slots ``groups (B,)`` and the unaugmented crops ``canonical (B, C, d, h, w)``."""
        if self.objective == "mae":
            rec = mae_loss(self.student, x, mask)
            return {**{term: rec.new_zeros(()) for term in TERMS}, "rec": rec, "total": rec}
        return pretrain_losses(self.student, teacher, x, domain, mask=mask, weights=weights, use_mftd=use_mftd,
                               use_siqc=use_siqc, groups=groups, site_queue=self.site_queue,
                               same_site_negatives=self.same_site_negatives, clean_crops=canonical)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices and kernels only.

    Every parameter with fewer than 2 dimensions (norm scales and shifts, biases, logit
    scales) and the token-like parameters named in ``NO_DECAY_NAMES`` go to the no-decay
    group: decaying them pulls scales, offsets and embeddings towards 0 without
    regularising anything. Frozen parameters (e.g. fixed logit scales) are left out.

    Returns:
        ``[{"params", "weight_decay": weight_decay, "names"}, {"params", "weight_decay": 0.0, "names"}]``.
    """
    decay: dict[str, nn.Parameter] = {}
    no_decay: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            exempt = param.ndim < 2 or any(key in name for key in NO_DECAY_NAMES)
            (no_decay if exempt else decay)[name] = param
    return [{"params": list(decay.values()), "weight_decay": weight_decay, "names": list(decay)},
            {"params": list(no_decay.values()), "weight_decay": 0.0, "names": list(no_decay)}]


def loss_weights(cfg: PretrainConfig, step: int) -> LossWeights:
    """The section's loss weights at ``step``.

    ``use_grl: false`` sets the reversal strength to 0; ``method.grl_ramp`` ramps it from 0 to
    1 as ``2 / (1 + exp(-10 p)) - 1``, ``p = step / steps`` (DANN), so the adversary does not
    fight an encoder that has not learnt anything yet.
    """
    strength = 1.0 if cfg.use_grl else 0.0
    if cfg.method.grl_ramp:
        strength *= 2.0 / (1.0 + math.exp(-10.0 * step / cfg.steps)) - 1.0
    return LossWeights(**cfg.weights.model_dump(), grl_lambda=strength, clean_adversary=cfg.method.clean_adversary,
                       decorrelation=cfg.method.decorrelation, site_alignment=cfg.method.site_alignment)


def teacher_momentum(cfg: PretrainConfig, step: int) -> float:
    """EMA momentum at ``step``: cosine from ``ema_start`` to ``ema_end``, or, with ``method.ema_horizon``
    ``(f0, f1)``, from ``1 - 1/(f0 steps)`` to ``1 - 1/(f1 steps)``: the teacher averages over the same
    share of a run whatever its length (the authors' 0.997 → 0.9997 suits runs of ~10⁵ steps)."""
    start, end = cfg.ema_start, cfg.ema_end
    if cfg.method.ema_horizon is not None:
        start, end = (max(0.0, 1.0 - 1.0 / (f * cfg.steps)) for f in cfg.method.ema_horizon)
    return cosine_momentum(step, cfg.steps, start=min(start, end), end=max(start, end))


def pretrain_trainer(*, cfg: PretrainConfig, objective: nn.Module, teacher: MeduetModel,
                     batches: Callable[[int], Iterable[PretrainBatch]], device: torch.device) -> Trainer:
    """The loop's parts around a built student (``objective``) and teacher.

    Shared by :func:`build_trainer` and ``benchmarks/pretrain_step.py``, so the benchmark
    times the step the pipeline runs.
    """
    student = dist.unwrap(objective).student
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(student, cfg.weight_decay)]
    optimizer = adamw(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps))
    mftd_start = round(cfg.mftd_start_fraction * cfg.steps)

    def loss(batch: PretrainBatch) -> dict[str, torch.Tensor]:
        x, domain, mask, slots, canonical, step = batch
        return objective(x, domain, mask, slots, canonical, teacher, weights=loss_weights(cfg, step),
                         use_mftd=cfg.use_mftd and step >= mftd_start, use_siqc=cfg.use_siqc)

    def update_teacher(step: int) -> dict[str, float]:
        momentum = teacher_momentum(cfg, step)
        ema_update(teacher, student, momentum)
        return {"momentum": momentum}

    checkpointed = {"student": student, "teacher": teacher, "optimizer": optimizer, "scheduler": scheduler}
    queue = dist.unwrap(objective).site_queue
    if queue is not None:
        checkpointed["site_queue"] = queue
    return Trainer(checkpointed=checkpointed,
                   optimizer=optimizer, scheduler=scheduler, loss=loss, batches=batches, terms=TERMS, device=device,
                   accumulation=cfg.grad_accumulation, grad_clip=cfg.grad_clip,
                   amp_dtype=amp_dtype(device, amp=cfg.amp, cpu_bf16=cfg.cpu_bf16), after_step=update_teacher)


def build_trainer(*, cfg: PretrainConfig, architecture: MeduetArchitecture, latents: list[str], domains: list[int],
                  scale: float) -> Trainer:
    """MeDUET pretraining on crops of the latent cache.

    Args:
        architecture: the network's shape (``num_domains`` = sites of the latent cache).
        latents: ``.npy`` files of the training latents; ``domains``: their site indices.
        scale: the latent cache's scale factor.
    """
    device = dist.device()
    student = MeduetModel(architecture)
    teacher = build_teacher(student).to(device)  # starts equal to the student
    method = cfg.method
    objective = dist.prepare_model(PretrainObjective(
        student, queue_size=method.queue_size if method.site_alignment > 0 else 0,
        same_site_negatives=method.same_site_negatives, objective=cfg.objective))
    sampler = GroupedCropSampler([Path(p) for p in latents], domains, architecture.input_size[0], scale, cfg.seed,
                                 crops_per_volume=method.crops_per_volume,
                                 cross_site_partners=method.cross_site_partners, epoch_sampling=method.epoch_sampling)
    rank = dist.world_rank()

    def batches(step: int):
        for micro in range(cfg.grad_accumulation):
            index = step * cfg.grad_accumulation + micro  # micro-batch index: resumable, like the step
            x, domain, slots, canonical = sampler.grouped_batch(index, cfg.batch_size, rank)
            mask = random_mix_mask(cfg.batch_size, architecture.num_tokens, architecture.mask_ratio,
                                   generator=step_generator(cfg.seed, index, rank, _MASK_STREAM))  # (B, N)
            yield x.to(device), domain.to(device), mask.to(device), slots.to(device), canonical.to(device), step

    return pretrain_trainer(cfg=cfg, objective=objective, teacher=teacher, batches=batches, device=device)
