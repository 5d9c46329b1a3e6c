"""The synthesis evaluator: a small 3-D CNN with a site head and an organ-segmentation head.

No standard medical FID network can be loaded offline, so ``train-evaluator`` trains this one
on real harmonized images only (never latents, never MeDUET) and ``evaluate-synthesis`` uses it
frozen: its site head for style accuracy, its segmentation for content preservation and its
pooled ``features`` for a Fréchet distance in this evaluator's own feature space.

Shape (U-Net-like, MONAI blocks):

1. encoder: a ``ResidualUnit`` with stride 2 per level:
   ``(B, 1, D, H, W) -> (B, c_i, D/2^(i+1), H/2^(i+1), W/2^(i+1))`` (the first one still reads
   every voxel, so noise texture reaches the features);
2. decoder: a transposed convolution up, concatenated with the encoder's skip, a
   ``ResidualUnit``; a 1×1×1 convolution to ``L`` label logits at half resolution, upsampled
   (trilinear) to the input grid: organs are many voxels wide, and a full-resolution decoder
   costs 8× the compute (the evaluator must train in about a minute on 2 CPU cores);
3. features: the global average of every encoder level, concatenated: ``(B, F)``,
   ``F = sum(c_i)`` (shallow levels carry noise texture and kernel, deep ones anatomy: both
   are what a synthesis has to get right);
4. site head: dropout and a linear layer on the features: ``(B, K)``.

Batch normalisation, not instance or group: those normalise every sample by itself and would
erase global intensity offsets (HU calibration), one of the cues that tells sites apart.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from meduet.models.architectures import EvaluatorArchitecture


class EvaluatorNet(nn.Module):
    """Site classifier, organ segmenter and feature extractor in one network.

    Args:
        arch: the shape (channels per level, site and label counts).
    """

    def __init__(self, arch: EvaluatorArchitecture) -> None:
        super().__init__()
        self.config = arch
        c = arch.channels
        self.encoder = nn.ModuleList(
            ResidualUnit(spatial_dims=3, in_channels=arch.in_channels if i == 0 else c[i - 1], out_channels=c[i],
                         strides=2, subunits=2, norm="BATCH", act="PRELU")
            for i in range(len(c)))
        self.up = nn.ModuleList(
            Convolution(spatial_dims=3, in_channels=c[i], out_channels=c[i - 1], strides=2, kernel_size=3,
                        is_transposed=True, norm="BATCH", act="PRELU")
            for i in range(len(c) - 1, 0, -1))
        self.decoder = nn.ModuleList(
            ResidualUnit(spatial_dims=3, in_channels=2 * c[i - 1], out_channels=c[i - 1], strides=1, subunits=1,
                         norm="BATCH", act="PRELU")
            for i in range(len(c) - 1, 0, -1))
        self.seg_head = nn.Sequential(
            Convolution(spatial_dims=3, in_channels=c[0], out_channels=arch.num_labels, kernel_size=1, conv_only=True),
            nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False))
        self.site_head = nn.Sequential(nn.Dropout(arch.dropout), nn.Linear(arch.feature_dim, arch.num_sites))

    def _check(self, x: torch.Tensor) -> None:
        k = self.config.downsample
        if x.ndim != 5 or x.shape[1] != self.config.in_channels or any(s % k for s in x.shape[2:]):
            raise ValueError(f"expected (B, {self.config.in_channels}, D, H, W) with D, H, W divisible by {k}, "
                             f"got {tuple(x.shape)}")

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        levels = []
        for block in self.encoder:
            x = block(x)  # (B, c_i, D/2^(i+1), H/2^(i+1), W/2^(i+1))
            levels.append(x)
        return levels

    @staticmethod
    def _pool(levels: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([level.mean(dim=(2, 3, 4)) for level in levels], dim=1)  # (B, F)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of ``x (B, C, D, H, W)``: ``(B, F)``, ``F = sum(channels)``."""
        self._check(x)
        return self._pool(self._encode(x))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Site logits ``(B, K)`` of ``x (B, C, D, H, W)`` (the encoder only)."""
        return self.site_head(self.features(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Site logits ``(B, K)`` and label logits ``(B, L, D, H, W)`` of images ``x (B, C, D, H, W)``."""
        self._check(x)
        levels = self._encode(x)
        y = levels[-1]
        for up, block, skip in zip(self.up, self.decoder, reversed(levels[:-1])):
            y = block(torch.cat([up(y), skip], dim=1))  # (B, c_{i-1}, D/2^i, H/2^i, W/2^i)
        return self.site_head(self._pool(levels)), self.seg_head(y)
