"""Diffusion processes on latents, their samplers, classifier-free guidance and REPA.

A *process* is a small strategy object with one interface for training,
:class:`meduet.diffusion.ddpm.DDPM` (ε-prediction, Ho et al. 2020) or
:class:`meduet.diffusion.flow.RectifiedFlow` (velocity prediction):

- ``sample_time(batch, generator)``: training timesteps ``t (B,)``;
- ``grid_time(n)``: ``n`` evenly spread timesteps (fixed validation);
- ``corrupt(x0, t, noise)``: the noisy input ``x_t`` and the regression target;
- ``model_time(t)``: what the network's timestep embedder sees (on a 0..1000 scale for both);

and its own sampler steps (``DDPM.step`` / ``DDPM.ddim_step``, ``RectifiedFlow.euler_step``).
"""

from __future__ import annotations

from typing import Literal

from meduet.diffusion.ddpm import DDPM
from meduet.diffusion.flow import RectifiedFlow

Objective = Literal["ddpm", "rflow"]
Process = DDPM | RectifiedFlow

__all__ = ["DDPM", "Objective", "Process", "RectifiedFlow", "build_process"]


def build_process(objective: Objective, *, flow_time: Literal["uniform", "logit_normal"] = "uniform") -> Process:
    """The process of a ``train_diffusion.objective`` (``flow_time``: rectified flow's training ``t``)."""
    if objective == "ddpm":
        return DDPM()
    if objective == "rflow":
        return RectifiedFlow(time_sampling=flow_time)
    raise ValueError(f"objective must be 'ddpm' or 'rflow', got {objective!r}")
