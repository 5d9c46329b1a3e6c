"""The factor-conditioned latent DiT: denoises VAE latents given MeDUET content and style.

1. tokens: ``p³`` patches of the noisy latent plus fixed sin-cos positions, and, with
   ``spatial_content``, MeDUET's content tokens of the same crop through a zero-initialised
   projection (aligned one to one: same crop and patch size), so a scan's layout can be
   kept while its style is replaced (translation);
2. conditions: a timestep embedding; a content and a style embedding
   (``L2-normalise(f) / τ → SiLU → Linear``, ``τ`` learnable from 0.1), each with a learnable
   null embedding that replaces it where the condition is dropped (classifier-free guidance);
3. adaLN-Zero blocks: LayerNorm shift and scale come from content + style, the residual
   gates from the timestep; both projections start at zero, so every block starts as the
   identity and a fresh model predicts 0;
4. final layer: adaLN (shift/scale from all conditions), a zero-initialised linear to
   patches, unpatchify.

Shapes: latents ``(B, C, d, h, w)``; ``N = d*h*w / p**3`` tokens of width ``D``; content
vector ``(B, E)``, style vector ``(B, S)``, content tokens ``(B, N, E)``; timesteps ``(B,)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from meduet.models.architectures import DIT_PRESETS as PRESETS
from meduet.models.architectures import DiTArchitecture
from meduet.models.blocks import Attention, PatchEmbed3d, sincos_pos_embed_3d, unpatchify
from meduet.models.lean_linear import GeluMlp

__all__ = ["PRESETS", "ConditionedDiT", "DiTArchitecture", "DiTBlock", "FactorEmbedder", "TimestepEmbedder"]


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps: ``(B,)`` -> ``(B, dim)``, cosines then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    """``t (B,)`` -> ``(B, D)``: sinusoidal features, then ``Linear → SiLU → Linear``."""

    def __init__(self, *, hidden: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class FactorEmbedder(nn.Module):
    """A MeDUET factor vector ``(B, F)`` -> ``(B, D)``, or the learnable null embedding where dropped.

    The factor is L2-normalised and divided by a learnable temperature (so only its direction
    conditions, at a learnt sharpness), then ``SiLU → Linear``.

    Args:
        factor_dim: ``F`` (``E`` for content, ``S`` for style).
        hidden: ``D``.
        temperature: initial ``τ``.
    """

    def __init__(self, *, factor_dim: int, hidden: int, temperature: float = 0.1) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))  # τ = exp(·) stays positive
        self.proj = nn.Linear(factor_dim, hidden)
        self.null = nn.Parameter(torch.randn(hidden) * 0.02)

    def forward(self, factor: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """``factor (B, F)``, ``drop (B,)`` bool (``True``: the null embedding) -> ``(B, D)``."""
        emb = self.proj(F.silu(F.normalize(factor, dim=-1) / self.log_temperature.exp()))
        if drop is None:
            return emb
        return torch.where(drop[:, None], self.null.to(emb.dtype), emb)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x (B, N, D) * (1 + scale) + shift`` with ``shift, scale (B, 1, D)``."""
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block: shift/scale from the factors, gates from the timestep.

    ``x + g_a(t) · attn(LN(x)(1 + a_a(c)) + b_a(c))``, then the same with the MLP; ``c`` is the
    summed content and style embedding. Sub-layer names match ``TransformerBlock``'s
    (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) so MeDUET weights map onto them.
    """

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim=dim, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = GeluMlp(dim=dim, hidden=int(dim * mlp_ratio))
        self.modulation = nn.Linear(dim, 4 * dim)  # shift/scale of both norms, from the factors
        self.gates = nn.Linear(dim, 2 * dim)  # residual gates, from the timestep

    def forward(self, x: torch.Tensor, cond: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """``x (B, N, D)``, factor embedding ``cond (B, D)``, timestep embedding ``time (B, D)`` -> ``(B, N, D)``."""
        shift1, scale1, shift2, scale2 = self.modulation(F.silu(cond))[:, None].chunk(4, dim=-1)  # 4 x (B, 1, D)
        gate1, gate2 = self.gates(F.silu(time))[:, None].chunk(2, dim=-1)  # 2 x (B, 1, D)
        x = x + gate1 * self.attn(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN then a linear map to flat patches: ``(B, N, D)`` -> ``(B, N, p³ C)``."""

    def __init__(self, *, dim: int, patch_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, patch_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(cond))[:, None].chunk(2, dim=-1)  # 2 x (B, 1, D)
        return self.linear(_modulate(self.norm(x), shift, scale))


