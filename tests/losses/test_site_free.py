"""The project's site-free terms (pretrain.method) on inputs with known answers."""

import copy

import pytest
import torch

from meduet.engine.ema import build_teacher
from meduet.losses import LossWeights, pretrain_losses
from meduet.losses.mixing import random_mix_mask
from meduet.losses.site_free import SiteMeanQueue, clean_site_losses, cross_correlation, pool_groups
from meduet.losses.siqc import siqc_loss, supcon_qk
from meduet.models.meduet import PRESETS, MeduetModel

TINY = PRESETS["tiny"]


def test_pool_groups_means_rows_of_a_volume() -> None:
    x = torch.tensor([[1.0], [3.0], [10.0], [20.0]])
    torch.testing.assert_close(pool_groups(x, torch.tensor([0, 0, 1, 1])), torch.tensor([[2.0], [15.0]]))


def test_clean_adversary_reverses_only_the_content_gradient() -> None:
    torch.manual_seed(0)
    model = MeduetModel(TINY)
    content = torch.randn(4, TINY.num_tokens, TINY.embed_dim, requires_grad=True)
    style = torch.randn(4, TINY.num_tokens, TINY.style_dim, requires_grad=True)
    domain, groups = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1])
    # Reference: the content classifier's plain gradient (volume-pooled, no reversal).
    pooled = pool_groups(content.mean(1), groups)
    plain = torch.autograd.grad(torch.nn.functional.cross_entropy(model.content_domain_head(pooled),
                                                                  torch.tensor([0, 1])), content)[0]
    for strength in (0.0, 0.5, 1.0):
        loss_c, loss_s = clean_site_losses(model, content, style, domain, groups, strength)
        grad_content, = torch.autograd.grad(loss_c, content)
        torch.testing.assert_close(grad_content, -strength * plain)
        grad_style, = torch.autograd.grad(loss_s, style)
        assert grad_style.abs().sum() > 0  # style is classified, not reversed


def test_cross_correlation_known_answers() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4096, 3, generator=g)
    assert cross_correlation(a, torch.randn(4096, 2, generator=g)) < 1e-3  # independent: ~0
    torch.testing.assert_close(cross_correlation(a[:, :1], 2 * a[:, :1] + 5), torch.tensor(1.0), atol=1e-3,
                               rtol=1e-3)  # a copy: correlation 1


def test_site_queue_reports_the_spread_and_pushes_site_means_together() -> None:
    queue = SiteMeanQueue(size=8, width=2)
    apart = torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]], [[-1.0, 0.0]], [[-1.0, 0.0]]])  # (B, N=1, E)
    sites = torch.tensor([0, 0, 1, 1])
    # channel 0: site means ±1, sd 2/sqrt(3) -> (±sqrt(3)/2)² = 0.75 each, weighted 0.5 + 0.5; channel 1 constant
    assert queue(apart, sites).item() == pytest.approx(0.75 / 2, abs=1e-5)  # mean over the 2 channels
    assert SiteMeanQueue(size=8, width=2)(100 * apart, sites).item() == pytest.approx(0.75 / 2, abs=1e-5)
    same = torch.tensor([[[1.0, 0.0]], [[2.0, 0.0]], [[1.0, 0.0]], [[2.0, 0.0]]])
    assert SiteMeanQueue(size=8, width=2)(same, sites).item() == pytest.approx(0.0, abs=1e-6)
    state = copy.deepcopy(queue.state_dict())
    assert int(state["cursor"]) == 4 and (state["sites"][:4] == sites).all()
    resumed = SiteMeanQueue(size=8, width=2)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed(same, sites), queue(same, sites))  # the queue carries over

    # The gradient is a full-strength push per crop, even behind a long queue of old crops.
    long_queue = SiteMeanQueue(size=1024, width=2)
    for _ in range(100):
        long_queue(apart, sites)  # fills the queue with the two sites apart
    batch = apart.clone().requires_grad_(True)
    long_queue(batch, sites).backward()
    assert batch.grad[0, 0, 0] > 0 > batch.grad[2, 0, 0]  # descending moves site 0 down, site 1 up
    assert batch.grad[0, 0, 0] > 1e-2  # not 1/n_k of it
    assert batch.grad[:, 0, 1].abs().max() == 0  # no push where the sites agree


def test_same_site_negatives_drop_other_sites_from_the_softmax() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=1)
    k = torch.nn.functional.normalize(torch.randn(8, 4, generator=g), dim=1)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    scale = torch.tensor(0.0)
    everyone = supcon_qk(q, k, labels, scale)
    assert torch.isclose(everyone, supcon_qk(q, k, labels, scale, torch.ones(8, 8, dtype=torch.bool)))
    # Only positives as candidates: each query's softmax is over its one positive -> loss 0.
    positives_only = supcon_qk(q, k, labels, scale, torch.zeros(8, 8, dtype=torch.bool))
    assert positives_only.item() == pytest.approx(0.0, abs=1e-6) and everyone > 0
    # siqc_loss with sites: content loss shrinks (fewer negatives), never grows.
    domain = torch.tensor([0, 1])
    qc, kc = q, k
    qs, ks = q[:, :2], k[:, :2]
    base = siqc_loss(qc, qs, kc, ks, scale, scale)
    same_site = siqc_loss(qc, qs, kc, ks, scale, scale, domain=domain)
    assert same_site < base


def test_pretrain_losses_with_every_method_term_reach_every_parameter() -> None:
    torch.manual_seed(0)
    student = MeduetModel(TINY)
    teacher = build_teacher(student)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 8, 8, 8, generator=g)
    domain, groups = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1]), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    mask = random_mix_mask(8, TINY.num_tokens, 0.5, generator=g)
    weights = LossWeights(clean_adversary=1.0, decorrelation=0.1, site_alignment=1.0)
    queue = SiteMeanQueue(16, TINY.embed_dim)
    losses = pretrain_losses(student, teacher, x, domain, mask=mask, weights=weights, groups=groups,
                             site_queue=queue, same_site_negatives=True)
    assert all(torch.isfinite(v) for v in losses.values())
    for term in ("clean_content", "clean_style", "decorrelation", "site_alignment"):
        assert losses[term] > 0, term
    expected = (losses["rec"] + weights.domain * (losses["domain_content"] + losses["domain_style"])
                + weights.mftd * losses["mftd"] + weights.siqc * losses["siqc"]
                + losses["clean_content"] + losses["clean_style"] + 0.1 * losses["decorrelation"]
                + losses["site_alignment"])
    torch.testing.assert_close(losses["total"], expected)
    losses["total"].backward()
    missing = [n for n, p in student.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    with pytest.raises(ValueError, match="site_queue"):
        pretrain_losses(student, teacher, x, domain, mask=mask, weights=weights, groups=groups)
