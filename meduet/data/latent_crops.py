"""Step-indexed random crops of the latent cache for MeDUET pretraining.

Every batch is drawn from a generator seeded by ``(seed, step, rank)`` only, so the batch
of a given step is the same whether a run went straight through or resumed from a
checkpoint, and workers see different crops without a distributed sampler (as
``meduet.data.volumes.CropSampler`` does for voxel volumes). Latents stay memory-mapped:
a crop reads only the bytes it covers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from meduet.data.latents import LatentRecord, read_scale

# The three axis planes of a (C, d, h, w) crop that rot90 can rotate in.
_PLANES = ((1, 2), (1, 3), (2, 3))


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator determined by ``(seed, *keys)`` alone (e.g. step, rank, stream)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0]))


class LatentCropSampler:
    """Random cubic latent crops with flips and rot90, and their site labels, indexed by step.

    Args:
        latents: ``.npy`` files of ``(C, d, h, w)`` float latents (opened memory-mapped).
        domains: site index of each latent (``LatentRecord.domain_index``).
        crop: crop edge; latents smaller than it along an axis are zero-padded (centred).
        scale: latent scale factor (``1 / std`` of the training latents) applied to every crop.
        seed: base seed; the batch of ``(step, rank)`` depends on nothing else.
    """

    def __init__(self, latents: list[Path], domains: list[int], crop: int, scale: float, seed: int) -> None:
        if not latents:
            raise ValueError("no training latents")
        if len(latents) != len(domains):
            raise ValueError(f"{len(latents)} latents but {len(domains)} domain labels")
        if crop < 1 or scale <= 0:
            raise ValueError(f"crop must be >= 1 and scale > 0, got crop={crop}, scale={scale}")
        self.arrays = [np.load(path, mmap_mode="r") for path in latents]
        for path, array in zip(latents, self.arrays):
            if array.ndim != 4:
                raise ValueError(f"{path}: expected a (C, d, h, w) latent, got shape {array.shape}")
        self.domains = list(domains)
        self.crop = crop
        self.scale = scale
        self.seed = seed

    @classmethod
    def from_cache(cls, cache_dir: Path, records: list[LatentRecord], crop: int, seed: int) -> LatentCropSampler:
        """A sampler over ``records`` of the cache in ``cache_dir``, with the cache's scale factor."""
        return cls([cache_dir / r.latent for r in records], [r.domain_index for r in records], crop,
                   read_scale(cache_dir), seed)

    def _crop(self, array: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        """One random ``(C, c, c, c)`` window, zero-padded where the latent is smaller."""
        c = self.crop
        corner = [int(torch.randint(max(0, s - c) + 1, (1,), generator=gen)) for s in array.shape[1:]]
        window = np.array(array[:, corner[0]:corner[0] + c, corner[1]:corner[1] + c, corner[2]:corner[2] + c],
                          dtype=np.float32)  # reads only this window from the memory map
        window = torch.from_numpy(window)
        pad = [c - s for s in window.shape[1:]]
        if any(pad):
            window = torch.nn.functional.pad(window, [p for n in reversed(pad) for p in (n // 2, n - n // 2)])
        return window

    def batch(self, step: int, batch_size: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's and worker's crops.

        Returns:
            ``x (B, C, c, c, c)`` float32 scaled latents and ``domain (B,)`` int64 site labels.
        """
        gen = step_generator(self.seed, step, rank)
        crops, labels = [], []
        for _ in range(batch_size):
            index = int(torch.randint(len(self.arrays), (1,), generator=gen))
            crop = self._crop(self.arrays[index], gen)
            flips = [axis + 1 for axis in range(3) if torch.rand(1, generator=gen) < 0.5]
            if flips:
                crop = crop.flip(flips)
            plane = _PLANES[int(torch.randint(len(_PLANES), (1,), generator=gen))]
            crop = torch.rot90(crop, int(torch.randint(4, (1,), generator=gen)), dims=plane)  # cubic: shape kept
            crops.append(crop)
            labels.append(self.domains[index])
        return torch.stack(crops) * self.scale, torch.tensor(labels, dtype=torch.long)