class ConditionedDiT(nn.Module):
    """Latent DiT conditioned on MeDUET content (vector and, optionally, tokens) and style.

    Args:
        config: network shape; see ``DiTArchitecture`` (``PRESETS`` holds named ones).
    """

    def __init__(self, config: DiTArchitecture) -> None:
        super().__init__()
        if not isinstance(config, DiTArchitecture):
            raise ValueError(f"config must be a DiTArchitecture, got {type(config).__name__}")
        self.config = cfg = config
        d = cfg.hidden_size

        # 1. tokens
        self.patch_embed = PatchEmbed3d(in_channels=cfg.in_channels, embed_dim=d, patch_size=cfg.patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_3d(d, cfg.grid)[None], persistent=False)  # (1, N, D)
        if cfg.spatial_content:
            self.content_tokens = nn.Linear(cfg.content_dim, d)
            self.content_tokens_null = nn.Parameter(torch.zeros(d))
        # 2. conditions
        self.t_embedder = TimestepEmbedder(hidden=d, frequency_dim=cfg.frequency_dim)
        self.content_embedder = FactorEmbedder(factor_dim=cfg.content_dim, hidden=d, temperature=cfg.temperature)
        self.style_embedder = FactorEmbedder(factor_dim=cfg.style_dim, hidden=d, temperature=cfg.temperature)
        # 3. blocks, 4. output
        self.blocks = nn.ModuleList(DiTBlock(dim=d, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio)
                                    for _ in range(cfg.depth))
        self.final = FinalLayer(dim=d, patch_dim=cfg.patch_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for mlp in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(mlp.weight, std=0.02)
        # adaLN-Zero: zero modulation, gates and output, so each block starts as the identity;
        # the content-token projection starts at zero too, so the spatial path joins gradually.
        zeroed = [self.final.modulation, self.final.linear] + [layer for block in self.blocks
                                                               for layer in (block.modulation, block.gates)]
        if self.config.spatial_content:
            zeroed.append(self.content_tokens)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, content: torch.Tensor, style: torch.Tensor,
                content_tokens: torch.Tensor | None = None, *, drop_content: torch.Tensor | None = None,
                drop_style: torch.Tensor | None = None, drop_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """The prediction (``ε`` or velocity) for noisy latents ``x (B, C, d, h, w)``; see ``forward_features``."""
        return self.forward_features(x, t, content, style, content_tokens, drop_content=drop_content,
                                     drop_style=drop_style, drop_tokens=drop_tokens)[0]

    def forward_features(self, x: torch.Tensor, t: torch.Tensor, content: torch.Tensor, style: torch.Tensor,
                         content_tokens: torch.Tensor | None = None, *, drop_content: torch.Tensor | None = None,
                         drop_style: torch.Tensor | None = None, drop_tokens: torch.Tensor | None = None,
                         layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prediction and, for REPA, the tokens after block ``layer``.

        Args:
            x: noisy latents ``(B, C, d, h, w)``.
            t: timesteps ``(B,)`` on the embedder's scale (``process.model_time``).
            content: ``(B, E)``; style: ``(B, S)`` (MeDUET token means).
            content_tokens: ``(B, N, E)`` MeDUET content tokens of a crop aligned with ``x``;
                ``None``: the null tokens (generation from vectors). Needs ``spatial_content``.
            drop_content, drop_style, drop_tokens: ``(B,)`` bool; ``True`` replaces that
                condition by its null embedding (``None``: keep all).
            layer: 1-based block whose output tokens to return (``None``: none).

        Returns:
            ``(B, C, d, h, w)`` prediction and ``(B, N, D)`` tokens after block ``layer`` (or ``None``).
        """
        cfg = self.config
        if tuple(x.shape[1:]) != (cfg.in_channels, *cfg.input_size):
            raise ValueError(f"expected latents (B, {cfg.in_channels}, {cfg.input_size}), got {tuple(x.shape)}")
        if layer is not None and not 1 <= layer <= cfg.depth:
            raise ValueError(f"layer must lie in 1..{cfg.depth}, got {layer}")
        tokens = self.patch_embed(x) + self.pos_embed  # (B, N, D)
        if content_tokens is not None and not cfg.spatial_content:
            raise ValueError("content_tokens given to a DiT built without spatial_content")
        if cfg.spatial_content:
            tokens = tokens + self._content_tokens(content_tokens, drop_tokens, tokens)

        cond = self.content_embedder(content, drop_content) + self.style_embedder(style, drop_style)  # (B, D)
        time = self.t_embedder(t)  # (B, D)
        captured = None
        for index, block in enumerate(self.blocks, start=1):
            tokens = block(tokens, cond, time)
            if index == layer:
                captured = tokens
        patches = self.final(tokens, cond + time)  # (B, N, p^3 C)
        return unpatchify(patches, cfg.patch_size, cfg.grid, cfg.in_channels), captured

    def _content_tokens(self, content_tokens: torch.Tensor | None, drop: torch.Tensor | None,
                        like: torch.Tensor) -> torch.Tensor:
        """Projected content tokens ``(B, N, D)``, the null embedding where dropped or absent."""
        null = self.content_tokens_null.to(like.dtype)
        if content_tokens is None:
            return null.expand_as(like)
        expected = (like.shape[0], self.config.num_tokens, self.config.content_dim)
        if tuple(content_tokens.shape) != expected:
            raise ValueError(f"content_tokens must be {expected} (aligned with the DiT's tokens), got "
                             f"{tuple(content_tokens.shape)}")
        projected = self.content_tokens(content_tokens)  # (B, N, D)
        return projected if drop is None else torch.where(drop[:, None, None], null.to(projected.dtype), projected)
