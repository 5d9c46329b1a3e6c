"""Intensity normalisation, one small strategy per modality (as nnU-Net does).

CT is calibrated (Hounsfield units), so a fixed window is meaningful across sites; MR
intensities are arbitrary, so the window comes from each image's robust percentiles.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def raw_threshold(self, scaled_threshold: float) -> float:
        """The raw intensity that maps to ``scaled_threshold`` (foreground search before scaling)."""
        return self.a_min + (scaled_threshold - self.b_min) * (self.a_max - self.a_min) / (self.b_max - self.b_min)


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
