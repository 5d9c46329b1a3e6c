"""Sampling the conditioned DiT: the step schedule, crops, and whole volumes tiled by sliding windows.

The DiT is trained on crops of the MeDUET teacher's input size. A crop is sampled directly
(:func:`sample`). A whole volume is sampled on its own latent grid (:class:`TiledPredictor`):
at every step the current sample is cut into overlapping windows, each window is denoised
with the content tokens of the *source* latent at the same place (translation: scan A's anatomy) and the chosen style, and the predictions are blended
with Gaussian weights, so neighbouring windows agree on the overlap as the sampler goes
(MultiDiffusion, Bar-Tal et al. 2023).

Schedules: DDPM samples with deterministic DDIM steps over a subset of its 1000 steps
(``DDPM.ddim_step``), rectified flow with Euler steps from ``t = 1`` to ``0``. With
``strength < 1`` sampling starts from the source latent noised to that point of the path
(SDEdit, Meng et al. 2022) instead of pure noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from monai.data.utils import compute_importance_map
from monai.utils import BlendMode

from meduet.data.windows import pad_to_window, sliding_windows, window_origins
from meduet.diffusion import DDPM, Process, RectifiedFlow
from meduet.diffusion.guidance import guided_prediction
from meduet.engine.diffusion_training import teacher_factors
from meduet.models.dit import ConditionedDiT
from meduet.models.meduet import MeduetModel

# predict(x_t, t) -> the (guided) prediction for x_t (B, C, d, h, w) at one sampler time t (a float
# or an int step, the same for the batch).
Predictor = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class Guidance:
    """Compositional classifier-free guidance scales (see ``meduet.diffusion.guidance``)."""

    content_scale: float = 1.0
    style_scale: float = 1.0


def schedule(process: Process, steps: int, strength: float = 1.0) -> list[tuple[float, float]]:
    """The sampler's ``(t, t_next)`` pairs, from ``strength`` of the path down to data.

    DDPM: ``steps`` integer timesteps spread over ``0 … round(strength (T - 1))``, the last pair
    ``(0, -1)`` landing on ``x̂_0``. Rectified flow: ``steps`` equal Euler steps from
    ``t = strength`` to 0.
    """
    if steps < 1 or not 0 < strength <= 1:
        raise ValueError(f"need steps >= 1 and 0 < strength <= 1, got {steps}, {strength}")
    if isinstance(process, DDPM):
        start = round(strength * (process.num_steps - 1))
        times = torch.linspace(start, 0, min(steps, start + 1)).round().long().unique_consecutive().tolist()
        return list(zip(times, [*times[1:], -1], strict=True))
    times = torch.linspace(strength, 0.0, steps + 1).tolist()
    return list(zip(times[:-1], times[1:], strict=True))


def start_sample(process: Process, noise: torch.Tensor, t_start: float, source: torch.Tensor | None) -> torch.Tensor:
    """Pure noise, or ``source`` (same shape as ``noise``) noised to ``t_start`` (SDEdit)."""
    if source is None:
        return noise
    if isinstance(process, DDPM):
        return process.q_sample(source, torch.full((source.shape[0],), int(t_start)), noise)
    return process.interpolate(source, torch.full((source.shape[0],), float(t_start)), noise)


def step(process: Process, prediction: torch.Tensor, t: float, t_next: float, x: torch.Tensor,
         clip: float | None = None) -> torch.Tensor:
    """One deterministic sampler step ``x_t -> x_{t_next}``.

    ``clip``: DDPM only; the step's estimate ``x̂_0`` is clamped to ``±clip`` and ``ε`` recomputed
    from it (DDPM's ``clip_denoised``). At large ``t``, ``x̂_0 = (x_t - sqrt(1 - ᾱ) ε) / sqrt(ᾱ)``
    multiplies the network's error in ``ε`` by up to ``1 / sqrt(ᾱ_999) ≈ 156``; a small model's
    first DDIM step then lands far outside the data and a deterministic sampler never comes back.
    """
    if isinstance(process, DDPM):
        if clip is not None:
            tt = torch.full((x.shape[0],), int(t))
            x0 = process.predict_x0(prediction, tt, x).clamp(-clip, clip)
            abar = float(process.alphas_cumprod[int(t)])
            prediction = (x - abar**0.5 * x0) / (1 - abar) ** 0.5
        return process.ddim_step(prediction, int(t), int(t_next), x)
    assert isinstance(process, RectifiedFlow)
    return process.euler_step(prediction, t, t_next, x)


@torch.no_grad()
def sample(predict: Predictor, process: Process, noise: torch.Tensor, *, steps: int, strength: float = 1.0,
           source: torch.Tensor | None = None, clip: float | None = None) -> torch.Tensor:
    """Integrate the sampler from ``noise`` (or the noised ``source``) to a clean latent.

    Args:
        predict: the model's prediction for the current sample (see :data:`Predictor`).
        noise: ``(B, C, d, h, w)`` standard normal noise (seeded by the caller).
        steps: sampler steps; strength: where on the path to start (1: pure noise).
        source: ``(B, C, d, h, w)`` latent to start from when ``strength < 1``.
        clip: bound of DDPM's ``x̂_0`` (see :func:`step`); ``None``: unbounded.

    Returns:
        The sampled latent, ``noise``'s shape.
    """
    pairs = schedule(process, steps, strength)
    x = start_sample(process, noise, pairs[0][0], source if strength < 1 else None)
    for t, t_next in pairs:
        x = step(process, predict(x, t), t, t_next, x, clip)
    return x


def crop_predictor(dit: ConditionedDiT, process: Process, *, content: torch.Tensor, style: torch.Tensor,
                   guidance: Guidance, content_tokens: torch.Tensor | None = None) -> Predictor:
    """Guided predictions for crops of the DiT's input size with fixed conditions ``(B, E)``, ``(B, S)``."""

    def predict(x: torch.Tensor, t: float) -> torch.Tensor:
        model_t = process.model_time(torch.full((x.shape[0],), t))
        return guided_prediction(dit, x, model_t, content, style, content_tokens,
                                 content_scale=guidance.content_scale, style_scale=guidance.style_scale)

    return predict


class TiledPredictor:
    """Guided predictions for a whole latent volume: windows conditioned on the source's content there.

    The windows, their conditions and the blending weights are fixed for the whole run, so they
    are computed once; each step only cuts the current sample, runs the DiT and blends.

    Args:
        dit: the DiT (its ``input_size`` is the window).
        teacher: the MeDUET teacher that produced the DiT's training conditions.
        process: the DiT's process (for its time scale).
        source: ``(C, D, H, W)`` clean scaled latent whose content tokens (and pooled content)
            condition each window at the same position: scan A of a translation.
        style: ``(S,)`` the style vector every window gets (site B's).
        guidance: the scales; overlap: of neighbouring windows (0 ≤ overlap < 1).
        batch_size: windows per DiT forward (each forward runs 3 × this for the guidance).
        spatial: pass the content tokens (``False``: only the window's pooled content vector,
            the authors' global conditioning, to measure what the tokens add).
    """

    def __init__(self, dit: ConditionedDiT, teacher: MeduetModel, process: Process, *, source: torch.Tensor,
                 style: torch.Tensor, guidance: Guidance, overlap: float = 0.5, batch_size: int = 64,
                 spatial: bool = True) -> None:
        self.dit, self.process, self.style, self.guidance = dit, process, style, guidance
        self.batch_size, self.spatial = batch_size, spatial
        self.window = tuple(dit.config.input_size)
        # A volume smaller than a window is padded (centred zeros, as the training crops are)
        # and the padding cut off again after every prediction.
        self.shape = tuple(source.shape[1:])
        padded = pad_to_window(source, self.window)
        self.padded_shape = tuple(padded.shape[1:])
        self.crop = tuple(slice((p - n) // 2, (p - n) // 2 + n) for p, n in zip(self.padded_shape, self.shape))
        stride = max(1, round(min(self.window) * (1 - overlap)))
        self.boxes = [tuple(slice(int(o), int(o) + k) for o, k in zip(origin, self.window))
                      for origin in window_origins(self.padded_shape, self.window, stride)]
        with torch.no_grad():
            parts = [teacher_factors(teacher, batch)
                     for batch in sliding_windows(padded, self.window, stride).split(batch_size)]
        self.tokens = torch.cat([p[0] for p in parts])  # (n, N, E)
        self.content = torch.cat([p[1] for p in parts])  # (n, E)
        # Gaussian blending: a window's centre counts more than its edges, so seams fade.
        self.weight = compute_importance_map(self.window, mode=BlendMode.GAUSSIAN, sigma_scale=0.125)  # (*window)
        total = torch.zeros(self.padded_shape)
        for box in self.boxes:
            total[box] += self.weight
        self.norm = total
        self.forwards = 0  # DiT window evaluations (each guided prediction counts 3)

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """``x (1, C, D, H, W)`` (the source's grid) → the blended guided prediction, same shape."""
        if tuple(x.shape[2:]) != self.shape:
            raise ValueError(f"expected a sample on the source's grid {self.shape}, got {tuple(x.shape[2:])}")
        padded = pad_to_window(x[0], self.window)
        windows = torch.stack([padded[(slice(None), *box)] for box in self.boxes])  # (n, C, *window)
        out = torch.zeros_like(padded)
        for first in range(0, len(self.boxes), self.batch_size):
            batch = slice(first, first + self.batch_size)
            n = len(self.boxes[batch])
            model_t = self.process.model_time(torch.full((n,), t))
            prediction = guided_prediction(self.dit, windows[batch], model_t, self.content[batch],
                                           self.style.expand(n, -1), self.tokens[batch] if self.spatial else None,
                                           content_scale=self.guidance.content_scale,
                                           style_scale=self.guidance.style_scale)
            for box, window in zip(self.boxes[batch], prediction * self.weight, strict=True):
                out[(slice(None), *box)] += window
            self.forwards += 3 * n
        return (out / self.norm)[(slice(None), *self.crop)][None]
