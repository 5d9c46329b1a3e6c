"""Output grids in RAS orientation, foreground boxes and padding.

Conventions: SimpleITK works in the LPS world; an image whose array axes point to R, A, S
has direction ``diag(-1, -1, 1)`` there (and an identity affine once written as NIfTI).
Sizes, indices and spacings here are ``(x, y, z)``; numpy arrays are ``(z, y, x)``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

RAS_DIRECTION = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Grid:
    """An axis-aligned RAS voxel grid: ``world = RAS_DIRECTION @ (origin_ras + index * spacing)``.

    ``origin_ras`` is the first voxel centre in RAS coordinates (mm).
    """

    origin_ras: np.ndarray  # (3,) x, y, z
    spacing: np.ndarray  # (3,)
    size: np.ndarray  # (3,) int

    def sub(self, lo: np.ndarray, hi: np.ndarray) -> Grid:
        """The grid of indices ``lo <= i < hi`` (``lo`` may be negative: padding)."""
        return Grid(self.origin_ras + lo * self.spacing, self.spacing, (hi - lo).astype(int))

    @property
    def world_origin(self) -> tuple[float, ...]:
        return tuple(float(v) for v in RAS_DIRECTION @ self.origin_ras)

    def affine(self) -> np.ndarray:
        """4×4 voxel (i, j, k) → RAS world (mm) matrix, as NIfTI/nibabel report it."""
        affine = np.eye(4)
        affine[:3, :3] = np.diag(self.spacing)
        affine[:3, 3] = self.origin_ras
        return affine


def ras_grid(image: sitk.Image, spacing: tuple[float, float, float]) -> Grid:
    """The RAS grid with ``spacing`` spanning the image's voxel centres.

    Reorientation and resampling become one resampling onto this grid. For an axis-aligned
    input its size is ``round(extent / spacing) + 1`` per axis with the first voxel centre
    kept, the rule MONAI's ``Spacing`` uses, so both give the same grid.
    """
    size = np.array(image.GetSize())
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
        for corner in itertools.product(*[(0, n - 1) for n in size])
    ]
    ras = np.array(corners) @ RAS_DIRECTION  # (8, 3): LPS world → RAS coordinates
    lo, hi = ras.min(axis=0), ras.max(axis=0)
    spacing_arr = np.asarray(spacing, dtype=float)
    out_size = np.round((hi - lo) / spacing_arr).astype(int) + 1
    return Grid(lo, spacing_arr, out_size)


def index_box_to_grid(image: sitk.Image, lo: np.ndarray, hi: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Grid index range ``[glo, ghi)`` covering the image's index box ``[lo, hi]`` (x, y, z)."""
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
        for corner in itertools.product(*zip(lo, hi))
    ]
    ras = np.array(corners) @ RAS_DIRECTION
    glo = np.floor((ras.min(axis=0) - grid.origin_ras) / grid.spacing).astype(int)
    ghi = np.ceil((ras.max(axis=0) - grid.origin_ras) / grid.spacing).astype(int) + 1
    return np.maximum(glo, 0), np.minimum(ghi, grid.size)


def foreground_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Bounding box ``[lo, hi)`` in (x, y, z) of a ``(z, y, x)`` boolean mask; None if empty."""
    lo, hi = [], []
    for axis in (2, 1, 0):  # array axes of x, y, z
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        lo.append(hits[0])
        hi.append(hits[-1] + 1)
    return np.array(lo), np.array(hi)


def padded_box(lo: np.ndarray, hi: np.ndarray, min_size: tuple[int, int, int], divisible_by: int) -> tuple[np.ndarray, np.ndarray]:
    """Grow ``[lo, hi)`` to at least ``min_size``, then to a multiple of ``divisible_by``.

    Each growth is split evenly before/after (odd remainder after), exactly as MONAI's
    ``SpatialPad`` followed by ``DivisiblePad`` do, so outputs line up voxel for voxel.
    """
    size = hi - lo
    at_least = np.maximum(size, np.asarray(min_size))
    target = -(-at_least // divisible_by) * divisible_by
    before = (at_least - size) // 2 + (target - at_least) // 2
    return lo - before, lo - before + target


def resample(image: sitk.Image, grid: Grid, interpolator: int, default_value: float, pixel_type: int) -> sitk.Image:
    """Sample ``image`` on ``grid`` (identity transform: both live in the same world).

    Grid points just past the last voxel centre (the grid rounds the extent) take the
    nearest edge value, like MONAI's ``padding_mode="border"``, instead of ``default_value``:
    a body cut by the scanner's field of view must not gain an artificial air rim.
    """
    return sitk.Resample(
        image,
        [int(n) for n in grid.size],
        sitk.Transform(),
        interpolator,
        grid.world_origin,
        tuple(float(s) for s in grid.spacing),
        tuple(RAS_DIRECTION.flatten()),
        default_value,
        pixel_type,
        True,  # useNearestNeighborExtrapolator
    )


def to_reference(labels: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """A label map sampled nearest-neighbour on ``reference``'s grid (0 where it has no voxel).

    Both images live in the same world, so one resampling undoes everything harmonization did
    to the reference (reorientation, resampling, crop and padding): the result has the
    reference's orientation, spacing, extent and origin.
    """
    return sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
