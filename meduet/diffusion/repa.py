"""REPA (Yu et al. 2025): align an intermediate DiT layer's tokens with a frozen encoder's tokens.

Here the frozen encoder is MeDUET (its content tokens of the clean latent, aligned one to one
with the DiT's tokens). A small MLP maps the DiT tokens to the encoder's width; the loss is
``1 - cos`` averaged over tokens and batch (0 when aligned, REPA's ``-cos`` shifted by 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RepaProjector(nn.Module):
    """``(B, N, D)`` -> ``(B, N, E)``: ``Linear → SiLU → Linear → SiLU → Linear`` (REPA's projector).

    Args:
        dim: DiT width ``D``; target_dim: encoder width ``E``; hidden: MLP width (default
            ``min(2048, 4 D)``: REPA's 2048 at DiT-B scale, proportionally less for CPU presets).
    """

    def __init__(self, *, dim: int, target_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or min(2048, 4 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, target_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens)


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - mean cos(projected, target)`` over tokens and batch.

    Args:
        projected: ``(B, N, E)`` projected DiT tokens; target: ``(B, N, E)`` frozen encoder tokens.

    Returns:
        A scalar in ``[0, 2]``; 0 when every token points the same way as its target.
    """
    if projected.shape != target.shape:
        raise ValueError(f"projected {tuple(projected.shape)} and target {tuple(target.shape)} differ")
    return 1.0 - F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()
