"""DDPM and rectified flow: known answers of the forward process, the targets and the sampler steps;
condition drops and compositional guidance; REPA's loss."""

from __future__ import annotations

import math

import pytest
import torch

from meduet.diffusion import DDPM, RectifiedFlow, build_process
from meduet.diffusion.guidance import condition_drops, guided_prediction
from meduet.diffusion.repa import repa_loss
from meduet.models.dit import PRESETS, ConditionedDiT
from tests.models.test_dit import _inputs, randomised


def _pair(shape=(3, 4, 2, 2, 2), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen,
                                                                               dtype=torch.float64)


def test_ddpm_linear_schedule_known_values() -> None:
    ddpm = DDPM()
    assert ddpm.betas[0].item() == pytest.approx(1e-4) and ddpm.betas[-1].item() == pytest.approx(0.02)
    assert ddpm.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)
    # ᾱ_T of the 1000-step linear schedule: prod(1 - β_t) = 4.04e-5 (x_T is nearly pure noise)
    assert ddpm.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)
    assert ddpm.grid_time(3).tolist() == [0, 500, 999]


def test_q_sample_and_target() -> None:
    ddpm = DDPM()
    x0, eps = _pair()
    t = torch.tensor([0, 499, 999])
    x_t, target = ddpm.corrupt(x0, t, eps)
    assert torch.equal(target, eps)
    for i, step in enumerate(t.tolist()):
        abar = math.prod(1 - (1e-4 + (0.02 - 1e-4) * k / 999) for k in range(step + 1))
        torch.testing.assert_close(x_t[i], math.sqrt(abar) * x0[i] + math.sqrt(1 - abar) * eps[i])
    torch.testing.assert_close(ddpm.predict_x0(eps, t, x_t), x0)


def test_ddpm_steps_with_the_true_noise() -> None:
    ddpm = DDPM()
    x0, eps = _pair()
    t = 400
    x_t = ddpm.q_sample(x0, torch.full((3,), t), eps)
    # DDIM to t = -1 with the true ε lands on x0; to t' it lands on q_sample(x0, t', ε)
    torch.testing.assert_close(ddpm.ddim_step(eps, t, -1, x_t), x0)
    torch.testing.assert_close(ddpm.ddim_step(eps, t, 100, x_t), ddpm.q_sample(x0, torch.full((3,), 100), eps))
    # the ancestral step's mean is the posterior mean of q(x_{t-1} | x_t, x0) (Ho et al., Eq. 7)
    beta, abar, abar_prev = (float(v[t]) for v in (ddpm.betas, ddpm.alphas_cumprod, ddpm.alphas_cumprod_prev))
    posterior = (abar_prev**0.5 * beta / (1 - abar)) * x0 + ((1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar)) * x_t
    torch.testing.assert_close(ddpm.step(eps, t, x_t, noise=torch.zeros_like(x_t)), posterior)
    z = torch.ones_like(x_t)
    sigma = ((1 - abar_prev) / (1 - abar) * beta) ** 0.5
    torch.testing.assert_close(ddpm.step(eps, t, x_t, noise=z), posterior + sigma)
    assert torch.equal(ddpm.step(eps, 0, x_t, noise=z), ddpm.step(eps, 0, x_t, noise=torch.zeros_like(z)))


