"""Segmentation over VAE latents with the MeDUET encoder as backbone (UNETR-style, MONAI blocks).

The encoder reads a latent window ``(B, C, d, h, w)`` (scaled latents, the pretraining crop)
and returns ``N = d*h*w / p**3`` tokens. The head, in two variants (``decoder``):

- ``upsample`` (the authors): tokens upsampled to the latent grid, joined with a stem of
  the latent itself, latent logits ``(B, K, d, h, w)`` upsampled 4x trilinearly;
- ``refine``: those upsampled logits plus a correction computed at image resolution from
  features of the harmonized image window ``(B, 1, 4d, 4h, 4w)`` next to the logits (the skip
  the latent lost: organ boundaries sit between latent voxels).

Both return logits at image resolution ``(B, K, 4d, 4h, 4w)``. Shapes: ``E`` encoder width,
``F`` head channels, ``Fi`` image-resolution channels, ``K`` classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from monai.networks.blocks import UnetOutBlock, UnetResBlock, UnetrUpBlock
from torch import nn

from meduet.models.architectures import MeduetArchitecture, SegmenterArchitecture
from meduet.models.meduet import MeduetModel

_NORM = "instance"
# Backbone parameters the segmenter uses; the MAE decoder, factor and site heads stay frozen
# (no gradient ever reaches them, and DDP refuses parameters without one).
ENCODER_PREFIXES = ("patch_embed.", "cls_token", "blocks.", "norm.")


class LatentSegmenter(nn.Module):
    """MeDUET encoder plus a segmentation head.

    Args:
        backbone: the MeDUET network shape (its encoder is used; weights loaded by the caller).
        config: the head's shape; see ``SegmenterArchitecture``.
    """

    def __init__(self, backbone: MeduetArchitecture, config: SegmenterArchitecture) -> None:
        super().__init__()
        if not isinstance(config, SegmenterArchitecture):
            raise ValueError(f"config must be a SegmenterArchitecture, got {type(config).__name__}")
        self.config = config
        self.encoder = MeduetModel(backbone)
        for name, param in self.encoder.named_parameters():
            param.requires_grad_(name.startswith(ENCODER_PREFIXES))
        e, f, k = backbone.embed_dim, config.features, config.num_classes
        # 1. latent grid: a stem of the latent as the skip of the upsampled tokens
        self.latent_stem = UnetResBlock(3, backbone.in_channels, f, kernel_size=3, stride=1, norm_name=_NORM)
        self.up_tokens = UnetrUpBlock(3, e, f, kernel_size=3, upsample_kernel_size=backbone.patch_size,
                                      norm_name=_NORM, res_block=True)
        self.out = UnetOutBlock(3, f, k)
        # 2. image grid (refine only): a residual correction of the upsampled logits from the image's own
        #    features next to those logits; zero at the start, so refine begins where upsample is
        if config.decoder == "refine":
            fi = config.image_features
            self.image_stem = UnetResBlock(3, 1, fi, kernel_size=3, stride=1, norm_name=_NORM)
            self.refine = UnetResBlock(3, fi + k, fi, kernel_size=3, stride=1, norm_name=_NORM)
            self.refine_out = UnetOutBlock(3, fi, k)
            nn.init.zeros_(self.refine_out.conv.conv.weight)
            nn.init.zeros_(self.refine_out.conv.conv.bias)

    @property
    def window(self) -> tuple[int, int, int]:
        """The latent window ``(d, h, w)`` the encoder reads."""
        return tuple(self.encoder.config.input_size)  # type: ignore[return-value]

    @property
    def image_window(self) -> tuple[int, int, int]:
        """The matching image window ``(4d, 4h, 4w)``."""
        return tuple(n * self.config.downsample for n in self.window)  # type: ignore[return-value]

    def forward(self, latent: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at image resolution.

        Args:
            latent: ``(B, C, d, h, w)`` scaled latents (the encoder's input size).
            image: ``(B, 1, 4d, 4h, 4w)`` harmonized image window over the same voxels; needed
                by ``refine``, ignored by ``upsample``.

        Returns:
            ``(B, K, 4d, 4h, 4w)`` logits.
        """
        _, tokens = self.encoder.encode_tokens(self.encoder.embed(latent))  # (B, N, E)
        gd, gh, gw = self.encoder.config.grid
        grid = rearrange(tokens, "b (d h w) e -> b e d h w", d=gd, h=gh, w=gw)  # (B, E, d/p, h/p, w/p)
        features = self.up_tokens(grid, self.latent_stem(latent))  # (B, F, d, h, w)
        coarse = F.interpolate(self.out(features), scale_factor=self.config.downsample, mode="trilinear",
                               align_corners=False)  # (B, K, 4d, 4h, 4w)
        if self.config.decoder == "upsample":
            return coarse
        if image is None or tuple(image.shape[2:]) != tuple(coarse.shape[2:]):
            raise ValueError(f"the refine decoder needs the image window (B, 1, {tuple(coarse.shape[2:])}), got "
                             f"{None if image is None else tuple(image.shape)}")
        fine = self.refine(torch.cat([self.image_stem(image), coarse], dim=1))  # (B, Fi, 4d, 4h, 4w)
        return coarse + self.refine_out(fine)  # (B, K, 4d, 4h, 4w)
