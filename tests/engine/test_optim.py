"""The trainers' AdamW: fused where it can be, the same updates as PyTorch's for-loop AdamW."""

from __future__ import annotations

import torch

from meduet.engine.optim import adamw


def _train(optimizer_factory, steps: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    optimizer = optimizer_factory(model.parameters())
    data = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        optimizer.zero_grad()
        model(data).pow(2).mean().backward()
        optimizer.step()
    return model


def test_cpu_parameters_get_the_fused_kernel_and_groups_keep_their_options():
    weight, bias = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.zeros(3))
    optimizer = adamw([{"params": [weight], "weight_decay": 0.1}, {"params": [bias], "weight_decay": 0.0}], lr=1e-3)
    assert all(group["fused"] for group in optimizer.param_groups)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]


def test_fused_updates_match_the_for_loop_adamw():
    options = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.05}
    fused = _train(lambda params: adamw(params, **options))
    reference = _train(lambda params: torch.optim.AdamW(params, foreach=False, **options))
    for a, b in zip(fused.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, torch.zeros_like(a))  # the models did train


def test_a_fused_run_repeats_bit_for_bit():
    first, second = (_train(lambda params: adamw(params, lr=1e-2)) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))
