"""Intensity normalisation, one small strategy per modality (as nnU-Net does).

CT is calibrated (Hounsfield units), so a fixed window is meaningful across sites; MR
intensities are arbitrary, so the window comes from each image's robust percentiles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Window:
    """Map ``[a_min, a_max]`` linearly to ``[b_min, b_max]``, optionally clipping."""

    a_min: float
    a_max: float
    b_min: float
    b_max: float
    clip: bool = True

    def apply_(self, values: np.ndarray) -> np.ndarray:
        """Scale ``values`` (float32, any shape) in place and return them."""
        scale = (self.b_max - self.b_min) / (self.a_max - self.a_min)
        values -= self.a_min
        values *= scale
        values += self.b_min
        if self.clip:
            np.clip(values, min(self.b_min, self.b_max), max(self.b_min, self.b_max), out=values)
        return values

    def raw_level(self, share: float) -> float:
        """The raw intensity ``share`` of the way from ``a_min`` to ``a_max`` (foreground search before scaling)."""
        return self.a_min + share * (self.a_max - self.a_min)

    def scaled_above(self, values: np.ndarray, share: float) -> np.ndarray:
        """Bool mask of scaled ``values`` that lie more than ``share`` of the way from ``b_min`` to ``b_max``.

        Relative to the window, not to 0, so the same ``share`` finds the same voxels whatever the
        output range (``[0, 1]``, ``[-1, 1]``, or reversed); it agrees with ``raw > raw_level(share)``.
        """
        level = range_level(share, (self.b_min, self.b_max))
        return values > level if self.b_max >= self.b_min else values < level


def output_range(windows: Mapping[str, Sequence[float]]) -> tuple[float, float]:
    """The scaled range ``(b_min, b_max)`` that every harmonized case shares.

    Args:
        windows: case key -> the manifest's ``window`` (``a_min, a_max, b_min, b_max``).

    Raises:
        ValueError: no case, cases harmonized to different ranges (naming two), or a reversed range
            (``b_max <= b_min``: "brighter than" would point the wrong way).
    """
    ranges = {key: (float(w[2]), float(w[3])) for key, w in windows.items()}
    if not ranges:
        raise ValueError("no harmonized case to read the intensity range from")
    first = next(iter(ranges))
    for key, value in ranges.items():
        if value != ranges[first]:
            raise ValueError(f"harmonized cases differ in their output range: {first} {ranges[first]}, {key} {value};"
                             " harmonize every case with one intensity setting")
    low, high = ranges[first]
    if high <= low:
        raise ValueError(f"{first}: output range {ranges[first]} is reversed; thresholds need b_max > b_min")
    return low, high


def range_level(share: float, value_range: tuple[float, float]) -> float:
    """The intensity ``share`` of the way up ``value_range`` (``(b_min, b_max)``): a threshold whatever the range."""
    low, high = value_range
    return low + share * (high - low)


def to_unit(values: Any, value_range: tuple[float, float]) -> Any:
    """``values`` (array or tensor) mapped linearly from ``value_range`` to ``[0, 1]`` (unchanged for ``(0, 1)``)."""
    low, high = value_range
    return (values - low) / (high - low)


@dataclass(frozen=True)
class CTWindow:
    a_min: float
    a_max: float
    b_min: float
    b_max: float
    clip: bool = True

    def window(self, native: np.ndarray) -> Window:
        return Window(self.a_min, self.a_max, self.b_min, self.b_max, self.clip)


@dataclass(frozen=True)
class MRPercentiles:
    lower: float
    upper: float
    b_min: float
    b_max: float
    clip: bool = True
    max_samples: int = 1_000_000  # percentiles of a strided subsample: same answer, a fraction of the time

    def window(self, native: np.ndarray) -> Window:
        flat = native.reshape(-1)
        sample = flat[:: max(1, flat.size // self.max_samples)]
        a_min, a_max = np.percentile(sample, [self.lower, self.upper])
        if a_max <= a_min:
            a_max = a_min + 1.0
        return Window(float(a_min), float(a_max), self.b_min, self.b_max, self.clip)


Normalizer = CTWindow | MRPercentiles
