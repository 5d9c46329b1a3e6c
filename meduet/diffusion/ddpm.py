"""DDPM (Ho et al. 2020) with the linear β schedule and ε-prediction, as the authors' DiT trains it.

Notation of the paper: ``β_t`` from ``1e-4`` to ``0.02`` over ``T = 1000`` steps, ``α_t = 1 - β_t``,
``ᾱ_t = ∏_{s<=t} α_s``; timesteps are 0-based here (``t = 0`` is the paper's ``t = 1``).
Tables are computed in float64 and indexed per sample, so every formula below works on
latents of any shape ``(B, ...)``.
"""

from __future__ import annotations

import torch


def _per_sample(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``table[t]`` shaped ``(B, 1, ..., 1)`` to broadcast against ``like (B, ...)``."""
    values = table.to(like.device)[t.to(like.device).long()].to(like.dtype)
    return values.reshape(-1, *([1] * (like.ndim - 1)))


class DDPM:
    """Discrete diffusion: ``q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I)``; the network predicts ``ε``.

    Args:
        num_steps: ``T``.
        beta_start, beta_end: ends of the linear β schedule.
    """

    def __init__(self, *, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        if num_steps < 1 or not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need num_steps >= 1 and 0 < beta_start <= beta_end < 1, got {num_steps}, "
                             f"{beta_start}, {beta_end}")
        self.num_steps = num_steps
        self.betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # ᾱ_t
        # ᾱ_{t-1}, with ᾱ_{-1} = 1 (before the first step nothing is noised)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    # ---- training ------------------------------------------------------------------------
    def sample_time(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``t ~ U{0, ..., T-1}``: ``(B,)`` int64."""
        return torch.randint(self.num_steps, (batch,), generator=generator)

    def grid_time(self, n: int) -> torch.Tensor:
        """``n`` timesteps spread evenly over ``0 … T-1``: ``(n,)`` int64."""
        return torch.linspace(0, self.num_steps - 1, n).round().long()

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep embedder's input: the step index itself, as float."""
        return t.float()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Eq. (4): ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε``; ``x0``, ``noise`` ``(B, ...)``, ``t (B,)``."""
        abar = _per_sample(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def corrupt(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_t`` and the target of Eq. (14)'s simple loss, ``ε`` itself."""
        return self.q_sample(x0, t, noise), noise

    # ---- sampling ------------------------------------------------------------------------
    def predict_x0(self, eps: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """Eq. (4) solved for ``x_0``: ``(x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)``."""
        abar = _per_sample(self.alphas_cumprod, t, x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def step(self, eps: torch.Tensor, t: int, x_t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """One ancestral step ``x_t -> x_{t-1}`` (Algorithm 2, line 4).

        ``x_{t-1} = (x_t - β_t / sqrt(1 - ᾱ_t) ε) / sqrt(α_t) + σ_t z`` with ``σ_t² = β̃_t``, the
        posterior variance ``(1 - ᾱ_{t-1}) / (1 - ᾱ_t) β_t`` (Eq. 7); no noise at ``t = 0``.

        Args:
            eps: predicted noise ``(B, ...)``; t: the current step (same for the batch);
            x_t: ``(B, ...)``; noise: ``z`` (``None``: drawn with the global generator).
        """
        beta, abar, abar_prev = (float(table[t]) for table in (self.betas, self.alphas_cumprod,
                                                               self.alphas_cumprod_prev))
        mean = (x_t - beta / (1 - abar) ** 0.5 * eps) / (1 - beta) ** 0.5
        if t == 0:
            return mean
        z = torch.randn_like(x_t) if noise is None else noise
        return mean + ((1 - abar_prev) / (1 - abar) * beta) ** 0.5 * z

    def ddim_step(self, eps: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM step ``x_t -> x_{t_prev}`` (Song et al. 2021, Eq. 12 with ``η = 0``).

        ``x_{t'} = sqrt(ᾱ_{t'}) x̂_0 + sqrt(1 - ᾱ_{t'}) ε``; ``t_prev = -1`` lands on ``x̂_0``. Lets a
        sampler skip steps (e.g. 50 of the 1000).
        """
        if not -1 <= t_prev < t:
            raise ValueError(f"need -1 <= t_prev < t, got t={t}, t_prev={t_prev}")
        abar = float(self.alphas_cumprod[t])
        abar_prev = 1.0 if t_prev < 0 else float(self.alphas_cumprod[t_prev])
        x0 = (x_t - (1 - abar) ** 0.5 * eps) / abar**0.5
        return abar_prev**0.5 * x0 + (1 - abar_prev) ** 0.5 * eps
