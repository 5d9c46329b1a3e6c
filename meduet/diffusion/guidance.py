"""Classifier-free guidance with content and style: condition dropping in training, composition at sampling.

Training replaces each condition by its null embedding at random (:func:`condition_drops`),
so one network learns the unconditional, content-only and content+style predictions.
Sampling composes them (:func:`guided_prediction`), with one scale per factor:

    ε̂ = ε(∅, ∅) + w_c [ε(c, ∅) - ε(∅, ∅)] + w_s [ε(c, s) - ε(c, ∅)]

``w_c`` (``content_scale``) strengthens what the content adds over nothing, ``w_s``
(``style_scale``) what the style adds over the content alone (the authors' code passes
these two under each other's names). ``w_c = w_s = 1`` is the plain conditional prediction.
The same composition applies to ε (DDPM) and to velocities (rectified flow).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Drops:
    """Which conditions are replaced by their null embedding, per sample: ``(B,)`` bool each."""

    content: torch.Tensor
    style: torch.Tensor
    tokens: torch.Tensor


def condition_drops(batch: int, p: float, generator: torch.Generator | None = None) -> Drops:
    """Random drops for one training batch.

    Content and style vectors are dropped independently with probability ``p``. The content
    tokens are part of the content: they go with the content vector, and on their own with
    probability ``p`` as well, so the guidance's content-free passes (tokens and vector both
    null) are trained at rate ``p``, not ``p²``, and generation from vectors alone (tokens null,
    vector kept) at ``(1 - p) p``.

    Returns:
        ``Drops`` of ``(B,)`` bool tensors on the CPU.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must lie in [0, 1), got {p}")
    draws = torch.rand(batch, 3, generator=generator)  # (B, 3): content, style, tokens
    content = draws[:, 0] < p
    return Drops(content=content, style=draws[:, 1] < p, tokens=content | (draws[:, 2] < p))


def guided_prediction(model: nn.Module, x: torch.Tensor, t: torch.Tensor, content: torch.Tensor,
                      style: torch.Tensor, content_tokens: torch.Tensor | None = None, *, content_scale: float,
                      style_scale: float) -> torch.Tensor:
    """Compositional guidance in one forward of batch ``3B``: ``(∅, ∅)``, ``(c, ∅)``, ``(c, s)``.

    Args:
        model: a ``ConditionedDiT`` (or anything with its ``forward`` signature).
        x: ``(B, C, d, h, w)`` current sample; t: ``(B,)`` on the model's time scale.
        content: ``(B, E)``; style: ``(B, S)``; content_tokens: ``(B, N, E)`` for translation
            (the content of scan A, its layout kept) or ``None`` (generation from vectors).
        content_scale: ``w_c``; style_scale: ``w_s``.

    Returns:
        The guided prediction ``(B, C, d, h, w)``.
    """
    b = x.shape[0]
    null = torch.ones(b, dtype=torch.bool, device=x.device)
    drop_content = torch.cat([null, ~null, ~null])  # content (vector and tokens) null in the first pass only
    drop_style = torch.cat([null, null, ~null])  # style kept in the third pass only
    tokens = None if content_tokens is None else content_tokens.repeat(3, 1, 1)  # (3B, N, E)
    pred = model(x.repeat(3, 1, 1, 1, 1), t.repeat(3), content.repeat(3, 1), style.repeat(3, 1), tokens,
                 drop_content=drop_content, drop_style=drop_style, drop_tokens=drop_content)
    uncond, with_content, with_both = pred.chunk(3)  # 3 x (B, C, d, h, w)
    return uncond + content_scale * (with_content - uncond) + style_scale * (with_both - with_content)
