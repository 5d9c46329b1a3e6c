"""The masked-autoencoder baseline: only what the visible tokens say reaches the loss, and it learns."""

from __future__ import annotations

import torch

import meduet.losses.mae
from meduet.losses.mae import mae_loss
from meduet.losses.mixing import random_mix_mask
from meduet.models.meduet import PRESETS, MeduetModel

TINY = PRESETS["tiny"]


def test_hidden_tokens_never_reach_the_prediction_and_only_they_are_scored(monkeypatch) -> None:
    torch.manual_seed(0)
    model = MeduetModel(TINY)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, 8, generator=g)
    mask = random_mix_mask(2, TINY.num_tokens, TINY.mask_ratio, generator=g)
    seen = []
    scored = meduet.losses.mae.hidden_patch_mse
    monkeypatch.setattr(meduet.losses.mae, "hidden_patch_mse", lambda pred, target, hidden, **kw: (
        seen.append((pred.detach(), target, hidden)), scored(pred, target, hidden, **kw))[1])

    def changed(token: int) -> torch.Tensor:
        """x with the latent under one token of sample 0 shifted."""
        p, grid = TINY.patch_size, TINY.input_size[0] // TINY.patch_size
        i, j, k = token // (grid * grid), (token // grid) % grid, token % grid
        out = x.clone()
        out[0, :, i * p:(i + 1) * p, j * p:(j + 1) * p, k * p:(k + 1) * p] += 1.0
        return out

    base = mae_loss(model, x, mask)
    hidden_token, visible_token = int(mask[0].nonzero()[0]), int((~mask[0]).nonzero()[0])
    after_hidden = mae_loss(model, changed(hidden_token), mask)
    after_visible = mae_loss(model, changed(visible_token), mask)
    (pred, _, hidden), (pred_hidden, _, _), (pred_visible, _, _) = seen
    assert torch.equal(hidden, mask)
    torch.testing.assert_close(pred_hidden, pred, rtol=0, atol=0)  # the encoder never saw the hidden token
    assert not torch.isclose(after_hidden, base)  # ... but it is the target there
    assert not torch.allclose(pred_visible[0], pred[0])  # a visible token informs the predictions
    assert not torch.isclose(after_visible, base)


def test_loss_falls_when_trained_on_one_batch() -> None:
    torch.manual_seed(0)
    model = MeduetModel(TINY)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 4, 8, 8, 8, generator=g)
    mask = random_mix_mask(4, TINY.num_tokens, TINY.mask_ratio, generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = mae_loss(model, x, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    unused = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert unused and all("domain" in n for n in unused), unused  # only the site classifiers sit idle
