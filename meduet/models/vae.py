"""The frozen 3-D KL-VAE that turns harmonized volumes into latents.

Built on MONAI's MAISI autoencoder (``AutoencoderKlMaisi``): three resolution levels, i.e.
4× compression per axis, so a ``(B, 1, D, H, W)`` volume becomes ``(B, 4, D/4, H/4, W/4)``.
MAISI's tensor splitting (``num_splits``) runs convolutions chunk by chunk, which bounds
memory and changes the result by float rounding at most; the encoding stage picks the split count from
the volume size. MAISI's group norm (a Python loop of ~10 small operations per group, built to convert
each group to fp16 on a GPU) is replaced by PyTorch's one-kernel ``nn.GroupNorm``: same
parameters and state dict, same statistics (fp32, biased variance), half its peak memory (no
per-group copies to concatenate). Residual blocks and upsampling keep channels-last tensors
channels-last (MAISI copies each block's output back to NCDHW). Together with channels-last
crops and a fused AdamW, the training step of the demo preset runs 2.8x as fast as MAISI's as
shipped on CPU (``benchmarks/vae_step.py``; README).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import (
    AutoencoderKlMaisi,
    MaisiGroupNorm3D,
    MaisiResBlock,
    MaisiUpsample,
)
from torch import nn

from meduet.models.architectures import VAE_PRESETS as PRESETS
from meduet.models.architectures import VAEArchitecture

__all__ = ["PRESETS", "CheckpointMismatchError", "MeduetVAE", "VAEArchitecture", "build_vae", "decode_latent",
           "encode_volume", "load_weights", "maisi_options"]


class LayoutKeepingResBlock(MaisiResBlock):
    """MAISI's residual block, returning its sum in the layout it was computed in.

    MAISI ends the block with MONAI's ``convert_to_tensor``, which copies a channels-last result
    back to NCDHW; the next convolution then copies it to channels-last again, forward and
    backward. Same parameters and operations; values agree to rounding (group norm sums in the
    channels-last order: first-step losses within 6e-7 relative).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, D, H, W)`` -> ``(B, C_out, D, H, W)``."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h  # nin_shortcut is the identity when the channels agree


class LayoutKeepingUpsample(MaisiUpsample):
    """MAISI's trilinear 2x upsampling and convolution, without the copy back to NCDHW."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` -> ``(B, C, 2D, 2H, 2W)``."""
        if not self.use_convtranspose:
            x = F.interpolate(x, scale_factor=2.0, mode="trilinear")
        return self.conv(x)


# MAISI's modules and the subclasses that keep their parameters but not their layout copies.
_LAYOUT_KEEPING = {MaisiResBlock: LayoutKeepingResBlock, MaisiUpsample: LayoutKeepingUpsample}


