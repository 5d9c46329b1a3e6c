"""One MeDUET optimizer step, shared by the pretraining loop and ``benchmarks/pretrain_step.py``.

``train_step`` = clear gradients, forward + backward of every micro-batch (``pretrain_losses``
under the chosen autocast), clip the gradient norm, AdamW step. Gradients are cleared before
the forward, so the previous step's gradients are not alive next to this step's activations.
The LR schedule, EMA update and logging stay with the caller.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from meduet.engine.precision import autocast
from meduet.losses import LossWeights, pretrain_losses
from meduet.models.meduet import MeduetModel

TERMS = ("rec", "domain_content", "domain_style", "mftd", "siqc", "total")
# Name parts of parameters kept out of weight decay besides every parameter with ndim < 2.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")


class PretrainObjective(nn.Module):
    """The student plus its pretraining loss as one ``forward`` (so DDP can wrap it).

    DDP synchronises gradients only for computation done inside its ``forward``, and
    ``pretrain_losses`` calls the student's encoder and decoder methods, not its ``forward``.

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


def build_optimizer(student: nn.Module, *, lr: float, betas: tuple[float, float],
                    weight_decay: float) -> torch.optim.AdamW:
    """AdamW over ``param_groups``."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(student, weight_decay)]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


def train_step(objective: nn.Module, teacher: MeduetModel, optimizer: torch.optim.Optimizer,
               micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], *, accumulation: int,
               weights: LossWeights, use_mftd: bool, use_siqc: bool, grad_clip: float,
               amp_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """One optimizer step over ``accumulation`` micro-batches.

    Args:
        objective: ``PretrainObjective`` (possibly DDP-wrapped).
        teacher: the EMA teacher (not updated here).
        micro_batches: ``(x (B, C, d, h, w), domain (B,), mask (B, N))`` on the training device,
            yielded one at a time so only one micro-batch is in memory.
        accumulation: number of micro-batches (the loss is averaged over them).
        amp_dtype: autocast dtype, ``None`` for fp32 (see ``meduet.engine.precision``).

    Returns:
        every loss term of ``TERMS`` averaged over the micro-batches (detached scalars, left on
        the device so a step needs no host synchronisation).
    """
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for x, domain, mask in micro_batches:
        with autocast(x.device, amp_dtype):
            losses = objective(x, domain, mask, teacher, weights=weights, use_mftd=use_mftd, use_siqc=use_siqc)
        (losses["total"].float() / accumulation).backward()
        for term in TERMS:
            sums[term] = sums.get(term, 0.0) + losses[term].detach().float() / accumulation
        count += 1
    if count != accumulation:
        raise ValueError(f"expected {accumulation} micro-batches, got {count}")
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    optimizer.step()
    return sums
