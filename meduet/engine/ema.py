"""EMA teacher for MeDUET's self-distillation (MFTD) and contrast keys (SiQC).

The teacher is a frozen copy of the student whose weights follow it with momentum ``m``:
``teacher = m * teacher + (1 - m) * student``. ``m`` rises from ``start`` to ``end`` along a
half cosine over training, so the teacher tracks the fast-changing early student closely and
becomes a slow, stable target later.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, *, start: float = 0.997, end: float = 0.9997) -> float:
    """Momentum at ``step`` of ``total_steps``: ``end - (end - start) * (1 + cos(pi * t)) / 2``, ``t = step / total``.

    Equals ``start`` at step 0 and ``end`` at (and after) ``total_steps``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"momenta must satisfy 0 <= start <= end <= 1, got start={start}, end={end}")
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    t = min(step, total_steps) / total_steps
    return end - (end - start) * (1.0 + math.cos(math.pi * t)) / 2.0


def build_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy of ``student`` (no gradients, eval mode) to be updated by ``ema_update``."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: ``teacher_param = momentum * teacher_param + (1 - momentum) * student_param``.

    Floating-point buffers are copied from the student (they are not trained, so averaging
    them would only lag); the two models must have the same parameter names and shapes.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    student_params = dict(student.named_parameters())
    teacher_params = dict(teacher.named_parameters())
    if student_params.keys() != teacher_params.keys():
        raise ValueError("teacher and student have different parameters")
    for name, t in teacher_params.items():
        t.lerp_(student_params[name].detach(), 1.0 - momentum)  # t + (1 - m)(s - t) = m t + (1 - m) s
    student_buffers = dict(student.named_buffers())
    for name, b in teacher.named_buffers():
        b.copy_(student_buffers[name])
