"""A site's fine texture, which the VAE cannot carry, measured on real scans and drawn onto decoded ones.

A scanner leaves noise and a kernel's grain in every scan: in the demo 15-51 HU of fine texture
(the standard deviation over body voxels of a volume minus its 3³ box mean) that differs by site.
A latent of 4 channels at a quarter of the resolution per axis cannot hold it, and the decoder
draws the same ~4 HU for every site (``benchmarks/vae_ceiling.py``). The model here puts it back
as Gaussian noise of one amplitude and one correlation length per site:

- measured: for each of a site's training volumes, real and VAE round trip, the residual
  variance ``t_k²`` (volume minus its ``k³`` box mean, over body voxels) at ``k = 3`` and ``5``;
  what the round trip lacks is ``m_k = t_k²(real) - t_k²(round trip)``, averaged over volumes;
- fitted: white noise blurred by a Gaussian of ``sigma`` voxels and scaled to standard deviation
  ``amplitude`` has residual variances ``amplitude² · c_k(sigma)²``; ``sigma`` is the grid value
  whose ratio ``c_3² / c_5²`` is nearest ``m_3 / m_5`` (how fast the texture grows with scale
  says how correlated it is), then ``amplitude = sqrt(m_3) / c_3(sigma)``;
- drawn: that noise added to the body voxels of a decoded image, clipped to the real scans' range.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SIGMAS = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)  # correlation lengths tried, voxels (0: white)
SCALES = (3, 5)


@dataclass(frozen=True)
class SiteTexture:
    """Gaussian noise of standard deviation ``amplitude`` (intensity units), blurred by ``sigma`` voxels."""

    amplitude: float
    sigma: float


def residual_variances(image: torch.Tensor, body: torch.Tensor) -> np.ndarray:
    """Variance over ``body (D, H, W)`` of ``image (D, H, W)`` minus its box mean, per scale in ``SCALES``."""
    x = image.double()[None, None]
    return np.array([float((x - F.avg_pool3d(x, k, stride=1, padding=k // 2, count_include_pad=False))[0, 0][body]
                           .var()) for k in SCALES])


def blur(noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """``noise (D, H, W)`` convolved with a normalized Gaussian of ``sigma`` voxels (separable; 0: unchanged)."""
    if sigma <= 0:
        return noise
    radius = int(np.ceil(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=noise.dtype) / sigma) ** 2)
    taps = taps / taps.sum()
    x = noise[None, None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = len(taps)
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
        x = F.conv3d(F.pad(x, pad, mode="replicate"), taps.view(shape))
    return x[0, 0]


def unit_noise(shape: tuple[int, int, int], sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise of ``shape`` blurred by ``sigma`` voxels and rescaled to standard deviation 1."""
    noise = blur(torch.randn(shape, generator=generator, dtype=torch.float64), sigma)
    return noise / noise.std()


@functools.lru_cache(maxsize=None)
def unit_residuals(sigma: float, size: int = 48, seed: int = 0) -> np.ndarray:
    """``c_k(sigma)²``: residual variances of unit noise blurred by ``sigma``, per scale (simulated once)."""
    noise = unit_noise((size,) * 3, sigma, torch.Generator().manual_seed(seed))
    return residual_variances(noise, torch.ones_like(noise, dtype=torch.bool))


def fit_texture(missing: np.ndarray) -> SiteTexture:
    """The noise whose residual variances at ``SCALES`` best match ``missing`` (real minus round trip)."""
    missing = np.maximum(np.asarray(missing, dtype=np.float64), 0.0)
    if missing[0] <= 0:
        return SiteTexture(amplitude=0.0, sigma=0.0)
    ratio = missing[0] / max(missing[1], 1e-12)
    sigma = min(SIGMAS, key=lambda s: abs(np.log(unit_residuals(s)[0] / unit_residuals(s)[1]) - np.log(ratio)))
    return SiteTexture(amplitude=float(np.sqrt(missing[0] / unit_residuals(sigma)[0])), sigma=float(sigma))


def missing_variances(pairs: list[tuple[torch.Tensor, torch.Tensor]], threshold: float) -> np.ndarray:
    """Mean over ``(real, round trip)`` volume pairs ``(D, H, W)`` each of what the round trip lacks per scale
    (body: real voxels above ``threshold``)."""
    return np.mean([residual_variances(real, real > threshold) - residual_variances(trip, real > threshold)
                    for real, trip in pairs], axis=0)


def add_texture(image: torch.Tensor, texture: SiteTexture, *, threshold: float, value_range: tuple[float, float],
                generator: torch.Generator) -> torch.Tensor:
    """``image (D, H, W)`` with the site's noise on its body voxels (above ``threshold``), which are then clipped
    to ``value_range`` (the real scans' intensities); other voxels unchanged."""
    if texture.amplitude <= 0:
        return image
    noise = unit_noise(tuple(image.shape), texture.sigma, generator).to(image.dtype) * texture.amplitude
    return torch.where(image > threshold, (image + noise).clamp(*value_range), image)
