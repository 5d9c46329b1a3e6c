"""Initialising the DiT from a pretrained MeDUET encoder (``train_diffusion.init: meduet``).

What maps (when the shapes agree):

- ``patch_embed.proj`` -> ``patch_embed.proj``;
- per block ``i`` below both depths: ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``. MeDUET's
  pre-norms have a learnt affine ``γ, β``; the DiT's are plain LayerNorms modulated by adaLN. The
  affine is folded into the following projection (``W' = W diag(γ)``, ``b' = b + W β``), so at
  zero modulation a DiT block computes exactly MeDUET's attention and MLP branches;
- positions: both networks use the fixed sin-cos table of their own grid (nothing learnt, so
  nothing to copy or resize).

Everything else (class token, final norm, factor heads, MAE decoder, site classifiers, SiQC
temperatures, blocks beyond the DiT's depth) is reported as skipped with the reason; the DiT's
own conditioning layers keep their (adaLN-Zero) initialisation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

# Projections that follow a MeDUET pre-norm: DiT key suffix -> the MeDUET norm folded into it.
_FOLDED = {"attn.qkv": "norm1", "mlp.fc1": "norm2"}
_COPIED = ("attn.proj", "mlp.fc2")
_SKIP_REASONS = (  # MeDUET key pattern -> why it has no place in the DiT
    (r"^(decoder_|mask_token)", "MAE decoder"),
    (r"^cls_token$", "class token (the DiT has none)"),
    (r"^norm\.", "encoder output norm (the DiT's final layer is adaLN-modulated)"),
    (r"^(content_head|style_head|style_smooth|entangler)\.", "factor head (the frozen teacher supplies factors)"),
    (r"_domain_head\.", "site classifier"),
    (r"logit_scale", "SiQC temperature"),
)


@dataclass
class InitReport:
    """What a MeDUET initialisation did.

    Attributes:
        loaded: DiT keys set from MeDUET weights (folded ones included).
        folded: MeDUET norm keys folded into a loaded projection.
        skipped: MeDUET key -> why it was not used.
        kept: DiT keys left at their own initialisation.
    """

    loaded: list[str] = field(default_factory=list)
    folded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"loaded": self.loaded, "folded": self.folded, "skipped": self.skipped, "kept": self.kept}

    def summary(self) -> str:
        return (f"{len(self.loaded)} DiT tensors from MeDUET ({len(self.folded)} norms folded in), "
                f"{len(self.skipped)} MeDUET entries skipped, {len(self.kept)} DiT tensors kept at their init")


def _sources(dit_key: str) -> tuple[str, ...] | None:
    """The MeDUET keys a DiT key is made from (weight or bias, plus the folded norm's), or None."""
    if dit_key.startswith("patch_embed.proj."):
        return (dit_key,)
    match = re.fullmatch(r"(blocks\.\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", dit_key)
    if match is None:
        return None
    block, layer, kind = match.groups()
    if layer in _COPIED:
        return (dit_key,)
    norm = f"{block}.{_FOLDED[layer]}"
    # the folded bias W β + b needs the weight too
    return (dit_key, f"{norm}.weight") if kind == "weight" else (dit_key, f"{block}.{layer}.weight", f"{norm}.bias")


def plan_meduet_init(dit_shapes: Mapping[str, torch.Size], meduet_shapes: Mapping[str, torch.Size]) -> InitReport:
    """Which DiT tensors a MeDUET state of these shapes initialises (names and shapes only).

    Args:
        dit_shapes: ``{key: shape}`` of the DiT's state dict; meduet_shapes: the same for MeDUET.
    """
    report = InitReport()
    used: set[str] = set()
    for key, shape in dit_shapes.items():
        sources = _sources(key)
        if sources is None or not all(s in meduet_shapes for s in sources) or meduet_shapes[key] != shape:
            report.kept.append(key)
            continue
        report.loaded.append(key)
        used.update(sources)
        report.folded.extend(s for s in sources[1:] if ".norm" in s and s not in report.folded)
    for key, shape in meduet_shapes.items():
        if key in used:
            continue
        reason = next((why for pattern, why in _SKIP_REASONS if re.search(pattern, key)), None)
        block = re.match(r"blocks\.(\d+)\.", key)
        if reason is None and block is not None:
            reason = "block beyond the DiT's depth" if f"blocks.{block.group(1)}.attn.qkv.weight" not in \
                dit_shapes else f"shape {tuple(shape)} does not fit the DiT"
        elif reason is None and key in dit_shapes:
            reason = f"shape {tuple(shape)} does not fit the DiT's {tuple(dit_shapes[key])}"
        report.skipped[key] = reason or "no counterpart in the DiT"
    report.skipped["pos_embed"] = "fixed sin-cos table in both networks, computed for the DiT's own grid"
    return report


@torch.no_grad()
def init_from_meduet(dit: nn.Module, meduet_state: Mapping[str, torch.Tensor]) -> InitReport:
    """Copy (and fold) the matching MeDUET encoder weights into ``dit`` in place.

    Args:
        dit: a ``ConditionedDiT``; meduet_state: a ``MeduetModel`` state dict (e.g. the EMA teacher's).

    Returns:
        The :class:`InitReport` of :func:`plan_meduet_init`.
    """
    state = dit.state_dict()
    report = plan_meduet_init({k: v.shape for k, v in state.items()}, {k: v.shape for k, v in meduet_state.items()})
    for key in report.loaded:
        sources = [meduet_state[s].to(state[key].dtype) for s in _sources(key)]
        if len(sources) == 1:
            value = sources[0]
        elif key.endswith(".weight"):  # W diag(γ)
            weight, gamma = sources
            value = weight * gamma[None, :]
        else:  # b + W β
            bias, weight, beta = sources
            value = bias + weight @ beta
        state[key].copy_(value)
    return report
