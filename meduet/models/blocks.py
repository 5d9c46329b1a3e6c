"""Vision-transformer building blocks shared by the latent ViT (MeDUET) and the diffusion models.

- ``PatchEmbed3d``: non-overlapping 3-D patches of a latent ``(B, C, d, h, w)`` to tokens ``(B, N, E)``.
- ``sincos_pos_embed_3d``: the fixed (not learned) 3-D sine-cosine position table.
- ``TransformerBlock``: pre-norm attention + MLP using ``scaled_dot_product_attention``; its
  matrices are ``meduet.models.lean_linear`` layers, which store less for backward.
- ``patchify`` / ``unpatchify``: latents to per-token flat patches and back (reconstruction targets).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from meduet.models.architectures import Grid
from meduet.models.lean_linear import GeluMlp, LeanLinear, lean_linear, norm_linear



def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Cut a latent into flat non-overlapping patches, in the token order of ``PatchEmbed3d``.

    Args:
        x: ``(B, C, d, h, w)`` with ``d, h, w`` divisible by ``patch_size``.
        patch_size: patch edge ``p``.

    Returns:
        ``(B, N, p**3 * C)`` with ``N = d*h*w / p**3`` (raster order over the patch grid).
    """
    return rearrange(x, "b c (gd pd) (gh ph) (gw pw) -> b (gd gh gw) (pd ph pw c)",
                     pd=patch_size, ph=patch_size, pw=patch_size)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: Grid, channels: int) -> torch.Tensor:
    """Inverse of ``patchify``.

    Args:
        patches: ``(B, N, p**3 * C)``.
        patch_size: patch edge ``p``.
        grid: patch grid ``(d/p, h/p, w/p)``; its product must be ``N``.
        channels: ``C``.

    Returns:
        ``(B, C, d, h, w)``.
    """
    gd, gh, gw = grid
    return rearrange(patches, "b (gd gh gw) (pd ph pw c) -> b c (gd pd) (gh ph) (gw pw)",
                     gd=gd, gh=gh, gw=gw, pd=patch_size, ph=patch_size, pw=patch_size, c=channels)


class PatchEmbed3d(nn.Module):
    """Linear embedding of non-overlapping ``p³`` patches (a strided ``Conv3d``).

    Args:
        in_channels: latent channels ``C``.
        embed_dim: token width ``E``.
        patch_size: patch edge ``p`` (kernel = stride).
    """

    def __init__(self, *, in_channels: int = 4, embed_dim: int = 768, patch_size: int = 4) -> None:
        super().__init__()
        if min(in_channels, embed_dim, patch_size) < 1:
            raise ValueError(f"in_channels, embed_dim and patch_size must be positive, got "
                             f"{in_channels}, {embed_dim}, {patch_size}")
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        # Initialise like a linear layer on the flattened patch (as MAE does), not like a conv.
        nn.init.xavier_uniform_(self.proj.weight.view(embed_dim, -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, d, h, w)`` -> ``(B, N, E)``, ``N = d*h*w / p**3`` in raster order."""
        if any(n % self.patch_size for n in x.shape[2:]):
            raise ValueError(f"latent grid {tuple(x.shape[2:])} is not divisible by patch size {self.patch_size}")
        return rearrange(self.proj(x), "b e gd gh gw -> b (gd gh gw) e")  # (B, N, E)


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``(L,)`` positions -> ``(L, dim)``: ``dim/2`` sines then ``dim/2`` cosines (MAE frequencies)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]  # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_3d(embed_dim: int, grid: Grid, cls_token: bool = False) -> torch.Tensor:
    """Fixed 3-D sine-cosine position embedding.

    Each axis gets ``2 * (E // 6)`` channels (half sines, half cosines); when ``E`` is not a
    multiple of 6 the few channels left over are zero, so any width works (tiny test models).

    Args:
        embed_dim: ``E``.
        grid: patch grid ``(gd, gh, gw)``.
        cls_token: prepend an all-zero row for the class token.

    Returns:
        ``(N, E)`` (or ``(1 + N, E)`` with ``cls_token``), float32, raster order like ``PatchEmbed3d``.
    """
    axis_dim = 2 * (embed_dim // 6)
    if axis_dim == 0:
        raise ValueError(f"embed_dim must be at least 6 for a 3-D sin-cos embedding, got {embed_dim}")
    coords = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    parts = [_sincos_1d(axis_dim, c.reshape(-1)) for c in coords]  # 3 x (N, axis_dim)
    table = torch.zeros(math.prod(grid), embed_dim, dtype=torch.float64)
    table[:, : 3 * axis_dim] = torch.cat(parts, dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table], dim=0)
    return table.float()


class Attention(nn.Module):
    """Multi-head self-attention on ``(B, N, E)`` via ``F.scaled_dot_product_attention``."""

    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # applied through lean_linear / norm_linear
        self.proj = LeanLinear(dim, dim)

    def forward(self, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """``(B, N, E)`` -> ``(B, N, E)``; ``norm`` (the block's pre-norm) is fused into the qkv projection."""
        qkv = lean_linear(x, self.qkv.weight, self.qkv.bias) if norm is None else norm_linear(
            x, norm, self.qkv.weight, self.qkv.bias)
        q, k, v = rearrange(qkv, "b n (three h e) -> three b h n e", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, E/heads)
        return self.proj(rearrange(out, "b h n e -> b n (h e)"))  # (B, N, E)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    Args:
        dim: token width.
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: hidden width of the MLP relative to ``dim``.
    """

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim=dim, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = GeluMlp(dim=dim, hidden=int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, E)`` -> ``(B, N, E)``."""
        x = x + self.attn(x, self.norm1)
        return x + self.mlp(x, self.norm2)
