"""The per-worker MeDUET pretraining loop (run by ``meduet.distributed.fit`` on every worker).

One optimizer step:
  1. for each of ``grad_accumulation`` micro-batches: latent crops of ``(seed, step, rank)``,
     a random mixing mask, ``pretrain_losses`` (method steps 1-7) under bf16 autocast on GPU,
     ``backward`` of ``total / grad_accumulation``;
  2. clip the gradient norm, AdamW step, cosine LR with linear warm-up;
  3. EMA update of the teacher with the cosine momentum of this step.
MFTD joins from step ``mftd_start``; before that the teacher only serves SiQC's keys.

The student goes through ``dist.prepare_model`` (DDP with several workers) wrapped in
``PretrainObjective``, whose ``forward`` is the whole loss: DDP synchronises gradients only
for computation done inside its ``forward``, and ``pretrain_losses`` calls the student's
encoder and decoder methods, not its ``forward``. The teacher is held outside DDP (it is
not trained; every rank applies the same EMA update to the same weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from meduet import distributed as dist
from meduet.data.latent_crops import LatentCropSampler, step_generator
from meduet.engine.ema import build_teacher, cosine_momentum, ema_update
from meduet.engine.schedules import warmup_cosine
from meduet.losses import LossWeights, pretrain_losses
from meduet.losses.mixing import random_mix_mask
from meduet.models.meduet import MeduetConfig, MeduetModel

TERMS = ("rec", "domain_content", "domain_style", "mftd", "siqc", "total")
# Name parts of parameters kept out of weight decay besides every parameter with ndim < 2.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")
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
    weights: dict  # LossWeights fields
    mftd_start: int
    ema_start: float
    ema_end: float
    use_mftd: bool
    use_siqc: bool
    log_every: int
    seed: int


class PretrainObjective(nn.Module):
    """The student plus its pretraining loss as one ``forward`` (so DDP can wrap it).

    Args:
        student: the trained ``MeduetModel``.
    """

    def __init__(self, student: MeduetModel) -> None:
        super().__init__()
        self.student = student

    def forward(self, x: torch.Tensor, domain: torch.Tensor, mask: torch.Tensor, teacher: MeduetModel, *,
                weights: LossWeights, use_mftd: bool, use_siqc: bool) -> dict[str, torch.Tensor]:
        """Loss terms of ``pretrain_losses`` for latents ``x (B, C, d, h, w)``, sites ``(B,)``, mask ``(B, N)``."""
        return pretrain_losses(self.student, teacher, x, domain, mask=mask, weights=weights,
                               use_mftd=use_mftd, use_siqc=use_siqc)


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
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(student, s.weight_decay)]
    optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=tuple(s.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(s.warmup_steps, s.steps))
    weights = LossWeights(**s.weights)

    parts = {"student": student, "teacher": teacher, "optimizer": optimizer, "scheduler": scheduler}
    start = dist.resume(**parts)

    sampler = LatentCropSampler([Path(p) for p in s.latents], s.domains, student.config.input_size[0], s.scale,
                                s.seed)
    use_amp = s.amp and device.type == "cuda"
    rank = dist.world_rank()
    cfg = student.config
    for step in range(start, s.steps):
        use_mftd = s.use_mftd and step >= s.mftd_start
        sums = {term: torch.zeros((), device=device) for term in TERMS}
        optimizer.zero_grad(set_to_none=True)
        # With several workers every micro-batch all-reduces its gradients (no DDP no_sync
        # branch here): correct, and the loop stays free of distributed special cases.
        for micro in range(s.grad_accumulation):
            index = step * s.grad_accumulation + micro  # micro-batch index: resumable, like the step
            x, domain = sampler.batch(index, s.batch_size, rank)  # (B, C, d, h, w), (B,)
            mask = random_mix_mask(s.batch_size, cfg.num_tokens, cfg.mask_ratio,
                                   generator=step_generator(s.seed, index, rank, _MASK_STREAM))  # (B, N)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                losses = objective(x.to(device), domain.to(device), mask.to(device), teacher, weights=weights,
                                   use_mftd=use_mftd, use_siqc=s.use_siqc)
            (losses["total"].float() / s.grad_accumulation).backward()
            for term in TERMS:
                sums[term] += losses[term].detach().float() / s.grad_accumulation
        torch.nn.utils.clip_grad_norm_(student.parameters(), s.grad_clip)
        lr = scheduler.get_last_lr()[0]  # the rate of this step
        optimizer.step()
        scheduler.step()
        momentum = cosine_momentum(step, s.steps, start=s.ema_start, end=s.ema_end)
        ema_update(teacher, student, momentum)

        done = step + 1
        checkpoint = dist.training_state(done, **parts) if dist.checkpoint_due(done, s.steps) else None
        if checkpoint is not None or done % s.log_every == 0 or done == s.steps:
            dist.report({"step": done, **{term: sums[term].item() for term in TERMS}, "lr": lr,
                         "momentum": momentum}, checkpoint)
