import math

import pytest
import torch
import torch.nn.functional as F

from meduet.losses.siqc import pool_tokens, supcon_qk, view_sources


def test_supcon_hand_computed_example():
    # Two sources, orthogonal directions; each query's only positive is the OTHER view of its
    # source (its twin key is excluded), at logit 0 against negatives {0, 1}: loss = log(2 + e).
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 0])
    keys = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # query 0 (label 0): keys 1, 2, 3 -> logits 1, 0, 1; positive key 3 (logit 1) -> -log(e/(1+2e))
    # query 1 (label 1): keys 0, 2, 3 -> logits 1, 1, 0; positive key 2 (logit 1) -> same
    # queries 2, 3 are symmetric.
    loss = supcon_qk(q, keys, labels, torch.tensor(0.0))
    torch.testing.assert_close(loss, torch.tensor(math.log((1 + 2 * math.e) / math.e)))


def test_supcon_matches_a_loop_over_queries_with_several_positives():
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(8, 5), dim=1), F.normalize(torch.randn(8, 5), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    scale = 1 / 0.07
    expected = []
    for a in range(8):
        others = [b for b in range(8) if b != a]
        logits = torch.stack([scale * q[a] @ k[b] for b in others])
        log_prob = logits - logits.logsumexp(0)
        pos = [i for i, b in enumerate(others) if labels[b] == labels[a]]
        expected.append(-log_prob[pos].mean())
    loss = supcon_qk(q, k, labels, torch.tensor(math.log(scale)))
    torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_supcon_clamps_the_logit_scale_and_keeps_keys_constant():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(4, 3), dim=1).requires_grad_()
    k = F.normalize(torch.randn(4, 3), dim=1).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1])
    scale = torch.tensor(10.0, requires_grad=True)
    loss = supcon_qk(q, k, labels, scale)
    torch.testing.assert_close(loss, supcon_qk(q, k, labels, torch.tensor(math.log(100.0))))
    loss.backward()
    assert k.grad is None and q.grad is not None and torch.isfinite(q.grad).all()
    assert scale.grad == 0  # clamped: no gradient beyond log(100)


def test_view_sources_pair_content_and_style_sources():
    content, style = view_sources(4)
    # views (c1,s1), (c2,s2), (c1,s2), (c2,s1); sample i's partner is 3-i
    assert content.tolist() == [0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0]
    assert style.tolist() == [0, 1, 2, 3, 3, 2, 1, 0, 3, 2, 1, 0, 0, 1, 2, 3]


def test_pool_tokens_gives_unit_vectors_invariant_to_channel_shift_and_scale():
    tokens = torch.randn(3, 7, 6)
    pooled = pool_tokens(tokens)
    torch.testing.assert_close(pooled.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(pool_tokens(3 * tokens + 2), pooled, atol=1e-4, rtol=1e-4)


def test_supcon_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        supcon_qk(torch.zeros(4, 3), torch.zeros(4, 2), torch.zeros(4), torch.tensor(0.0))
