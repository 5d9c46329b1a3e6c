"""Image-quality metrics for 3-D reconstructions, and bootstrap intervals of the means reported."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import SSIMMetric
from scipy.stats import bootstrap

_BOOTSTRAP_RESAMPLES = 2000


def psnr(reference: torch.Tensor, estimate: torch.Tensor, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB of two same-shape tensors."""
    mse = torch.mean((reference.float() - estimate.float()) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(data_range**2 / mse)).item()


def ssim(reference: torch.Tensor, estimate: torch.Tensor, data_range: float) -> float:
    """Mean 3-D structural similarity (Gaussian window 11, MONAI) of ``(B, 1, D, H, W)`` tensors."""
    metric = SSIMMetric(spatial_dims=3, data_range=data_range)
    return float(metric(estimate.float(), reference.float()).mean())


def mae_raw(reference: torch.Tensor, estimate: torch.Tensor, window: tuple[float, float, float, float]) -> float:
    """Mean absolute error in raw units (HU for CT) of scaled intensities.

    ``window = (a_min, a_max, b_min, b_max)``: the harmonization's linear map. Errors are
    measured inside the window (values outside it were clipped before the VAE saw them).
    """
    a_min, a_max, b_min, b_max = window
    return torch.mean(torch.abs(reference.float() - estimate.float())).item() * (a_max - a_min) / (b_max - b_min)


def mean_ci95(values: Sequence[float] | np.ndarray, seed: int = 0) -> list[float] | None:
    """95 % percentile-bootstrap interval of the mean of ``values`` (scipy, 4 digits); None for fewer than two
    values or no spread, where resampling says nothing."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2 or np.ptp(values) == 0:
        return None
    interval = bootstrap((values,), np.mean, n_resamples=_BOOTSTRAP_RESAMPLES, method="percentile",
                         rng=np.random.default_rng(seed)).confidence_interval
    return [round(float(interval.low), 4), round(float(interval.high), 4)]


def grouped_mean_ci95(values: Sequence[float], groups: Sequence[str], seed: int = 0) -> list[float] | None:
    """95 % percentile-bootstrap interval of the pooled mean of ``values``, resampling whole ``groups`` (e.g. every
    organ score of a case together: one case's organs are not independent draws); 4 digits. None for fewer than
    two groups or no spread."""
    if not values:
        return None
    names = sorted(set(groups))
    index = {name: k for k, name in enumerate(names)}
    sums, counts = np.zeros(len(names)), np.zeros(len(names))
    for value, group in zip(values, groups):
        sums[index[group]] += value
        counts[index[group]] += 1
    if len(names) < 2 or np.ptp(sums / counts) == 0:
        return None
    interval = bootstrap((sums, counts), lambda s, c: s.sum() / c.sum(), paired=True, vectorized=False,
                         n_resamples=_BOOTSTRAP_RESAMPLES, method="percentile",
                         rng=np.random.default_rng(seed)).confidence_interval
    return [round(float(interval.low), 4), round(float(interval.high), 4)]