def test_rectified_flow_path_velocity_and_euler() -> None:
    flow = RectifiedFlow()
    x0, eps = _pair()
    x_t, v = flow.corrupt(x0, torch.tensor([0.0, 0.25, 1.0]), eps)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    torch.testing.assert_close(x_t[2], eps[2])
    torch.testing.assert_close(v, eps - x0)
    # the path is straight: one Euler step with the true velocity reaches the data from any t
    torch.testing.assert_close(flow.euler_step(v[1], 0.25, 0.0, x_t[1]), x0[1])
    torch.testing.assert_close(flow.predict_x0(v, torch.tensor([0.0, 0.25, 1.0]), x_t), x0)
    assert flow.model_time(torch.tensor([0.5])).item() == 500.0
    assert flow.sampling_times(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_flow_training_times() -> None:
    gen = torch.Generator().manual_seed(0)
    uniform = RectifiedFlow().sample_time(20000, gen)
    logit = RectifiedFlow(time_sampling="logit_normal").sample_time(20000, gen)
    for t in (uniform, logit):
        assert 0 < t.min() and t.max() < 1 and abs(t.median().item() - 0.5) < 0.02
    middle = lambda t: ((t > 0.25) & (t < 0.75)).float().mean().item()  # noqa: E731
    assert middle(uniform) == pytest.approx(0.5, abs=0.02)
    assert middle(logit) == pytest.approx(0.728, abs=0.015)  # P(|N(0,1)| < logit(0.75) = 1.0986) = 0.728
    with pytest.raises(ValueError, match="objective"):
        build_process("edm")


def test_condition_drop_rates() -> None:
    drops = condition_drops(40000, 0.2, torch.Generator().manual_seed(0))
    content, style, tokens = drops.content.float(), drops.style.float(), drops.tokens.float()
    assert content.mean().item() == pytest.approx(0.2, abs=0.01)
    assert style.mean().item() == pytest.approx(0.2, abs=0.01)
    assert (content * style).mean().item() == pytest.approx(0.04, abs=0.005)  # independent
    assert tokens.mean().item() == pytest.approx(0.2 + 0.8 * 0.2, abs=0.01)
    assert bool((drops.tokens | ~drops.content).all())  # no content vector, no content tokens
    none = condition_drops(100, 0.0)
    assert not (none.content.any() or none.style.any() or none.tokens.any())


def test_guidance_composes_content_and_style_with_their_own_scales() -> None:
    model = randomised(ConditionedDiT(PRESETS["tiny"]))
    inputs = _inputs(PRESETS["tiny"])
    args = [inputs[k] for k in ("x", "t", "content", "style", "content_tokens")]
    every = torch.ones(2, dtype=torch.bool)
    uncond = model(*args, drop_content=every, drop_style=every, drop_tokens=every)
    content_only = model(*args, drop_style=every)
    both = model(*args)
    with torch.no_grad():
        guided = lambda wc, ws: guided_prediction(model, *args, content_scale=wc, style_scale=ws)  # noqa: E731
        torch.testing.assert_close(guided(1.0, 1.0), both)
        torch.testing.assert_close(guided(0.0, 0.0), uncond)
        torch.testing.assert_close(guided(1.0, 0.0), content_only)
        torch.testing.assert_close(guided(2.0, 3.0), uncond + 2 * (content_only - uncond) + 3 * (both - content_only))
    assert not torch.allclose(content_only, both) and not torch.allclose(uncond, content_only)


def test_a_few_sampling_steps_of_each_sampler() -> None:
    model = randomised(ConditionedDiT(PRESETS["tiny"]))
    inputs = _inputs(PRESETS["tiny"])
    cond = [inputs[k] for k in ("content", "style", "content_tokens")]
    ddpm, flow = DDPM(), RectifiedFlow()
    with torch.no_grad():
        x = torch.randn_like(inputs["x"])
        steps = [999, 666, 333, -1]
        for t, t_prev in zip(steps, steps[1:]):
            eps = guided_prediction(model, x, ddpm.model_time(torch.full((2,), t)), *cond, content_scale=1.5,
                                    style_scale=2.0)
            x = ddpm.ddim_step(eps, t, t_prev, x)
        assert x.shape == inputs["x"].shape and torch.isfinite(x).all()
        y = torch.randn_like(inputs["x"])
        times = flow.sampling_times(3)
        for t, t_next in zip(times.tolist(), times[1:].tolist()):
            v = guided_prediction(model, y, flow.model_time(torch.full((2,), t)), *cond, content_scale=1.5,
                                  style_scale=2.0)
            y = flow.euler_step(v, t, t_next, y)
        assert torch.isfinite(y).all() and not torch.equal(y, x)


def test_repa_loss_known_values() -> None:
    z = torch.randn(2, 5, 8)
    assert repa_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert repa_loss(3.0 * z, z).item() == pytest.approx(0.0, abs=1e-6)  # direction only
    assert repa_loss(-z, z).item() == pytest.approx(2.0, abs=1e-6)
    a, b = torch.zeros(1, 1, 2), torch.zeros(1, 1, 2)
    a[..., 0], b[..., 1] = 1.0, 1.0
    assert repa_loss(a, b).item() == pytest.approx(1.0)  # orthogonal
    with pytest.raises(ValueError, match="differ"):
        repa_loss(z, z[:, :-1])
