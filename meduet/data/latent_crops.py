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

    @staticmethod
    def _augment(crop: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random flips along each axis and a random rot90 in one axis plane (cubic: shape kept)."""
        flips = [axis + 1 for axis in range(3) if torch.rand(1, generator=gen) < 0.5]
        if flips:
            crop = crop.flip(flips)
        plane = _PLANES[int(torch.randint(len(_PLANES), (1,), generator=gen))]
        return torch.rot90(crop, int(torch.randint(4, (1,), generator=gen)), dims=plane)

    def batch(self, step: int, batch_size: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's and worker's crops.

        Returns:
            ``x (B, C, c, c, c)`` float32 scaled latents and ``domain (B,)`` int64 site labels.
        """
        gen = step_generator(self.seed, step, rank)
        crops, labels = [], []
        for _ in range(batch_size):
            index = int(torch.randint(len(self.arrays), (1,), generator=gen))
            crops.append(self._augment(self._crop(self.arrays[index], gen), gen))
            labels.append(self.domains[index])
        return torch.stack(crops) * self.scale, torch.tensor(labels, dtype=torch.long)


_VOLUME_STREAM = 2  # generator stream of the per-epoch volume orders


def pair_across_sites(volumes: list[int], sites: list[int]) -> list[int]:
    """Order ``volumes`` (even count ``G``) so that positions ``g`` and ``G-1-g`` come from different sites.

    Sorted by how many of the drawn volumes share their site, volume ``k`` of the first half
    pairs with volume ``k + G/2``: whenever no site holds more than half of them, every pair
    crosses sites (otherwise as many pairs as possible do).
    """
    count = {s: sum(sites[v] == s for v in volumes) for s in {sites[v] for v in volumes}}
    ranked = sorted(volumes, key=lambda v: (-count[sites[v]], sites[v]))
    half = len(ranked) // 2
    ordered = [0] * len(ranked)
    for k in range(half):
        ordered[k], ordered[len(ranked) - 1 - k] = ranked[k], ranked[k + half]
    return ordered


class GroupedCropSampler(LatentCropSampler):
    """Batches of ``B / M`` volumes × ``M`` crops each, optionally paired across sites, optionally by epochs.

    Crops of one volume sit next to each other (group ``g`` is rows ``g M … g M + M - 1``),
    so group ``g`` mixes with group ``G-1-g`` (sample ``i`` with ``B-1-i``). A batch depends on
    ``(seed, step, rank)`` alone, as ``LatentCropSampler``'s does.

    Args:
        crops_per_volume: ``M``.
        cross_site_partners: order each batch's volumes with ``pair_across_sites``.
        epoch_sampling: volumes drawn without replacement, one random order per epoch (and
            rank); otherwise each volume is drawn uniformly at random.
    """

    def __init__(self, latents: list[Path], domains: list[int], crop: int, scale: float, seed: int, *,
                 crops_per_volume: int = 1, cross_site_partners: bool = False, epoch_sampling: bool = False) -> None:
        super().__init__(latents, domains, crop, scale, seed)
        self.crops_per_volume = crops_per_volume
        self.cross_site_partners = cross_site_partners
        self.epoch_sampling = epoch_sampling

    def _volume_order(self, epoch: int, rank: int) -> list[int]:
        gen = step_generator(self.seed, epoch, rank, _VOLUME_STREAM)
        return torch.randperm(len(self.arrays), generator=gen).tolist()

    def volumes(self, step: int, count: int, rank: int, gen: torch.Generator) -> list[int]:
        """The ``count`` volumes of a step, in batch order."""
        if self.epoch_sampling:
            n = len(self.arrays)
            positions = range(step * count, step * count + count)
            chosen = [self._volume_order(p // n, rank)[p % n] for p in positions]
        else:
            chosen = [int(torch.randint(len(self.arrays), (1,), generator=gen)) for _ in range(count)]
        return pair_across_sites(chosen, self.domains) if self.cross_site_partners else chosen

    def grouped_batch(self, step: int, batch_size: int,
                      rank: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's crops.

        Returns:
            ``x (B, C, c, c, c)`` (flipped and rotated), ``domain (B,)``, ``group (B,)`` (the volume
            slot ``0 … B/M - 1``) and ``canonical (B, C, c, c, c)``: the same crops unflipped and
            unrotated, oriented as evaluation reads whole volumes.
        """
        m = self.crops_per_volume
        if batch_size % (2 * m):
            raise ValueError(f"batch size {batch_size} is not a multiple of 2 x {m} crops per volume")
        gen = step_generator(self.seed, step, rank)
        crops, canonical, labels = [], [], []
        for index in self.volumes(step, batch_size // m, rank, gen):
            for _ in range(m):
                canonical.append(self._crop(self.arrays[index], gen))
                crops.append(self._augment(canonical[-1], gen))
                labels.append(self.domains[index])
        group = torch.arange(batch_size // m).repeat_interleave(m)
        return (torch.stack(crops) * self.scale, torch.tensor(labels, dtype=torch.long), group,
                torch.stack(canonical) * self.scale)
