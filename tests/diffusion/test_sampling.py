"""Samplers: exact on an oracle, the DDPM clip, and whole volumes tiled by overlapping windows."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from meduet.diffusion import DDPM, RectifiedFlow
from meduet.diffusion.sampling import Guidance, TiledPredictor, sample, schedule
from meduet.engine.diffusion_training import teacher_factors
from meduet.models.architectures import DIT_PRESETS, MEDUET_PRESETS
from meduet.models.meduet import MeduetModel


def _oracle(process, x0: torch.Tensor):
    """The exact prediction of a model that knows the data point ``x0``."""

    def predict(x: torch.Tensor, t: float) -> torch.Tensor:
        if isinstance(process, DDPM):
            abar = float(process.alphas_cumprod[int(t)])
            return (x - abar**0.5 * x0) / (1 - abar) ** 0.5  # ε
        return (x - x0) / t  # velocity of the straight line through x0

    return predict


def test_schedules_run_from_the_start_to_data() -> None:
    ddpm = schedule(DDPM(), 5)
    assert ddpm == [(999, 749), (749, 500), (500, 250), (250, 0), (0, -1)]
    assert schedule(DDPM(), 4, strength=0.5)[0][0] == 500
    assert schedule(DDPM(), 50, strength=0.001) == [(1, 0), (0, -1)]  # never more steps than the path has
    flow = schedule(RectifiedFlow(), 4, strength=0.8)
    assert len(flow) == 4 and flow[0][0] == pytest.approx(0.8) and flow[-1][1] == 0.0
    assert all(a > b for a, b in flow)
    with pytest.raises(ValueError):
        schedule(RectifiedFlow(), 0)


@pytest.mark.parametrize("process", [DDPM(), RectifiedFlow()], ids=["ddpm", "rflow"])
@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_an_oracle_lands_on_its_data_point(process, strength: float) -> None:
    x0 = torch.randn(2, 4, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    out = sample(_oracle(process, x0), process, noise, steps=7, strength=strength, source=torch.zeros_like(x0))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_ddpm_clip_bounds_the_estimate() -> None:
    process = DDPM()
    noise = torch.randn(1, 4, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    silent = lambda x, t: torch.zeros_like(x)  # noqa: E731 - a model that sees no noise: x̂_0 = x_t / sqrt(ᾱ_t)
    wild = sample(silent, process, noise, steps=10)
    clipped = sample(silent, process, noise, steps=10, clip=3.0)
    assert wild.abs().max() > 100  # 1 / sqrt(ᾱ_999) ≈ 156, kept by the deterministic steps
    assert clipped.abs().max() <= 3.0 + 1e-4


class _Echo(nn.Module):
    """A stand-in DiT that returns its input and records the content tokens each window got."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.tokens: list[torch.Tensor] = []

    def forward(self, x, t, content, style, content_tokens=None, *, drop_content=None, drop_style=None,
                drop_tokens=None):
        self.tokens.append(content_tokens)
        return x


@pytest.mark.parametrize("shape", [(13, 9, 11), (5, 8, 6)], ids=["larger", "smaller-than-a-window"])
def test_tiling_blends_to_a_partition_of_unity_and_conditions_each_window_on_the_source(shape) -> None:
    torch.manual_seed(0)
    teacher = MeduetModel(MEDUET_PRESETS["tiny"]).eval()
    config = dataclasses.replace(DIT_PRESETS["tiny"], content_dim=32, style_dim=8)
    echo = _Echo(config)
    source = torch.randn(4, *shape)
    tiled = TiledPredictor(echo, teacher, RectifiedFlow(), source=source, style=torch.zeros(8),
                           guidance=Guidance(2.0, 3.0), overlap=0.5, batch_size=5)
    x = torch.randn(1, 4, *shape)
    # Every window returns its own input: the Gaussian-weighted blend must give x back exactly.
    torch.testing.assert_close(tiled(x, 0.5), x, atol=1e-5, rtol=1e-5)
    assert tiled.forwards == 3 * len(tiled.boxes)
    # The first window's tokens are the teacher's on the (padded) source at the same place.
    padded = torch.nn.functional.pad(source, [p for n, k in zip(reversed(shape), (8, 8, 8))
                                              for p in (max(0, k - n) // 2, max(0, k - n) - max(0, k - n) // 2)])
    box = tiled.boxes[0]
    expected, _, _ = teacher_factors(teacher, padded[(slice(None), *box)][None])
    torch.testing.assert_close(echo.tokens[0][0], expected[0])  # first of the 3 guidance passes' copies
    with pytest.raises(ValueError, match="source's grid"):
        tiled(torch.randn(1, 4, 8, 8, 8), 0.5)