class MeduetVAE(AutoencoderKlMaisi):
    """MAISI's autoencoder with PyTorch's ``nn.GroupNorm``, no layout round trips, and layout-independent samples.

    Same constructor, parameters and state dict as ``AutoencoderKlMaisi``. Three differences:
    every ``MaisiGroupNorm3D`` is swapped for an ``nn.GroupNorm`` holding the same parameters
    (see the module docstring); residual blocks and upsampling layers keep a channels-last
    tensor channels-last (:class:`LayoutKeepingResBlock`); and ``sampling`` draws its noise in
    logical (contiguous) order, so a seeded sample is the same whether the network runs
    channels-last or not (MONAI's ``randn_like`` fills memory in the tensor's own layout).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name, module in list(self.named_modules()):
            if isinstance(module, MaisiGroupNorm3D):
                native = nn.GroupNorm(module.num_groups, module.num_channels, eps=module.eps, affine=module.affine)
                native.load_state_dict(module.state_dict())
                parent_name, _, child = name.rpartition(".")
                setattr(self.get_submodule(parent_name), child, native)
            elif type(module) in _LAYOUT_KEEPING:
                # The subclass adds no state: the module keeps its parameters, only its forward changes.
                module.__class__ = _LAYOUT_KEEPING[type(module)]

    def sampling(self, z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
        """A posterior sample ``mu + eps * sigma``; ``eps ~ N(0, I)`` of ``(B, 4, d, h, w)`` in logical order."""
        eps = torch.randn(z_sigma.shape, dtype=z_sigma.dtype, device=z_sigma.device)
        return z_mu + eps * z_sigma


def maisi_options(arch: VAEArchitecture, num_splits: int = 1) -> dict:
    """``AutoencoderKlMaisi``'s keyword arguments for ``arch`` (single-channel 3-D, no attention).

    ``build_vae`` builds :class:`MeduetVAE` from them; ``AutoencoderKlMaisi(**maisi_options(arch))``
    is MONAI's network as shipped with the same parameters (the benchmarks' baseline).
    """
    n = len(arch.num_channels)
    return dict(
        spatial_dims=3, in_channels=1, out_channels=1,
        num_res_blocks=arch.num_res_blocks, num_channels=arch.num_channels,
        attention_levels=(False,) * n, latent_channels=arch.latent_channels,
        norm_num_groups=arch.norm_num_groups, with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False, include_fc=False, use_checkpointing=False,
        use_convtranspose=False, num_splits=num_splits, dim_split=1, norm_float16=False,
        print_info=False, save_mem=False,
    )


def build_vae(arch: VAEArchitecture, num_splits: int = 1) -> MeduetVAE:
    """A MAISI-style KL autoencoder for single-channel 3-D volumes.

    Args:
        arch: network shape (a preset from ``PRESETS`` or custom).
        num_splits: chunks for MAISI tensor splitting (1 = none); only changes memory use.
    """
    return MeduetVAE(**maisi_options(arch, num_splits))


class CheckpointMismatchError(ValueError):
    """Weights that do not fit the network; the message lists the offending keys."""


def load_weights(model: torch.nn.Module, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Load a state dict (or a MAISI-style ``{"state_dict": ...}`` file) strictly.

    Raises:
        CheckpointMismatchError: naming missing, unexpected and wrongly shaped keys.
    """
    if state is None:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "autoencoder"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" … (+{len(keys) - 8})" if len(keys) > 8 else "")
        raise CheckpointMismatchError(
            f"{path}: weights do not match the VAE architecture: {len(missing)} missing [{show(missing)}], "
            f"{len(unexpected)} unexpected [{show(unexpected)}], {len(wrong)} with another shape [{show(wrong)}]"
        )
    model.load_state_dict(state)


def num_splits_for(shape: tuple[int, ...], max_voxels: int, downsample: int = 4) -> int:
    """Tensor-split count keeping each chunk under ``max_voxels`` input voxels.

    Splits run along H; the count divides the latent extent ``H / downsample`` and leaves
    every chunk at least 4 latent voxels thick (MAISI's split overlap is 3-4 voxels).

    Args:
        shape: ``(..., D, H, W)`` of the volume to encode.
    """
    d, h, w = shape[-3:]
    latent_h = h // downsample
    needed = -(-d * h * w // max_voxels)
    candidates = [n for n in range(1, latent_h // 4 + 1) if latent_h % n == 0] or [1]
    fitting = [n for n in candidates if n >= needed]
    return fitting[0] if fitting else candidates[-1]


def set_num_splits(model: torch.nn.Module, num_splits: int) -> None:
    """Change MAISI tensor splitting in place (an inference-time memory knob; results move by rounding at most)."""
    for module in model.modules():
        if hasattr(module, "num_splits"):
            module.num_splits = num_splits


@torch.no_grad()
def encode_volume(model: AutoencoderKlMaisi, volume: torch.Tensor,
                  max_voxels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of a whole volume with bounded memory.

    Args:
        volume: ``(B, 1, D, H, W)`` with D, H, W multiples of 4.

    Returns:
        ``(mu, sigma)``, each ``(B, 4, D/4, H/4, W/4)``.
    """
    set_num_splits(model, num_splits_for(tuple(volume.shape), max_voxels))
    try:
        return model.encode(volume)
    finally:
        set_num_splits(model, 1)


@torch.no_grad()
def decode_latent(model: AutoencoderKlMaisi, latent: torch.Tensor, max_voxels: int) -> torch.Tensor:
    """``(B, 4, d, h, w)`` latent → ``(B, 1, 4d, 4h, 4w)`` volume, with bounded memory."""
    up = tuple(4 * n for n in latent.shape[-3:])
    set_num_splits(model, num_splits_for(up, max_voxels))
    try:
        return model.decode(latent)
    finally:
        set_num_splits(model, 1)
