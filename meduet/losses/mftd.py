"""Mixed-to-factual token distillation, MFTD (method step 5).

The student's two reconstructions of a mixed batch are encoded again, unmixed, and their
content/style tokens must match the EMA teacher's tokens of the clean inputs. Only the
positions the OTHER source covered in the mix count: there the reconstruction was inferred
rather than seen, which is what the distillation should shape.
"""

from __future__ import annotations

import torch


def masked_token_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-token MSE averaged over the tokens with ``weight`` 1.

    Args:
        pred, target: ``(B, N, F)``.
        weight: ``(B, N)`` bool or 0/1 float.

    Returns:
        scalar: ``sum_{b,n} w * mean_f (pred - target)^2 / sum w``.
    """
    if pred.shape != target.shape or weight.shape != pred.shape[:2]:
        raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and weight "
                         f"{tuple(weight.shape)} do not match")
    weight = weight.to(pred.dtype)
    per_token = (pred - target).pow(2).mean(-1)  # (B, N)
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


def dual_targets(teacher_tokens: torch.Tensor) -> torch.Tensor:
    """Teacher targets in the order of ``decode_dual``'s rows.

    Pass 1 predicts sample ``i``, pass 2 predicts sample ``B-1-i``; the partner's targets are
    the same teacher tokens flipped, so the teacher encodes the batch once.

    Args:
        teacher_tokens: ``(B, N, F)`` teacher tokens of the clean batch.

    Returns:
        ``(2B, N, F)``.
    """
    return torch.cat([teacher_tokens, teacher_tokens.flip(0)])


def mftd_loss(student_content: torch.Tensor, student_style: torch.Tensor, teacher_content: torch.Tensor,
              teacher_style: torch.Tensor, mask: torch.Tensor, *, content_weight: float = 0.5) -> torch.Tensor:
    """``L_MFTD = content_weight * L_content + L_style``.

    Args:
        student_content: ``(2B, N, E)`` re-encoded dual reconstruction (pass 1 rows, then pass 2).
        student_style: ``(2B, N, S)``.
        teacher_content: ``(B, N, E)`` teacher tokens of the clean batch (no grad).
        teacher_style: ``(B, N, S)``.
        mask: ``(B, N)`` bool mixing mask (``True`` = partner token).
        content_weight: ``lambda_c``.

    Returns:
        scalar loss.
    """
    # Pass 1 reconstructs the own source: the partner covered mask==True; pass 2 the converse.
    cross = torch.cat([mask, ~mask])  # (2B, N)
    loss_c = masked_token_mse(student_content, dual_targets(teacher_content.detach()), cross)
    loss_s = masked_token_mse(student_style, dual_targets(teacher_style.detach()), cross)
    return content_weight * loss_c + loss_s
