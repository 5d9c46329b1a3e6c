"""The one training loop every training stage runs on (per worker, through ``meduet.distributed.fit``).

A trainer supplies its parts as a :class:`Trainer`: what is checkpointed, the optimizer and
LR schedule, a ``loss(batch)`` forward, the micro-batches of each step and an optional
``after_step`` (an EMA update, a discriminator step). This module owns everything else, in
this order, so no trainer writes it again:

1. seed (same initial weights on every rank), build the parts, resume from the latest
   checkpoint (weights, optimizer, schedule, RNG states, history);
2. per step, :func:`optimizer_step`: clear gradients, forward and backward of each
   micro-batch under the trainer's autocast (gradient accumulation), clip, step;
3. the LR schedule step and ``after_step``;
4. a history row of interval means every ``log_every`` steps and at each checkpoint, and a
   progress line (step/total, rate, time left, the last row's losses) every 5 % or 30 s;
5. a checkpoint by one rule (``ray.checkpoint_every`` and the last step,
   ``distributed.checkpoint_due``); the last one is the run's final state.

Batches are indexed by step, so a resumed run sees exactly the batches the uninterrupted
run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.profiler import record_function

from meduet import distributed as dist
from meduet.engine.history import IntervalMeans
from meduet.engine.precision import autocast
from meduet.engine.progress import Progress

LossTerms = Mapping[str, torch.Tensor]


class TrainingSection(Protocol):
    """What the loop reads from a training stage's params section (``VAEConfig``, ``PretrainConfig``...)."""

    steps: int
    seed: int
    log_every: int


@dataclass
class Trainer:
    """The parts of one training run.

    Args:
        checkpointed: models, optimizers and schedulers, saved in every checkpoint and
            restored on resume under these names (models without their DDP wrapper).
        optimizer: the optimizer :func:`optimizer_step` steps.
        scheduler: LR schedule, stepped once per optimizer step.
        loss: forward of one micro-batch; returns scalar loss terms, ``total`` among them.
        batches: the ``accumulation`` micro-batches of a step index (same for a resumed run).
        terms: loss terms averaged into each history row, in column order; the terms an
            ``after_step`` returns are averaged too when listed here.
        device: where the batches live (for autocast).
        total: the term that is backpropagated.
        accumulation: micro-batches per optimizer step.
        grad_clip: max gradient norm of the optimizer's parameters.
        amp_dtype: autocast dtype, ``None`` for fp32 (``meduet.engine.precision.amp_dtype``).
        after_step: called with the step index after the optimizer and LR steps; returns
            values to report (terms listed in ``terms`` are averaged, others reported as
            the step's value, e.g. an EMA momentum).
    """

    checkpointed: dict[str, Any]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss: Callable[[Any], LossTerms]
    batches: Callable[[int], Iterable[Any]]
    terms: tuple[str, ...]
    device: torch.device
    total: str = "total"
    accumulation: int = 1
    grad_clip: float = 1.0
    amp_dtype: torch.dtype | None = None
    after_step: Callable[[int], Mapping[str, torch.Tensor | float]] | None = None
    _params: list[torch.nn.Parameter] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.total not in self.terms:
            raise ValueError(f"the backpropagated term {self.total!r} must be one of the terms {self.terms}")
        if self.accumulation < 1:
            raise ValueError(f"accumulation must be >= 1, got {self.accumulation}")
        self._params = [p for group in self.optimizer.param_groups for p in group["params"]]


def optimizer_step(trainer: Trainer, micro_batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """One optimizer step over ``trainer.accumulation`` micro-batches.

    Gradients are cleared first, so the previous step's gradients are not alive next to
    this step's activations. Every micro-batch's ``total`` is scaled by ``1 / accumulation``
    before backward (with several workers each backward all-reduces: correct, and the loop
    stays free of DDP ``no_sync`` special cases).

    Returns:
        the micro-batch mean of each loss term the trainer's ``loss`` returns (detached
        scalars, left on the device so a step needs no host synchronisation).

    Raises:
        ValueError: ``micro_batches`` did not yield ``accumulation`` batches.
    """
    trainer.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for batch in micro_batches:
        # Named ranges: a profiler (benchmarks/pretrain_step.py --profile) splits the step by them.
        with record_function("forward"), autocast(trainer.device, trainer.amp_dtype):
            losses = trainer.loss(batch)
        with record_function("backward"):
            (losses[trainer.total].float() / trainer.accumulation).backward()
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() / trainer.accumulation
        count += 1
    if count != trainer.accumulation:
        raise ValueError(f"expected {trainer.accumulation} micro-batches, got {count}")
    with record_function("clip + optimizer"):
        torch.nn.utils.clip_grad_norm_(trainer._params, trainer.grad_clip)
        trainer.optimizer.step()
    return sums


def progress_values(shown: dict[str, float], total: str) -> dict[str, float]:
    """The loss terms a progress line shows: the total first, then every other term in use (non-zero)."""
    values = {total: shown[total]} if total in shown else {}
    return values | {name: value for name, value in shown.items() if name != total and value != 0}


def train(*, build: Callable[..., Trainer], cfg: TrainingSection, stage: str = "train", **inputs: Any) -> None:
    """Run a whole training loop on this worker (the ``loop`` handed to ``distributed.fit``).

    Args:
        stage: names the run in progress lines.
        build: ``build(cfg=cfg, **inputs) -> Trainer``, a module-level function (Ray ships
            it by reference).
        cfg: the stage's validated params section (steps, seed, log_every, ...).
        inputs: the data the trainer needs (file lists, site indices, ...), plain values.
    """
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    trainer = build(cfg=cfg, **inputs)
    start = dist.resume(**trainer.checkpointed)
    means = IntervalMeans()
    progress = Progress(stage, cfg.steps, start=start, enabled=dist.world_rank() == 0)
    shown: dict[str, float] = {}  # the last history row's loss terms, for progress lines
    for step in range(start, cfg.steps):
        lr = trainer.scheduler.get_last_lr()[0]  # the rate of this step
        losses = optimizer_step(trainer, trainer.batches(step))
        trainer.scheduler.step()
        extra = dict(trainer.after_step(step)) if trainer.after_step is not None else {}
        means.add({**losses, **{name: value for name, value in extra.items() if name in trainer.terms}})

        done = step + 1
        checkpoint = dist.training_state(done, **trainer.checkpointed) if dist.checkpoint_due(done, cfg.steps) \
            else None
        if checkpoint is not None or done % cfg.log_every == 0 or done == cfg.steps:
            interval = means.pop()
            shown = {name: interval[name] for name in trainer.terms if name in interval}
            row = {"step": done, **shown, "lr": lr,
                   **{name: float(value) for name, value in extra.items() if name not in trainer.terms}}
            dist.report(row, checkpoint)
        progress.update(done, progress_values(shown, trainer.total))
