"""Network shapes: the hyper-parameters that fix each network's layers (and so its checkpoint keys).

Pure dataclasses without torch, so the params tree (``meduet.config``) can validate against
them without importing the networks. Checkpoints store ``to_dict()`` (JSON-ready) and
loading rebuilds the shape with ``from_dict``, the one place lists become tuples again.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypeVar

Grid = tuple[int, int, int]
VAEPresetName = Literal["maisi", "small", "tiny"]
MeduetPresetName = Literal["base", "small", "tiny"]
# The segmenter's body context, in channel order (computed by meduet.data.body).
BODY_CHANNELS = ("body", "lateral", "anterior")

_A = TypeVar("_A", bound="_Architecture")


class _Architecture:
    """``to_dict`` / ``from_dict`` for the frozen shape dataclasses below."""

    def to_dict(self) -> dict[str, Any]:
        """Every field, tuples as lists (as JSON and ``torch.load(weights_only=True)`` give them back)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_A], data: dict[str, Any]) -> _A:
        """The shape saved by ``to_dict``; an unknown or missing field is a clear error."""
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class VAEArchitecture(_Architecture):
    """Hyper-parameters that fix the network's shape (and so its checkpoint keys)."""

    num_channels: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    latent_channels: int = 4
    norm_num_groups: int = 32

    def __post_init__(self) -> None:
        if len(self.num_channels) != len(self.num_res_blocks):
            raise ValueError("num_channels and num_res_blocks need one entry per level")
        if any(c % self.norm_num_groups for c in self.num_channels):
            raise ValueError(f"every channel count {self.num_channels} must divide by norm_num_groups "
                             f"{self.norm_num_groups}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.num_channels) - 1)


# Default bound on the input voxels of one MAISI tensor split in whole-volume VAE encoding and
# decoding (``meduet.models.vae.num_splits_for``; splitting changes results by float rounding at
# most). On CPU with the tiny preset, splitting saves little memory and costs time
# (benchmarks/vae_split.py: a 4.4 M-voxel demo-sized volume at 1 thread decodes in 0.82x the
# time unsplit, peak RSS 1.57 against 1.48 GiB; README, stage times). The maisi preset's
# full-resolution tensors are 8x wider (64 channels against 8): give it a bound near 2 M voxels.
MAX_VOXELS_PER_SPLIT = 16_000_000

VAE_PRESETS: dict[str, VAEArchitecture] = {
    # The published MAISI autoencoder shape (loads MAISI's autoencoder.pt).
    "maisi": VAEArchitecture((64, 128, 256), (2, 2, 2), 4, 32),
    # CPU-sized variants with the same 4× compression, for the demo and tests.
    "small": VAEArchitecture((16, 32, 64), (1, 1, 1), 4, 8),
    "tiny": VAEArchitecture((8, 16, 32), (1, 1, 1), 4, 8),
}



@dataclass(frozen=True)
class MeduetArchitecture(_Architecture):
    """Hyper-parameters that fix the network's shape (and so its checkpoint keys).

    Args:
        input_size: latent crop ``(d, h, w)``.
        in_channels: latent channels ``C``.
        patch_size: patch edge ``p``; must divide every entry of ``input_size``.
        embed_dim, depth, num_heads: encoder width ``E``, blocks and heads.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder width ``Ed``, blocks, heads.
        mlp_ratio: MLP hidden width relative to the block width.
        s_ratio: style width ``S = round(s_ratio * E)``.
        mask_ratio: fraction ``r`` of partner tokens in a mixed sequence.
        num_domains: number of sites ``K`` for the domain classifiers.
        norm_pix_loss: reconstruct per-patch normalised latents.
        learnable_logit_scale: train SiQC's logit scales (fixed at ``log(1/0.07)`` otherwise).
    """

    input_size: Grid = (24, 24, 24)
    in_channels: int = 4
    patch_size: int = 4
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 384
    decoder_depth: int = 8
    decoder_num_heads: int = 12
    mlp_ratio: float = 4.0
    s_ratio: float = 0.25
    mask_ratio: float = 0.5
    num_domains: int = 2
    norm_pix_loss: bool = False
    learnable_logit_scale: bool = False

    def __post_init__(self) -> None:
        if len(self.input_size) != 3 or any(n % self.patch_size for n in self.input_size):
            raise ValueError(f"input_size {self.input_size} must be 3 sizes divisible by patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise ValueError(f"decoder_embed_dim {self.decoder_embed_dim} is not divisible by "
                             f"decoder_num_heads {self.decoder_num_heads}")
        if min(self.depth, self.decoder_depth, self.in_channels) < 1:
            raise ValueError("depth, decoder_depth and in_channels must be at least 1")
        if self.style_dim < 1:
            raise ValueError(f"s_ratio {self.s_ratio} gives an empty style width for embed_dim {self.embed_dim}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {self.mask_ratio}")
        if self.num_domains < 2:
            raise ValueError(f"domain supervision needs at least 2 sites, got {self.num_domains}")

    @property
    def style_dim(self) -> int:
        return round(self.s_ratio * self.embed_dim)

    @property
    def grid(self) -> Grid:
        """Patch grid ``(d/p, h/p, w/p)``."""
        d, h, w = self.input_size
        return d // self.patch_size, h // self.patch_size, w // self.patch_size

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def patch_dim(self) -> int:
        """Length ``p**3 * C`` of a flattened patch (the decoder's output per token)."""
        return self.patch_size**3 * self.in_channels

MEDUET_PRESETS: dict[str, MeduetArchitecture] = {
    # The paper's ViT-B on 24³ latent crops (6³ tokens of 4³ patches).
    "base": MeduetArchitecture(),
    # CPU-sized variants for the demo and tests.
    "small": MeduetArchitecture(input_size=(16, 16, 16), patch_size=4, embed_dim=96, depth=4, num_heads=4,
                          decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4),
    "tiny": MeduetArchitecture(input_size=(8, 8, 8), patch_size=2, embed_dim=32, depth=2, num_heads=2,
                         decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0),
}


DiTPresetName = Literal["base", "small", "tiny"]


@dataclass(frozen=True)
class DiTArchitecture(_Architecture):
    """Shape of the factor-conditioned latent DiT (``meduet.models.dit``).

    Input size and patch size equal those of the MeDUET preset of the same name, so the DiT's
    tokens line up one to one with MeDUET's content tokens (the spatial content path and
    REPA need that); ``hidden_size`` equals MeDUET's ``E`` so its encoder weights can
    initialise the DiT.

    Args:
        input_size: latent crop ``(d, h, w)``.
        in_channels: latent channels ``C``.
        patch_size: patch edge ``p``; must divide every entry of ``input_size``.
        hidden_size, depth, num_heads: token width ``D``, blocks and heads.
        mlp_ratio: MLP hidden width relative to ``D``.
        content_dim: width ``E`` of MeDUET's content vector and tokens (the conditioning).
        style_dim: width ``S`` of MeDUET's style vector.
        spatial_content: add projected content tokens to the token embedding (translation);
            off: global content and style vectors only, as the authors.
        frequency_dim: sinusoidal features of the timestep before its MLP.
        temperature: initial temperature of the factor embedders (learnable).
    """

    input_size: Grid = (24, 24, 24)
    in_channels: int = 4
    patch_size: int = 4
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    content_dim: int = 768
    style_dim: int = 192
    spatial_content: bool = True
    frequency_dim: int = 256
    temperature: float = 0.1

    def __post_init__(self) -> None:
        if len(self.input_size) != 3 or any(n % self.patch_size for n in self.input_size):
            raise ValueError(f"input_size {self.input_size} must be 3 sizes divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if min(self.depth, self.in_channels, self.content_dim, self.style_dim) < 1:
            raise ValueError("depth, in_channels, content_dim and style_dim must be at least 1")
        if self.frequency_dim < 2 or self.frequency_dim % 2:
            raise ValueError(f"frequency_dim must be even and >= 2, got {self.frequency_dim}")
        if self.temperature <= 0 or self.mlp_ratio <= 0:
            raise ValueError(f"temperature and mlp_ratio must be positive, got {self.temperature}, {self.mlp_ratio}")

    @property
    def grid(self) -> Grid:
        """Patch grid ``(d/p, h/p, w/p)``."""
        d, h, w = self.input_size
        return d // self.patch_size, h // self.patch_size, w // self.patch_size

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def patch_dim(self) -> int:
        """Length ``p**3 * C`` of a flattened patch (the DiT's output per token)."""
        return self.patch_size**3 * self.in_channels


def _dit_like(meduet: MeduetArchitecture, **shape: Any) -> DiTArchitecture:
    """A DiT on the same crop, patches and conditioning widths as the MeDUET preset ``meduet``."""
    return DiTArchitecture(input_size=meduet.input_size, in_channels=meduet.in_channels, patch_size=meduet.patch_size,
                           content_dim=meduet.embed_dim, style_dim=meduet.style_dim, **shape)


DIT_PRESETS: dict[str, DiTArchitecture] = {
    # DiT-B/4 on 24³ latents: 6³ tokens, the same as MeDUET base's.
    "base": _dit_like(MEDUET_PRESETS["base"], hidden_size=768, depth=12, num_heads=12),
    # CPU-sized variants for the demo and tests, as wide as the MeDUET preset of the same name.
    "small": _dit_like(MEDUET_PRESETS["small"], hidden_size=96, depth=4, num_heads=4),
    "tiny": _dit_like(MEDUET_PRESETS["tiny"], hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0),
}


@dataclass(frozen=True)
class EvaluatorArchitecture(_Architecture):
    """The synthesis evaluator's shape (``meduet.models.evaluator.EvaluatorNet``).

    Args:
        channels: feature channels per resolution level; each level halves the grid.
        num_sites: classes of the site head ``K``.
        num_labels: classes of the segmentation head ``L`` (background included).
        in_channels: image channels.
        dropout: dropout before the site head.
    """

    channels: tuple[int, ...]
    num_sites: int
    num_labels: int
    in_channels: int = 1
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if len(self.channels) < 2 or any(c < 1 for c in self.channels):
            raise ValueError(f"channels needs at least 2 positive levels, got {self.channels}")
        if self.num_sites < 2 or self.num_labels < 2:
            raise ValueError(f"num_sites and num_labels must be >= 2, got {self.num_sites}, {self.num_labels}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    @property
    def downsample(self) -> int:
        """Every input edge must divide by this."""
        return 2 ** len(self.channels)

    @property
    def feature_dim(self) -> int:
        """Width ``F`` of ``features``: the pooled channels of every encoder level."""
        return sum(self.channels)


SegmentationDecoder = Literal["upsample", "refine"]


@dataclass(frozen=True)
class SegmenterArchitecture(_Architecture):
    """Shape of the latent segmenter (``meduet.models.segmenter``) on top of a MeDUET encoder.

    Args:
        num_classes: output classes ``K`` (background included).
        decoder: ``upsample`` = the authors' latent logits upsampled 4x trilinearly;
            ``refine`` = those logits plus a correction computed at image resolution from
            skip features of the harmonized image next to them.
        features: channels ``F`` of the latent-resolution head.
        image_features: channels ``Fi`` of the image-resolution refinement (``refine`` only).
        downsample: image voxels per latent voxel along each axis (the VAE's compression).
        body_context: the image input carries the body channels of ``meduet.data.body`` after the
            intensity (where the window lies in the patient), read by the latent stem and a
            correction of the latent logits after the last norm (both average-pooled to the
            latent grid) and by the image-resolution path.
    """

    num_classes: int
    decoder: SegmentationDecoder = "refine"
    features: int = 32
    image_features: int = 8
    downsample: int = 4
    body_context: bool = False

    @property
    def context_channels(self) -> int:
        """Channels of the image input after the intensity."""
        return len(BODY_CHANNELS) if self.body_context else 0

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background and one class), got {self.num_classes}")
        if self.decoder not in ("upsample", "refine"):
            raise ValueError(f"decoder must be 'upsample' or 'refine', got {self.decoder!r}")
        if min(self.features, self.image_features, self.downsample) < 1:
            raise ValueError("features, image_features and downsample must be at least 1")
