"""Token mixing, demixing and dual reconstruction (method steps 1-3).

Sample ``i`` is paired with its partner ``B-1-i`` (the batch flipped). A boolean mask ``M``
``(B, N)`` marks the tokens of the mixed sequence that come from the partner (``True``); the
others are the sample's own ("own" = source 1, "partner" = source 2). Every sample has the
same number ``k = round(r*N)`` of partner tokens so the two groups stack into tensors.

Inside a group tokens keep their raster order; ``unmix``/``remix`` are exact inverses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from meduet.models.blocks import patchify
from meduet.models.meduet import MeduetModel


def random_mix_mask(batch: int, num_tokens: int, ratio: float, *, device: torch.device | str = "cpu",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw a random mixing mask with exactly ``round(ratio*N)`` partner tokens per sample.

    Returns:
        ``(B, N)`` bool, ``True`` where the token comes from the partner.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mixing ratio must lie in (0, 1), got {ratio}")
    k = round(ratio * num_tokens)
    noise = torch.rand(batch, num_tokens, generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # (B, N): each token's rank, a random permutation
    return ranks < k


def check_mask(mask: torch.Tensor, ratio: float) -> int:
    """Validate a mixing mask and return ``k``, its number of partner tokens per sample.

    Raises:
        ValueError: wrong dtype/rank, odd batch, or a row without exactly ``round(ratio*N)`` ones.
    """
    if mask.dtype != torch.bool or mask.ndim != 2:
        raise ValueError(f"mask must be a (B, N) bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    if mask.shape[0] % 2:
        raise ValueError(f"mixing pairs sample i with B-1-i, so the batch must be even, got {mask.shape[0]}")
    k = round(ratio * mask.shape[1])
    counts = mask.sum(dim=1)
    if (counts != k).any():
        raise ValueError(f"every mask row needs exactly round({ratio}*{mask.shape[1]}) = {k} partner tokens, "
                         f"got {counts.tolist()}")
    return k


def mix_tokens(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace the masked tokens of each sample by its partner's tokens at the same positions.

    Args:
        tokens: ``(B, N, E)`` (position embedding already added, so positions stay truthful).
        mask: ``(B, N)`` bool.

    Returns:
        ``(B, N, E)`` mixed sequence.
    """
    return torch.where(mask[..., None], tokens.flip(0), tokens)


def _group_order(mask: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` token indices: own positions (ascending) first, then partner positions."""
    return torch.argsort(mask.to(torch.uint8), dim=1, stable=True)


def unmix(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a mixed sequence into its own-source and partner-source token groups.

    Args:
        tokens: ``(B, N, E)``.
        mask: ``(B, N)`` bool with ``k`` ones per row.

    Returns:
        ``own (B, N-k, E)`` and ``partner (B, k, E)``, each in raster order.
    """
    k = int(mask[0].sum())
    order = _group_order(mask)
    grouped = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))  # (B, N, E)
    return grouped[:, : tokens.shape[1] - k], grouped[:, tokens.shape[1] - k:]


def remix(own: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put two token groups back at their positions (inverse of ``unmix``).

    Args:
        own: ``(B, N-k, E)``; partner: ``(B, k, E)``; mask: ``(B, N)`` bool.

    Returns:
        ``(B, N, E)``.
    """
    grouped = torch.cat([own, partner], dim=1)  # (B, N, E) in group order
    order = _group_order(mask)
    return torch.empty_like(grouped).scatter(1, order[..., None].expand(-1, -1, grouped.shape[-1]), grouped)


@dataclass(frozen=True)
class Demixed:
    """Factor tokens of both sources of a mixed batch (step 2).

    ``content_own (B, N-k, E)``, ``style_own (B, N-k, S)``, ``content_partner (B, k, E)``,
    ``style_partner (B, k, S)``, ``cls (B, 1, E)`` (the encoder's class token).
    """

    content_own: torch.Tensor
    style_own: torch.Tensor
    content_partner: torch.Tensor
    style_partner: torch.Tensor
    cls: torch.Tensor


def encode_demix(model: MeduetModel, x: torch.Tensor, mask: torch.Tensor) -> Demixed:
    """Steps 1-2: embed, mix with the partner, encode, split by source, factorize.

    Args:
        model: the latent ViT.
        x: clean latents ``(B, C, d, h, w)``.
        mask: ``(B, N)`` bool mixing mask.
    """
    cls, z = model.encode_tokens(mix_tokens(model.embed(x), mask))  # (B, 1, E), (B, N, E)
    own, partner = unmix(z, mask)
    c_own, s_own = model.factorize(own)
    c_partner, s_partner = model.factorize(partner)
    return Demixed(c_own, s_own, c_partner, s_partner, cls)


def fuse(model: MeduetModel, demixed: Demixed, mask: torch.Tensor, *, swap_style: bool = False) -> torch.Tensor:
    """Entangle each group's content with a style and put the fused tokens back in place.

    With ``swap_style`` the groups exchange styles (views ``(c1, s2)`` and ``(c2, s1)``), which
    needs both groups to have the same number of tokens (mixing ratio 0.5).

    Returns:
        ``(B, N, E)`` fused tokens at the mixed positions.
    """
    s_own, s_partner = demixed.style_own, demixed.style_partner
    if swap_style:
        if s_own.shape[1] != s_partner.shape[1]:
            raise ValueError(f"swapping styles needs equal token groups (mixing ratio 0.5), got "
                             f"{s_own.shape[1]} own and {s_partner.shape[1]} partner tokens")
        s_own, s_partner = s_partner, s_own
    return remix(model.entangle(demixed.content_own, s_own), model.entangle(demixed.content_partner, s_partner),
                 mask)


def reconstruction_loss(pred: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, *, patch_size: int,
                        norm_pix: bool = False) -> torch.Tensor:
    """MSE of the dual reconstruction on the positions each decoder pass had to infer.

    Pass 1 (first ``B`` rows of ``pred``) saw the own tokens and predicts sample ``i``; pass 2
    saw the partner tokens and predicts sample ``B-1-i``. Unmixing the two (``x`` and
    ``x.flip(0)`` as targets) gives each source a prediction on the tokens it did not show.

    Args:
        pred: ``(2B, N, p**3 * C)`` decoder output of ``MeduetModel.decode_dual``.
        x: clean latents ``(B, C, d, h, w)``.
        mask: ``(B, N)`` bool mixing mask.
        patch_size: ``p``.
        norm_pix: normalise each target patch to zero mean, unit variance (MAE's option).

    Returns:
        scalar loss.
    """
    target = patchify(x, patch_size)  # (B, N, p^3 C)
    target = torch.cat([target, target.flip(0)])  # (2B, N, p^3 C): source predicted by each pass
    return hidden_patch_mse(pred, target, torch.cat([mask, ~mask]), norm_pix=norm_pix)  # hidden: the other source


def hidden_patch_mse(pred: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor, *,
                     norm_pix: bool = False) -> torch.Tensor:
    """Mean squared error of predicted patches ``(B, N, P)`` against ``target`` on the ``hidden (B, N)`` positions.

    With ``norm_pix`` each target patch is normalised to zero mean, unit variance (MAE's option).
    """
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    weight = hidden.to(pred.dtype)
    per_token = F.mse_loss(pred, target, reduction="none").mean(-1)  # (B, N)
    return (per_token * weight).sum() / weight.sum()
