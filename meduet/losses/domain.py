"""Domain supervision of the factors (method step 4).

Content should carry no site information, style should carry it all. Both factors are
mean-pooled and classified by site; the content classifier sits behind a gradient reversal
layer, so the classifier learns to find the site while the encoder learns to hide it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meduet.losses.mixing import Demixed
from meduet.models.meduet import MeduetModel


class GradReverse(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``-lambda`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lambd: float) -> torch.Tensor:  # noqa: D102
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return -ctx.lambd * grad, None


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    """Gradient reversal layer with strength ``lambd >= 0`` (any shape)."""
    if lambd < 0:
        raise ValueError(f"gradient reversal strength must be non-negative, got {lambd}")
    return GradReverse.apply(x, lambd)


def domain_losses(model: MeduetModel, demixed: Demixed, domain: torch.Tensor, *,
                  grl_lambda: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Site cross-entropies of content (adversarial) and style, averaged over both sources.

    Args:
        model: owns ``content_domain_head`` and ``style_domain_head``.
        demixed: factor token groups of the mixed batch.
        domain: ``(B,)`` integer site labels; the partner's labels are ``domain.flip(0)``.
        grl_lambda: gradient reversal strength for the content branch.

    Returns:
        ``(L_dc, L_ds)`` scalars.
    """
    if domain.ndim != 1 or domain.shape[0] != demixed.cls.shape[0]:
        raise ValueError(f"domain must be (B,) = ({demixed.cls.shape[0]},), got {tuple(domain.shape)}")
    labels = torch.cat([domain, domain.flip(0)]).long()  # (2B,) own sources, then partner sources
    # Pool each group separately (they may differ in size), then classify both at once.
    content = torch.cat([demixed.content_own.mean(1), demixed.content_partner.mean(1)])  # (2B, E)
    style = torch.cat([demixed.style_own.mean(1), demixed.style_partner.mean(1)])  # (2B, S)
    # Both sources have B samples, so the mean over 2B is the average of the two per-source means.
    loss_content = F.cross_entropy(model.content_domain_head(grad_reverse(content, grl_lambda)), labels)
    loss_style = F.cross_entropy(model.style_domain_head(style), labels)
    return loss_content, loss_style
