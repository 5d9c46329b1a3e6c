"""Losses that make the clean content factor site-free, beyond the authors' recipe (``pretrain.method``).

The authors' adversary sees only the content tokens of *mixed* sequences, one crop at a
time; evaluation reads *clean* volumes, averaged over many windows, and there the site
leaks back. These terms act on the clean encoding of each crop, pooled the way evaluation
pools:

- ``clean_site_losses``: site classifiers on per-volume means of clean content (behind the
  gradient reversal) and clean style, over the ``M`` crops of a volume in the batch;
- ``cross_correlation``: the squared cross-correlation of pooled content and pooled style
  (the authors define a decorrelation term but never use it);
- ``SiteMeanQueue``: a push that pulls the per-site means of pooled content together, in
  units of its spread, estimated over a queue of recent crops (the gradient of a linear MMD
  between each site and all of them, at full strength per crop), with no adversary to balance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meduet.losses.domain import grad_reverse
from meduet.models.meduet import MeduetModel


def pool_groups(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean of ``x (B, F)`` over rows of the same group ``groups (B,)`` (ids ``0 … G-1``): ``(G, F)``."""
    count = torch.bincount(groups).clamp_min(1).to(x.dtype)  # (G,)
    return torch.zeros(len(count), x.shape[1], dtype=x.dtype, device=x.device).index_add(0, groups, x) / count[:, None]


def clean_site_losses(model: MeduetModel, content: torch.Tensor, style: torch.Tensor, domain: torch.Tensor,
                      groups: torch.Tensor, grl_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Site cross-entropies of volume-pooled clean content (adversarial) and style.

    Args:
        content: ``(B, N, E)`` and style ``(B, N, S)`` tokens of the clean crops.
        domain: ``(B,)`` sites; groups: ``(B,)`` volume slot of each crop.

    Returns:
        ``(L_content, L_style)`` scalars.
    """
    sites = torch.zeros(int(groups.max()) + 1, dtype=torch.long, device=domain.device).index_copy(0, groups, domain)
    pooled_content = pool_groups(content.mean(1), groups)  # (G, E)
    pooled_style = pool_groups(style.mean(1), groups)  # (G, S)
    loss_content = F.cross_entropy(model.content_domain_head(grad_reverse(pooled_content, grl_lambda)), sites)
    loss_style = F.cross_entropy(model.style_domain_head(pooled_style), sites)
    return loss_content, loss_style


def cross_correlation(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Mean squared entry of the ``(E, S)`` correlation matrix of ``content (B, E)`` and ``style (B, S)``."""
    def standardise(x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(0)) / (x.std(0) + 1e-6)

    return (standardise(content).T @ standardise(style) / (len(content) - 1)).pow(2).mean()


class SiteMeanQueue(nn.Module):
    """Pulls the per-site means of pooled content together, estimated over a queue of recent crops.

    Each crop's content tokens are pooled (token mean: the vector a linear probe on volume
    averages sees) and every channel is measured in units of the queue's standard deviation.
    Over the queue and the batch, site ``k``'s mean sits ``d_k = mu_k - mu`` from the mean of
    all. ``forward`` returns ``mean_i <d_{k(i)}, x_i>`` over the batch with ``d`` held
    constant: its gradient moves every crop of site ``k`` by ``-d_k``, a push that vanishes
    when the site means agree. (The spread itself, ``sum_k (n_k/n) mean(d_k²)``, would pass each
    crop only ``1/n_k`` of the push: with a long queue, nothing.) The returned value is that
    spread, so the loss history shows it; the gradient is the push's. The queue is a buffer:
    checkpointed with the module, so a resumed run continues with the same queue.

    Args:
        size: crops kept; width: ``E``.
    """

    def __init__(self, size: int, width: int) -> None:
        super().__init__()
        self.register_buffer("features", torch.zeros(size, width))
        self.register_buffer("sites", torch.full((size,), -1, dtype=torch.long))  # -1: empty slot
        self.register_buffer("cursor", torch.zeros((), dtype=torch.long))

    def forward(self, content: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """The spread (value) and push (gradient) for content tokens ``(B, N, E)`` of sites ``(B,)``."""
        pooled = content.float().mean(1)  # (B, E)
        filled = self.sites >= 0
        with torch.no_grad():
            features = torch.cat([self.features[filled], pooled])
            sites = torch.cat([self.sites[filled], domain])
            scale = features.std(0).clamp_min(1e-6) if len(features) > 1 else torch.ones_like(pooled[0])
            mean = (features / scale).mean(0)
            offsets = torch.zeros(int(sites.max()) + 1, pooled.shape[1], device=pooled.device)
            spread = pooled.new_zeros(())
            for site in sites.unique():
                members = sites == site
                offsets[site] = (features[members] / scale).mean(0) - mean
                spread += members.float().mean() * offsets[site].pow(2).mean()
        self._enqueue(pooled.detach(), domain)
        push = (offsets[domain] * (pooled / scale)).sum(1).mean() / pooled.shape[1]
        return push - push.detach() + spread  # value: the spread; gradient: the push

    @torch.no_grad()
    def _enqueue(self, pooled: torch.Tensor, domain: torch.Tensor) -> None:
        index = (self.cursor + torch.arange(len(pooled), device=pooled.device)) % len(self.sites)
        self.features[index] = pooled.to(self.features.dtype)
        self.sites[index] = domain
        self.cursor.copy_((self.cursor + len(pooled)) % len(self.sites))
