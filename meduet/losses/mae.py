"""The masked-autoencoder baseline (``pretrain.objective: mae``): MeDUET's network without MeDUET.

The same encoder, factor heads and decoder as ``pretrain_losses`` trains, on the same latent
crops, with every MeDUET ingredient off: no partner mixing (the hidden tokens are dropped, as
MAE does, instead of filled by another volume), no site supervision, no MFTD, no SiQC. What a
downstream task gains over this baseline is what those ingredients add, not what masked
reconstruction on these latents gives any encoder.
"""

from __future__ import annotations

import torch

from meduet.losses.mixing import check_mask, hidden_patch_mse, remix, unmix
from meduet.models.blocks import patchify
from meduet.models.meduet import MeduetModel


def mae_loss(student: MeduetModel, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reconstruction of the hidden tokens from the visible ones.

    Args:
        student: the trained model.
        x: latent crops ``(B, C, d, h, w)``.
        mask: ``(B, N)`` bool, ``True`` where a token is hidden from the encoder (``k`` per row,
            ``k = round(mask_ratio * N)``, as the mixing masks).

    Returns:
        scalar MSE on the hidden positions.
    """
    cfg = student.config
    check_mask(mask, cfg.mask_ratio)
    visible, hidden = unmix(student.embed(x), mask)  # (B, N-k, E), (B, k, E); positions already added
    cls, z = student.encode_tokens(visible)
    content, style = student.factorize(z)
    fused = remix(student.entangle(content, style), torch.zeros_like(hidden), mask)  # (B, N, E)
    pred = student.decode(fused, cls, mask)  # the decoder sees its mask token at every hidden position
    return hidden_patch_mse(pred, patchify(x, cfg.patch_size), mask, norm_pix=cfg.norm_pix_loss)
