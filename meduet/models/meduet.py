"""The MeDUET latent ViT: encoder, content/style factor heads, entangler and MAE-style decoder.

This module holds the network's parts; the pretext pipeline that strings them together
(mixing, demixing, dual reconstruction) lives in ``meduet.losses.mixing`` and the losses next
to it, so the same parts serve pretraining, the EMA teacher and downstream feature extraction.

Shapes: latents ``(B, C, d, h, w)``; ``N = d*h*w / p**3`` tokens; widths ``E`` (encoder),
``S = s_ratio * E`` (style), ``Ed`` (decoder); ``K`` sites.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from meduet.models.architectures import MEDUET_PRESETS as PRESETS
from meduet.models.architectures import MeduetArchitecture
from meduet.models.blocks import PatchEmbed3d, TransformerBlock, sincos_pos_embed_3d, unpatchify

__all__ = ["PRESETS", "MeduetArchitecture", "MeduetModel"]


def _domain_mlp(width: int, num_domains: int) -> nn.Sequential:
    """Site classifier ``width -> 2 width -> 2 width -> K`` on mean-pooled factor tokens."""
    return nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, 2 * width), nn.ReLU(),
                         nn.Linear(2 * width, num_domains))


class MeduetModel(nn.Module):
    """Latent ViT encoder with content/style factor heads and an MAE-style decoder.

    Args:
        config: network shape; see ``MeduetArchitecture`` (``PRESETS`` holds named ones).
    """

    def __init__(self, config: MeduetArchitecture) -> None:
        super().__init__()
        if not isinstance(config, MeduetArchitecture):
            raise ValueError(f"config must be a MeduetArchitecture, got {type(config).__name__}")
        self.config = cfg = config
        e, s, ed = cfg.embed_dim, cfg.style_dim, cfg.decoder_embed_dim

        # 1. tokens: patch embedding, fixed sin-cos positions, class token
        self.patch_embed = PatchEmbed3d(in_channels=cfg.in_channels, embed_dim=e, patch_size=cfg.patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_3d(e, cfg.grid, cls_token=True)[None], persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, e))
        self.blocks = nn.ModuleList(
            TransformerBlock(dim=e, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(e, eps=1e-6)

        # 2. factor heads: content keeps the full width; style is narrow and smoothed along the
        #    token sequence (a depthwise conv), biasing it towards slowly varying appearance.
        self.content_head = nn.Linear(e, e, bias=False)
        self.style_head = nn.Linear(e, s, bias=False)
        self.style_smooth = nn.Conv1d(s, s, kernel_size=3, padding=1, groups=s, bias=False)
        self.entangler = nn.Linear(e + s, e)

        # 3. decoder
        self.decoder_embed = nn.Linear(e, ed)
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_3d(ed, cfg.grid, cls_token=True)[None],
                             persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ed))
        self.decoder_blocks = nn.ModuleList(
            TransformerBlock(dim=ed, num_heads=cfg.decoder_num_heads, mlp_ratio=cfg.mlp_ratio)
            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(ed, eps=1e-6)
        self.decoder_pred = nn.Linear(ed, cfg.patch_dim)

        # 4. site classifiers and 6. SiQC temperatures (log scale, CLIP-style)
        self.content_domain_head = _domain_mlp(e, cfg.num_domains)
        self.style_domain_head = _domain_mlp(s, cfg.num_domains)
        init_scale = torch.tensor(math.log(1 / 0.07))
        self.logit_scale_content = nn.Parameter(init_scale.clone(), requires_grad=cfg.learnable_logit_scale)
        self.logit_scale_style = nn.Parameter(init_scale.clone(), requires_grad=cfg.learnable_logit_scale)

        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- encoder -------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their positions: ``(B, C, d, h, w)`` -> ``(B, N, E)``."""
        if tuple(x.shape[1:]) != (self.config.in_channels, *self.config.input_size):
            raise ValueError(f"expected latents (B, {self.config.in_channels}, {self.config.input_size}), "
                             f"got {tuple(x.shape)}")
        return self.patch_embed(x) + self.pos_embed[:, 1:]  # (B, N, E)

    def encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the encoder on embedded tokens.

        Args:
            tokens: ``(B, N, E)`` from ``embed`` (possibly mixed).

        Returns:
            ``cls (B, 1, E)`` and patch tokens ``(B, N, E)``, both layer-normed.
        """
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        z = torch.cat([cls, tokens], dim=1)  # (B, 1 + N, E)
        for block in self.blocks:
            z = block(z)
        z = self.norm(z)
        return z[:, :1], z[:, 1:]

    def factorize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Content and style tokens of a token sequence (or one source's token group).

        Args:
            z: ``(B, L, E)``.

        Returns:
            ``content (B, L, E)``, ``style (B, L, S)``.
        """
        style = rearrange(self.style_head(z), "b l s -> b s l")  # channels first for the conv
        style = rearrange(self.style_smooth(style), "b s l -> b l s")  # (B, L, S)
        return self.content_head(z), style

    def entangle(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """Fuse content ``(B, L, E)`` and style ``(B, L, S)`` into tokens ``(B, L, E)``."""
        return self.entangler(torch.cat([content, style], dim=-1))

    def encode_full(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode unmixed latents and factorize every token.

        Args:
            x: ``(B, C, d, h, w)``.

        Returns:
            ``content (B, N, E)``, ``style (B, N, S)``, ``cls (B, 1, E)``.
        """
        cls, z = self.encode_tokens(self.embed(x))
        content, style = self.factorize(z)
        return content, style, cls

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Downstream features: ``content (B, N, E)`` and ``style (B, N, S)`` of latents ``(B, C, d, h, w)``."""
        content, style, _ = self.encode_full(x)
        return content, style

    # ---- decoder -------------------------------------------------------------------------
    def decode(self, z: torch.Tensor, cls: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Predict latent patches from tokens, with the ``hidden`` positions replaced by mask tokens.

        Args:
            z: ``(B, N, E)`` fused encoder tokens.
            cls: ``(B, 1, E)`` encoder class token.
            hidden: ``(B, N)`` bool, ``True`` where the decoder sees a mask token instead.

        Returns:
            ``(B, N, p**3 * C)`` predicted patches (see ``meduet.models.blocks.unpatchify``).
        """
        tokens = self.decoder_embed(torch.cat([cls, z], dim=1))  # (B, 1 + N, Ed)
        patches = torch.where(hidden[..., None], self.mask_token.to(tokens.dtype), tokens[:, 1:])
        y = torch.cat([tokens[:, :1], patches], dim=1) + self.decoder_pos_embed  # (B, 1 + N, Ed)
        for block in self.decoder_blocks:
            y = block(y)
        return self.decoder_pred(self.decoder_norm(y))[:, 1:]  # (B, N, p^3 C)

    def decode_dual(self, z: torch.Tensor, cls: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Both reconstructions of a mixed sequence in one decoder call of batch ``2B``.

        Pass 1 hides the partner positions (``mask``) and so predicts sample ``i``; pass 2 hides
        the own positions and predicts the partner, sample ``B-1-i``.

        Args:
            z: ``(B, N, E)`` fused tokens; cls: ``(B, 1, E)``; mask: ``(B, N)`` bool mixing mask.

        Returns:
            ``(2B, N, p**3 * C)``: pass 1 rows then pass 2 rows.
        """
        return self.decode(torch.cat([z, z]), torch.cat([cls, cls]), torch.cat([mask, ~mask]))

    def reconstruct(self, z: torch.Tensor, cls: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every position predicted the way training scores it: hidden from the decoder.

        ``decode_dual`` with the complementary halves ``mask`` / ``~mask``; each position is
        taken from the pass that hid it (as ``reconstruction_loss`` scores them). Decoding
        with nothing hidden is a setting the decoder never trained on.

        Args:
            z: ``(B, N, E)`` fused tokens; cls: ``(B, 1, E)``; mask: ``(B, N)`` bool split.

        Returns:
            ``(B, N, p**3 * C)`` predicted patches.
        """
        first, second = self.decode_dual(z, cls, mask).chunk(2)  # pass 1 hid mask, pass 2 hid ~mask
        return torch.where(mask[..., None], first, second)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Decoder output ``(B, N, p**3 * C)`` -> latents ``(B, C, d, h, w)``."""
        return unpatchify(patches, self.config.patch_size, self.config.grid, self.config.in_channels)
