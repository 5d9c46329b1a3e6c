from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

from meduet.losses.domain import domain_losses, grad_reverse
from meduet.losses.mixing import Demixed, encode_demix, random_mix_mask
from meduet.models.meduet import PRESETS, MeduetModel


@pytest.mark.parametrize("lambd", [1.0, 0.3])
def test_gradient_reversal_is_identity_forward_and_flips_and_scales_the_gradient(lambd):
    x = torch.randn(3, 4, requires_grad=True)
    weight = torch.randn(3, 4)
    y = grad_reverse(x, lambd)
    torch.testing.assert_close(y, x)
    (y * weight).sum().backward()
    torch.testing.assert_close(x.grad, -lambd * weight)
    with pytest.raises(ValueError):
        grad_reverse(x, -1.0)


def test_domain_losses_reverse_only_the_content_branch():
    torch.manual_seed(0)
    model = MeduetModel(PRESETS["tiny"])
    x, domain = torch.randn(2, 4, 8, 8, 8), torch.tensor([0, 1])
    demixed = encode_demix(model, x, random_mix_mask(2, 64, 0.5))
    loss_c, loss_s = domain_losses(model, demixed, domain)
    assert loss_c.ndim == 0 and torch.isfinite(loss_c) and torch.isfinite(loss_s)

    # The classifier descends its loss, the encoder (upstream of the GRL) ascends it.
    def grads(lambd):
        model.zero_grad()
        d = encode_demix(model, x, random_mix_mask(2, 64, 0.5, generator=torch.Generator().manual_seed(1)))
        domain_losses(model, d, domain, grl_lambda=lambd)[0].backward()
        return model.content_head.weight.grad.clone(), model.content_domain_head[0].weight.grad.clone()

    enc_pos, cls_pos = grads(0.5)
    enc_neg, cls_neg = grads(1.0)
    torch.testing.assert_close(cls_neg, cls_pos)
    torch.testing.assert_close(enc_neg, 2.0 * enc_pos)
    with pytest.raises(ValueError):
        domain_losses(model, demixed, torch.tensor([0, 1, 1]))


@pytest.mark.parametrize("lambd", [1.0, 0.25])
def test_content_gradient_is_reversed_and_style_gradient_is_not(lambd):
    """Against the plain classifier losses: content tokens get ``-lambd`` times their gradient, style tokens theirs."""
    torch.manual_seed(0)
    model = MeduetModel(PRESETS["tiny"])
    x, domain = torch.randn(2, 4, 8, 8, 8), torch.tensor([0, 1])
    with torch.no_grad():
        demixed = encode_demix(model, x, random_mix_mask(2, 64, 0.5))
    leaves = Demixed(**{f.name: getattr(demixed, f.name).clone().requires_grad_() for f in fields(Demixed)})
    loss_c, loss_s = domain_losses(model, leaves, domain, grl_lambda=lambd)
    got_c = torch.autograd.grad(loss_c, [leaves.content_own, leaves.content_partner])
    got_s = torch.autograd.grad(loss_s, [leaves.style_own, leaves.style_partner])

    labels = torch.cat([domain, domain.flip(0)])
    plain_c = F.cross_entropy(model.content_domain_head(
        torch.cat([leaves.content_own.mean(1), leaves.content_partner.mean(1)])), labels)
    plain_s = F.cross_entropy(model.style_domain_head(
        torch.cat([leaves.style_own.mean(1), leaves.style_partner.mean(1)])), labels)
    want_c = torch.autograd.grad(plain_c, [leaves.content_own, leaves.content_partner])
    want_s = torch.autograd.grad(plain_s, [leaves.style_own, leaves.style_partner])
    torch.testing.assert_close(loss_c, plain_c)
    for got, want in zip(got_c, want_c, strict=True):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, -lambd * want)  # the encoder ascends the content site loss
    for got, want in zip(got_s, want_s, strict=True):
        torch.testing.assert_close(got, want)  # and descends the style site loss
