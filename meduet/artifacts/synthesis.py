"""The synthesis store ``paths.synthesis/`` (written by ``synthesize``, read by ``evaluate-synthesis``).

- ``translations/<source key>__<target site>.nii.gz``: a held-out scan ``A`` (its content
  tokens) rendered in another site's style, decoded by the frozen VAE on ``A``'s harmonized
  grid, with ``A``'s affine: it overlays ``A`` and ``A``'s labels voxel for voxel;
- ``augmentations/aug__<source key>__<target site>.nii.gz``: the same for a *training* scan
  (``synthesize.augmentations_per_scan``), for fine-tuning with style-swapped volumes: the
  source's labels hold for it (``finetune-sweep``'s ``meduet+synth`` arm);
- ``generated/<target site>_<n>.nii.gz``: new crops (the DiT's input size) from a training
  volume's content vector and the site's style, as the authors generate;
- ``latents/…npy``: the scaled sampled latent of each image (same name, ``.npy``);
- ``manifest.csv``: one :class:`SynthesisRecord` per image;
- ``manifest.json``: the DiT, MeDUET and VAE files (SHA-256), the sampler settings, the sites
  and their style vectors, the run key (outputs of another key are never mixed in).

Intensities are those of the harmonized images (``harmonize.intensity``'s output range).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from meduet.io.atomic import write_json
from meduet.io.manifest import read_rows, write_rows
from meduet.stages import StageError

SYNTHESIS_MANIFEST = "manifest.csv"
SYNTHESIS_META = "manifest.json"
TRANSLATIONS = "translations"
GENERATED = "generated"
AUGMENTATIONS = "augmentations"
WHOLE_SCAN_KINDS = ("translation", "augmentation")  # a whole source scan, sampled and decoded on its grid
LATENTS = "latents"


class SynthesisRecord(BaseModel):
    """One synthesized image and what it was made from."""

    model_config = ConfigDict(extra="forbid")

    key: str  # file stem, unique in the store
    kind: Literal["translation", "augmentation", "generation"]  # augmentation: a translation of a training scan
    source_key: str  # the latent cache key of scan A (translation, augmentation) or of the content's volume
    source_site: str
    source_split: str  # the source's split: translation "held_out" (unless the cache has none), augmentation "train"
    subject: str | None  # the source's subject (travelling subjects: the real s@B to compare with)
    target_site: str
    target_domain_index: int
    image: str  # relative to the store
    latent: str  # relative to the store: the scaled sampled latent (C, d, h, w)
    shape: list[int]  # image (D, H, W)
    seed: int
    seconds: float  # sampling and decoding time
    source_window: int | None = None  # generation from a window's content: its index among source_key's windows


def read_synthesis(folder: Path) -> tuple[list[SynthesisRecord], dict[str, Any]]:
    """The store's records (sorted by key) and its metadata."""
    if not (folder / SYNTHESIS_MANIFEST).is_file():
        raise StageError(f"{folder / SYNTHESIS_MANIFEST}: no synthesized images; run the synthesize stage first")
    return read_rows(folder / SYNTHESIS_MANIFEST, SynthesisRecord), json.loads((folder / SYNTHESIS_META).read_text())


def write_synthesis(folder: Path, records: list[SynthesisRecord], meta: dict[str, Any]) -> dict[str, Path]:
    """Write the manifest and its metadata atomically (the images are written as they are made)."""
    return {"manifest": write_rows(folder / SYNTHESIS_MANIFEST, records),
            "meta": write_json(folder / SYNTHESIS_META, meta)}
