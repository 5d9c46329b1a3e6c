"""Image-quality metrics for 3-D reconstructions."""

from __future__ import annotations

import torch
from monai.metrics import SSIMMetric


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
