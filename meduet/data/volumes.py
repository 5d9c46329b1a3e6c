"""Harmonized volumes for training: held-out splits and step-indexed random crops.

Crops are drawn from a generator seeded by ``(seed, step, rank)``, so the batch of a given
step is the same whether a run went straight through or resumed from a checkpoint, and
workers see different crops without a distributed sampler.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from meduet.harmonize.manifest import CaseRecord, read_manifest


@dataclass(frozen=True)
class Volume:
    key: str
    domain: str
    path: Path
    window: tuple[float, float, float, float]  # a_min, a_max, b_min, b_max


def usable_volumes(harmonized_dir: Path) -> list[Volume]:
    """The successfully harmonized cases of ``manifest.csv``, sorted by key."""
    records: list[CaseRecord] = read_manifest(harmonized_dir / "manifest.csv")
    return [Volume(r.key, r.domain, harmonized_dir / r.image, tuple(r.window))  # type: ignore[arg-type]
            for r in sorted(records, key=lambda r: r.key) if r.status == "ok"]


def holdout_split(volumes: list[Volume], fraction: float) -> tuple[list[Volume], list[Volume]]:
    """Deterministic per-site hold-out: every ``round(1/fraction)``-th case of each site.

    Per site so reconstruction quality can be reported per site; a site with a single case
    keeps it for training.
    """
    if fraction <= 0:
        return list(volumes), []
    stride = max(2, round(1 / fraction))
    by_domain: dict[str, list[Volume]] = defaultdict(list)
    for volume in volumes:
        by_domain[volume.domain].append(volume)
    train, held_out = [], []
    for group in by_domain.values():
        for index, volume in enumerate(group):
            (held_out if len(group) > 1 and index % stride == stride - 1 else train).append(volume)
    return train, held_out


def load_volume(path: Path) -> torch.Tensor:
    """A harmonized ``.nii.gz`` as a ``(1, D, H, W)`` float32 tensor."""
    return torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32))[None]


class CropSampler:
    """Random fixed-size crops, flipped at random unless ``flip=False``, indexed by training step.

    Args:
        volumes: ``(C, D, H, W)`` tensors (already in memory: the demo and single-node
            runs fit; large cohorts should use the latent cache instead), e.g. an image and
            its label map as two channels.
        crop: crop size ``(D, H, W)``; volumes smaller than it are zero-padded.
        seed: base seed; the batch of ``(step, rank)`` depends on nothing else.
        flip: flip each axis with probability 1/2 (off where left and right differ, e.g. for
            labels of paired organs).
    """

    def __init__(self, volumes: list[torch.Tensor], crop: tuple[int, int, int], seed: int, flip: bool = True) -> None:
        if not volumes:
            raise ValueError("no training volumes")
        self.volumes = [self._at_least(v, crop) for v in volumes]
        self.crop = crop
        self.seed = seed
        self.flip = flip

    @staticmethod
    def _at_least(volume: torch.Tensor, crop: tuple[int, int, int]) -> torch.Tensor:
        pad = [max(0, c - s) for c, s in zip(crop, volume.shape[1:])]
        if not any(pad):
            return volume
        return torch.nn.functional.pad(volume, [p for n in reversed(pad) for p in (n // 2, n - n // 2)])

    def batch(self, step: int, batch_size: int, rank: int = 0) -> torch.Tensor:
        """Returns ``(B, C, *crop)`` crops for this step and worker."""
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, step, rank]).generate_state(1)[0]))
        crops = []
        for _ in range(batch_size):
            volume = self.volumes[int(torch.randint(len(self.volumes), (1,), generator=gen))]
            corner = [int(torch.randint(s - c + 1, (1,), generator=gen)) for s, c in zip(volume.shape[1:], self.crop)]
            crop = volume[:, corner[0]:corner[0] + self.crop[0], corner[1]:corner[1] + self.crop[1],
                          corner[2]:corner[2] + self.crop[2]]
            flips = [axis + 1 for axis in range(3) if torch.rand(1, generator=gen) < 0.5]  # drawn either way:
            crops.append(crop.flip(flips) if flips and self.flip else crop)  # flip=False keeps the same crops
        return torch.stack(crops)
