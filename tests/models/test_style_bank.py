"""StyleBank: the running mean style, mixed into some training windows' encoder tokens only."""

from __future__ import annotations

import pytest
import torch

from meduet.models.architectures import SegmenterArchitecture
from meduet.models.meduet import PRESETS, MeduetModel
from meduet.models.segmenter import LatentSegmenter, StyleBank

TINY = PRESETS["tiny"]


def _tokens(seed: int, batch: int = 6) -> torch.Tensor:
    return torch.randn(batch, TINY.num_tokens, TINY.embed_dim, generator=torch.Generator().manual_seed(seed))


def test_bank_is_the_running_mean_style_and_moves_only_the_chosen_windows() -> None:
    torch.manual_seed(0)
    encoder = MeduetModel(TINY)
    bank = StyleBank(TINY.style_dim, momentum=0.5, alpha=(0.3, 0.3), probability=0.5)
    first, second = _tokens(0), _tokens(1)
    with torch.no_grad():
        out = bank(encoder, first)
    torch.testing.assert_close(out, first)  # an empty bank has no style to give
    style_first = encoder.factorize(first)[1].mean(dim=(0, 1))
    torch.testing.assert_close(bank.mean, style_first)

    torch.manual_seed(1)
    expected_chosen = torch.rand(6) < 0.5  # the bank's own draw, replayed
    torch.manual_seed(1)
    with torch.no_grad():
        out = bank(encoder, second)
    moved = (out - second).abs().amax(dim=(1, 2)) > 0
    assert torch.equal(moved, expected_chosen) and 0 < int(moved.sum()) < 6
    content, style = encoder.factorize(second)
    mixed = style + 0.3 * (style_first - style)
    expected = second + encoder.entangle(content, mixed) - encoder.entangle(content, style)
    torch.testing.assert_close(out[moved], expected[moved])
    style_second = style.mean(dim=(0, 1))
    torch.testing.assert_close(bank.mean, 0.5 * style_first + 0.5 * style_second)
    assert int(bank.updates) == 2


def test_zero_mixing_weight_leaves_tokens_as_they_were_and_gradients_reach_them() -> None:
    torch.manual_seed(0)
    encoder = MeduetModel(TINY)
    bank = StyleBank(TINY.style_dim, alpha=(0.0, 0.0), probability=1.0)
    bank(encoder, _tokens(0))
    tokens = _tokens(1).requires_grad_()
    out = bank(encoder, tokens)
    torch.testing.assert_close(out, tokens)
    out.sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0


@pytest.mark.parametrize("training", [True, False])
def test_segmenter_uses_the_bank_in_training_only(training: bool) -> None:
    torch.manual_seed(0)
    model = LatentSegmenter(TINY, SegmenterArchitecture(num_classes=3, decoder="upsample", features=4))
    model.train(training)
    bank = StyleBank(TINY.style_dim, alpha=(1.0, 1.0), probability=1.0)
    latent = torch.randn(2, 4, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    bank(model.encoder, torch.randn(4, TINY.num_tokens, TINY.embed_dim))  # fill the bank
    with torch.no_grad():
        plain = model(latent)
        augmented = model(latent, style_bank=bank)
    assert torch.equal(plain, augmented) != training
