"""Rectified flow (linear interpolation, velocity prediction), as the authors' SiT variant trains it.

Convention: ``t = 0`` is data and ``t = 1`` noise, ``x_t = (1 - t) x_0 + t ε``; the network
predicts the velocity ``v = dx_t/dt = ε - x_0``. Sampling integrates ``dx/dt = v`` from ``t = 1``
back to ``0`` (Euler steps). Training draws ``t`` uniformly or logit-normally
(``t = sigmoid(n)``, ``n ~ N(0, 1)``; Esser et al. 2024), which weights the middle of the path.
"""

from __future__ import annotations

from typing import Literal

import torch

# The timestep embedder sees t on the DDPM scale (0..1000), so both objectives share its frequencies.
TIME_SCALE = 1000.0


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class RectifiedFlow:
    """Linear path between data and Gaussian noise.

    Args:
        time_sampling: ``uniform`` or ``logit_normal`` training times.
    """

    def __init__(self, *, time_sampling: Literal["uniform", "logit_normal"] = "uniform") -> None:
        if time_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"time_sampling must be 'uniform' or 'logit_normal', got {time_sampling!r}")
        self.time_sampling = time_sampling

    # ---- training ------------------------------------------------------------------------
    def sample_time(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training times ``t (B,)`` in ``(0, 1)``, float32."""
        if self.time_sampling == "uniform":
            return torch.rand(batch, generator=generator)
        return torch.sigmoid(torch.randn(batch, generator=generator))

    def grid_time(self, n: int) -> torch.Tensor:
        """Midpoints of ``n`` equal intervals of ``[0, 1]``: ``(n,)``."""
        return (torch.arange(n, dtype=torch.float32) + 0.5) / n

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() * TIME_SCALE

    def interpolate(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - t) x_0 + t ε``; ``x0``, ``noise`` ``(B, ...)``, ``t (B,)``."""
        t = _per_sample(t, x0)
        return (1 - t) * x0 + t * noise

    def corrupt(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t`` and the velocity target ``ε - x_0``."""
        return self.interpolate(x0, t, noise), noise - x0

    # ---- sampling ------------------------------------------------------------------------
    def predict_x0(self, v: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """The data end of the straight line through ``x_t`` with velocity ``v``: ``x_t - t v``."""
        return x_t - _per_sample(t, x_t) * v

    @staticmethod
    def euler_step(v: torch.Tensor, t: float, t_next: float, x_t: torch.Tensor) -> torch.Tensor:
        """One Euler step of ``dx/dt = v`` from ``t`` to ``t_next`` (``t_next < t`` when sampling)."""
        return x_t + (t_next - t) * v

    @staticmethod
    def sampling_times(steps: int) -> torch.Tensor:
        """``steps + 1`` times from 1 (noise) down to 0 (data), for ``euler_step`` pairs."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return torch.linspace(1.0, 0.0, steps + 1)
