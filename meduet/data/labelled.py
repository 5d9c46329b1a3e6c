"""Harmonized cases with their label maps and the project's hold-out split.

The split is the latent cache's (``train`` / ``held_out``: the VAE's hold-out, which every
later stage keeps), so the synthesis evaluator trains on exactly the cases the generative
stages trained on and is judged, like them, on subjects none of them has seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from meduet.data.latents import MANIFEST
from meduet.data.latents import read_manifest as read_latents
from meduet.data.volumes import load_volume
from meduet.harmonize.manifest import read_manifest as read_harmonized
from meduet.stages import StageError


@dataclass(frozen=True)
class LabelledCase:
    """One harmonized case with labels."""

    key: str  # the harmonized (and latent cache) key
    case_id: str
    site: str
    split: str  # "train" or "held_out" (the latent cache's)
    image: Path
    label: Path
    labels_present: tuple[int, ...]
    window: tuple[float, float, float, float]  # a_min, a_max, b_min, b_max


def labelled_cases(harmonized: Path, latents: Path) -> list[LabelledCase]:
    """Every harmonized case with a label map that the latent cache lists, sorted by key.

    Raises:
        StageError: a manifest is missing, or no case has both an image and a label map.
    """
    for manifest in (harmonized / "manifest.csv", latents / MANIFEST):
        if not manifest.is_file():
            raise StageError(f"{manifest}: not found; run the harmonize and encode-latents stages first")
    split = {r.key: r.split for r in read_latents(latents)}
    cases = [LabelledCase(key=r.key, case_id=r.case_id, site=r.domain, split=split[r.key], image=harmonized / r.image,
                          label=harmonized / r.label, labels_present=tuple(r.labels_present),
                          window=tuple(r.window))  # type: ignore[arg-type]
             for r in sorted(read_harmonized(harmonized / "manifest.csv"), key=lambda r: r.key)
             if r.status == "ok" and r.label and r.key in split]
    if not cases:
        raise StageError(f"{harmonized / 'manifest.csv'}: no harmonized case with a label map in the latent cache")
    return cases


def label_classes(labels: torch.Tensor, label_ids: list[int]) -> torch.Tensor:
    """Label values → head classes (``label_ids[i]`` → ``i``); values not in ``label_ids`` → 0 (background)."""
    lut = torch.zeros(max(max(label_ids), int(labels.max())) + 1, dtype=torch.long)
    lut[torch.tensor(label_ids)] = torch.arange(len(label_ids))
    return lut[labels.long()]


def load_labelled(image: Path, label: Path, label_ids: list[int]) -> torch.Tensor:
    """A harmonized image and its label classes as one ``(2, D, H, W)`` float tensor (cropped together)."""
    return torch.cat([load_volume(image), label_classes(load_volume(label), label_ids).float()])
