"""Swap-invariance quadruplet contrast, SiQC (method step 6).

From one mixed batch come four views per sample: the factual ``(c1, s1)``, ``(c2, s2)`` and the
style-swapped ``(c1, s2)``, ``(c2, s1)`` (decoded, then re-encoded). A view's content must
agree with every view sharing its content source, its style with every view sharing its style
source. Queries come from the student; keys from the EMA teacher running the same pipeline on
the complementary mixing mask ``1 - M``, so queries and keys see different token subsets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOGIT_SCALE_MIN = math.log(1e-3)
LOGIT_SCALE_MAX = math.log(100.0)


def pool_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Layer-norm over channels (no affine), mean over tokens, L2-normalise.

    Args:
        tokens: ``(B, L, F)``.

    Returns:
        ``(B, F)`` unit vectors.
    """
    pooled = F.layer_norm(tokens, tokens.shape[-1:]).mean(dim=1)  # (B, F)
    return F.normalize(pooled, dim=-1)


def view_sources(batch: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Source sample of each view's content and style, views ordered ``(c1,s1), (c2,s2), (c1,s2), (c2,s1)``.

    Returns:
        ``content_ids (4B,)`` and ``style_ids (4B,)``; the partner of sample ``i`` is ``B-1-i``.
    """
    own = torch.arange(batch, device=device)
    partner = own.flip(0)
    return torch.cat([own, partner, own, partner]), torch.cat([own, partner, partner, own])


def supcon_qk(queries: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor,
              logit_scale: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Supervised contrastive loss of queries against keys with shared labels.

    Query ``a`` and key ``a`` are the same view of the same sample (student vs teacher); that
    self-pair is dropped from both positives and the softmax, so a query cannot win by
    matching its own twin. Every other key with the same label is a positive.

    Args:
        queries: ``(M, F)`` unit vectors (gradients flow).
        keys: ``(M, F)`` unit vectors (treated as constants).
        labels: ``(M,)`` integer source ids.
        logit_scale: scalar ``log`` of the inverse temperature; clamped to ``[log 1e-3, log 100]``.
        candidates: ``(M, M)`` bool, the keys each query's softmax may see (positives always
            can); None: all keys.

    Returns:
        scalar: ``mean_a -1/|P(a)| sum_{p in P(a)} log softmax_{k != a}(s * q_a . k_k)[p]``.
    """
    if queries.shape != keys.shape or labels.shape != queries.shape[:1]:
        raise ValueError(f"queries {tuple(queries.shape)}, keys {tuple(keys.shape)} and labels "
                         f"{tuple(labels.shape)} do not match")
    scale = logit_scale.clamp(LOGIT_SCALE_MIN, LOGIT_SCALE_MAX).exp()
    logits = scale * queries @ keys.detach().T  # (M, M)
    self_pair = torch.eye(len(labels), dtype=torch.bool, device=logits.device)
    positives = (labels[:, None] == labels[None, :]) & ~self_pair  # (M, M)
    hidden = self_pair if candidates is None else self_pair | ~(candidates | positives)
    logits = logits.masked_fill(hidden, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=1, keepdim=True)  # (M, M)
    pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)  # -inf on the diagonal is masked out
    return (-pos_log_prob / positives.sum(1).clamp_min(1)).mean()


def view_embeddings(content: list[torch.Tensor], style: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the four views' factor tokens into ``(4B, E)`` content and ``(4B, S)`` style vectors.

    Args:
        content: four ``(B, L_v, E)`` tensors in view order (token counts may differ per view).
        style: four ``(B, L_v, S)`` tensors.
    """
    return torch.cat([pool_tokens(c) for c in content]), torch.cat([pool_tokens(s) for s in style])


def siqc_loss(query_content: torch.Tensor, query_style: torch.Tensor, key_content: torch.Tensor,
              key_style: torch.Tensor, logit_scale_content: torch.Tensor, logit_scale_style: torch.Tensor, *,
              domain: torch.Tensor | None = None, groups: torch.Tensor | None = None) -> torch.Tensor:
    """``L_SiQC = L_c + L_s`` over the four views.

    Args:
        query_content, key_content: ``(4B, E)`` pooled views (``view_embeddings``), student / teacher.
        query_style, key_style: ``(4B, S)``.
        logit_scale_content, logit_scale_style: scalar log inverse temperatures.
        domain: ``(B,)`` sites; given, content negatives come only from the query's site
            (``pretrain.method.same_site_negatives``), so site cues cannot tell crops apart.
        groups: ``(B,)`` volume slot of each crop; given, style positives are every view whose
            style comes from the same volume (its crops share one acquisition).
    """
    if query_content.shape[0] % 4:
        raise ValueError(f"expected 4 views of B samples, got {query_content.shape[0]} rows")
    content_ids, style_ids = view_sources(query_content.shape[0] // 4, query_content.device)
    candidates = None
    if domain is not None:
        sites = domain[content_ids]
        candidates = sites[:, None] == sites[None, :]
    if groups is not None:
        style_ids = groups[style_ids]
    return (supcon_qk(query_content, key_content, content_ids, logit_scale_content, candidates)
            + supcon_qk(query_style, key_style, style_ids, logit_scale_style))
