"""Sliding windows over a whole latent, in the model's input size.

Stride = window unless given (overlapping windows for sampling), the last window of an axis
aligned to the end; a latent smaller than the window is zero-padded, centred, as the training
crops are. Used wherever a whole volume is encoded by a model trained on crops (factor
extraction, evaluation, sampling).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch


def window_starts(size: int, window: int, stride: int | None = None) -> list[int]:
    """Window origins along one axis: every ``stride`` (default ``window``), the last one aligned to the end.

    ``size`` must be at least ``window`` (pad first).
    """
    if size < window:
        raise ValueError(f"axis of size {size} is smaller than the window {window}")
    if stride is not None and not 1 <= stride <= window:
        raise ValueError(f"stride must lie in [1, window {window}], got {stride}")
    starts = list(range(0, size - window + 1, stride or window))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def pad_to_window(latent: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad ``(C, d, h, w)`` (centred) so that every spatial axis is at least ``window``."""
    pad = [max(0, n - s) for n, s in zip(window, latent.shape[1:], strict=True)]
    if not any(pad):
        return latent
    # F.pad takes the last axis first: (w_lo, w_hi, h_lo, h_hi, d_lo, d_hi)
    return torch.nn.functional.pad(latent, [p for n in reversed(pad) for p in (n // 2, n - n // 2)])


def sliding_windows(latent: torch.Tensor, window: tuple[int, int, int], stride: int | None = None) -> torch.Tensor:
    """All windows of a ``(C, d, h, w)`` latent: ``(n_windows, C, *window)``."""
    latent = pad_to_window(latent, window)
    starts = [window_starts(n, k, stride) for n, k in zip(latent.shape[1:], window, strict=True)]
    wd, wh, ww = window
    return torch.stack([latent[:, i:i + wd, j:j + wh, k:k + ww] for i, j, k in itertools.product(*starts)])


def window_origins(shape: tuple[int, int, int], window: tuple[int, int, int], stride: int | None = None) -> np.ndarray:
    """Origins ``(n_windows, 3)`` of ``sliding_windows``' windows, in the order it returns them.

    In the unpadded latent's ``(d, h, w)`` voxel indices: a window of an axis shorter than
    the window starts before 0 (the centred zero padding).
    """
    origins = []
    for size, k in zip(shape, window, strict=True):
        pad_lo = max(0, k - size) // 2
        origins.append([s - pad_lo for s in window_starts(max(size, k), k, stride)])
    return np.array(list(itertools.product(*origins)), dtype=np.int64).reshape(-1, 3)


def world_boxes(origins: np.ndarray, size: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
    """World boxes ``(n, 2, 3)`` (low and high corner, RAS mm, x y z) of voxel boxes.

    Args:
        origins: ``(n, 3)`` box origins in array ``(d, h, w)`` indices; size: the box edge per axis.
        affine: ``(4, 4)`` voxel ``(i, j, k)`` → RAS world, where ``i`` indexes the array's last
            axis ``w`` (SimpleITK's x) and ``k`` its first, ``d``.
    """
    lo = origins[:, ::-1].astype(np.float64) - 0.5  # (n, 3) as (i, j, k), voxel edges
    hi = lo + np.asarray(size[::-1], dtype=np.float64)
    corners = np.stack([lo, hi], axis=1)  # (n, 2, 3)
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return np.stack([world.min(1), world.max(1)], axis=1)


def box_fractions(mask: np.ndarray, origins: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """The share of each box that ``mask (D, H, W)`` covers: ``(n,)``.

    Args:
        origins: ``(n, 3)`` box origins in the mask's ``(D, H, W)`` indices (negative where a box
            starts in padding, as :func:`window_origins` gives them); size: the box edge per axis.
            Box voxels outside the mask's grid count as not covered (zero padding is air).
    """
    counts = np.cumsum(np.cumsum(np.cumsum(np.pad(mask.astype(np.int64), ((1, 0),) * 3), 0), 1), 2)
    lo = np.clip(origins, 0, mask.shape)  # (n, 3)
    hi = np.clip(origins + np.asarray(size), 0, mask.shape)
    total = np.zeros(len(origins), dtype=np.int64)
    for corner in itertools.product((0, 1), repeat=3):  # inclusion-exclusion over the summed-volume table
        index = tuple(np.where(pick, hi[:, axis], lo[:, axis]) for axis, pick in enumerate(corner))
        total += (-1) ** (3 - sum(corner)) * counts[index]
    return total / float(np.prod(size))
