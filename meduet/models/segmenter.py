"""Segmentation over VAE latents with the MeDUET encoder as backbone (UNETR-style, MONAI blocks).

The encoder reads a latent window ``(B, C, d, h, w)`` (scaled latents, the pretraining crop)
and returns ``N = d*h*w / p**3`` tokens. The head, in two variants (``decoder``):

- ``upsample`` (the authors): tokens upsampled to the latent grid, joined with a stem of
  the latent itself, latent logits ``(B, K, d, h, w)`` upsampled 4x trilinearly;
- ``refine``: those upsampled logits plus a correction computed at image resolution from
  features of the harmonized image window ``(B, 1, 4d, 4h, 4w)`` next to the logits (the skip
  the latent lost: organ boundaries sit between latent voxels).

With ``body_context`` the image window also carries ``X = 3`` channels saying where it lies in
the patient (``meduet.data.body``: inside the body or not, left-right and front-back position),
read at image resolution and, average-pooled, by the latent stem: without them a window inside
a lung reads exactly as the air around the patient. Instance normalisation removes each
window's mean, so a context constant over the window (inside a lung: all of it) reaches the
logits only through the convolutions' zero padding at the window's borders; the context
therefore also enters after the last normalisation, in a per-voxel correction of the latent
logits (all labels, seed 0, 300 steps: large organs 0.418 without that correction, 0.744 with it).

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
_IMAGE_LAYOUT = torch.channels_last_3d
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
        e, f, k, x = backbone.embed_dim, config.features, config.num_classes, config.context_channels
        # 1. latent grid: a stem of the latent (and the pooled body context) as the skip of the upsampled tokens
        self.latent_stem = UnetResBlock(3, backbone.in_channels + x, f, kernel_size=3, stride=1, norm_name=_NORM)
        self.up_tokens = UnetrUpBlock(3, e, f, kernel_size=3, upsample_kernel_size=backbone.patch_size,
                                      norm_name=_NORM, res_block=True)
        self.out = UnetOutBlock(3, f, k)
        if x:  # (features, context) -> logit correction; no normalisation, zero at the start
            self.context_out = nn.Sequential(nn.Conv3d(f + x, f, 1), nn.LeakyReLU(0.01), nn.Conv3d(f, k, 1))
            nn.init.zeros_(self.context_out[-1].weight)
            nn.init.zeros_(self.context_out[-1].bias)
        # 2. image grid (refine only): a residual correction of the upsampled logits from the image's own
        #    features next to those logits; zero at the start, so refine begins where upsample is
        if config.decoder == "refine":
            fi = config.image_features
            self.image_stem = UnetResBlock(3, 1 + x, fi, kernel_size=3, stride=1, norm_name=_NORM)
            self.refine = UnetResBlock(3, fi + k, fi, kernel_size=3, stride=1, norm_name=_NORM)
            self.refine_out = UnetOutBlock(3, fi, k)
            nn.init.zeros_(self.refine_out.conv.conv.weight)
            nn.init.zeros_(self.refine_out.conv.conv.bias)
            # Channels-last (NDHWC) image-resolution convolutions: oneDNN's backward of these few-channel
            # 3-D convolutions is several times faster so (benchmarks/finetune.py: the step 1.4x at 1 thread).
            for module in (self.image_stem, self.refine, self.refine_out):
                module.to(memory_format=_IMAGE_LAYOUT)

    @property
    def window(self) -> tuple[int, int, int]:
        """The latent window ``(d, h, w)`` the encoder reads."""
        return tuple(self.encoder.config.input_size)  # type: ignore[return-value]

    @property
    def image_window(self) -> tuple[int, int, int]:
        """The matching image window ``(4d, 4h, 4w)``."""
        return tuple(n * self.config.downsample for n in self.window)  # type: ignore[return-value]

    def forward(self, latent: torch.Tensor, image: torch.Tensor | None = None, *,
                style_bank: StyleBank | None = None) -> torch.Tensor:
        """Logits at image resolution.

        Args:
            latent: ``(B, C, d, h, w)`` scaled latents (the encoder's input size).
            image: ``(B, 1 + X, 4d, 4h, 4w)`` harmonized image window over the same voxels (``X``
                body-context channels, 0 without ``body_context``); needed by ``refine`` and by
                the body context, else ignored.
            style_bank: in training, shifts the encoder tokens of some windows towards the
                bank's style (domain generalisation; see :class:`StyleBank`).

        Returns:
            ``(B, K, 4d, 4h, 4w)`` logits.
        """
        _, tokens = self.encoder.encode_tokens(self.encoder.embed(latent))  # (B, N, E)
        if style_bank is not None and self.training:
            tokens = style_bank(self.encoder, tokens)
        gd, gh, gw = self.encoder.config.grid
        grid = rearrange(tokens, "b (d h w) e -> b e d h w", d=gd, h=gh, w=gw)  # (B, E, d/p, h/p, w/p)
        if self.config.decoder == "refine" or self.config.body_context:
            self._check_image(image, latent)
        stem_input, context = latent, None
        if self.config.body_context:
            context = F.avg_pool3d(image[:, 1:], self.config.downsample)  # (B, X, d, h, w): per latent voxel's box
            stem_input = torch.cat([latent, context], dim=1)
        features = self.up_tokens(grid, self.latent_stem(stem_input))  # (B, F, d, h, w)
        logits = self.out(features)  # (B, K, d, h, w)
        if context is not None:
            logits = logits + self.context_out(torch.cat([features, context], dim=1))
        if self.config.decoder == "upsample":
            return F.interpolate(logits, scale_factor=self.config.downsample, mode="trilinear", align_corners=False)
        coarse = F.interpolate(logits.contiguous(memory_format=_IMAGE_LAYOUT), scale_factor=self.config.downsample,
                               mode="trilinear", align_corners=False)  # (B, K, 4d, 4h, 4w), channels-last
        image = image.contiguous(memory_format=_IMAGE_LAYOUT)
        fine = self.refine(torch.cat([self.image_stem(image), coarse], dim=1))  # (B, Fi, 4d, 4h, 4w)
        return coarse + self.refine_out(fine)  # (B, K, 4d, 4h, 4w)

    def _check_image(self, image: torch.Tensor | None, latent: torch.Tensor) -> None:
        expected = (1 + self.config.context_channels, *(self.config.downsample * n for n in latent.shape[2:]))
        if image is None or tuple(image.shape[1:]) != expected:
            raise ValueError(f"the segmenter ({self.config.decoder} decoder, body_context "
                             f"{self.config.body_context}) needs the image window (B, {', '.join(map(str, expected))}),"
                             f" got {None if image is None else tuple(image.shape)}")


class StyleBank(nn.Module):
    """Style-bank augmentation: encoder tokens shifted towards the running mean style of training windows.

    The bank is an exponential moving average (``momentum``) of the mean style factor of each
    training batch (windows of several volumes and sites), read with the encoder's own frozen
    MeDUET factor heads. Each window, with probability ``probability``, has its tokens moved by
    what replacing its style ``s`` with ``(1 - a) s + a s_bank`` changes in the entangled tokens,
    ``a ~ U(alpha)``: ``z + entangle(c, s') - entangle(c, s)``, so ``a = 0`` leaves ``z`` as it
    was and the anatomy (content) is kept. Random draws use the global generator, which the
    training loop checkpoints, so a resumed run draws what an uninterrupted one would.

    Args:
        style_dim: ``S``, the width of the style factor.
        momentum: weight of the old bank in each update.
        alpha: ``(low, high)`` range of the mixing weight.
        probability: share of windows augmented.
    """

    def __init__(self, style_dim: int, *, momentum: float = 0.9, alpha: tuple[float, float] = (0.2, 0.5),
                 probability: float = 0.3) -> None:
        super().__init__()
        self.momentum, self.alpha, self.probability = momentum, alpha, probability
        self.register_buffer("mean", torch.zeros(style_dim))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(self, encoder: MeduetModel, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (B, N, E)`` with some windows' style moved towards the bank; the bank then takes this batch."""
        content, style = encoder.factorize(tokens)  # (B, N, E), (B, N, S)
        batch_style = style.detach().float().mean(dim=(0, 1))  # (S,)
        augmented = tokens
        if int(self.updates) > 0:
            batch = tokens.shape[0]
            chosen = (torch.rand(batch) < self.probability).to(tokens.device)
            low, high = self.alpha
            a = (low + (high - low) * torch.rand(batch)).to(tokens.device, tokens.dtype)  # (B,)
            mixed = style + a[:, None, None] * (self.mean.to(style.dtype) - style)  # (B, N, S)
            shift = encoder.entangle(content, mixed) - encoder.entangle(content, style)  # (B, N, E)
            augmented = tokens + shift * chosen[:, None, None]  # exactly the tokens where not chosen
        with torch.no_grad():
            self.mean.copy_(batch_style if int(self.updates) == 0
                            else self.momentum * self.mean + (1 - self.momentum) * batch_style)
            self.updates += 1
        return augmented
