"""The factor store written by ``extract-factors``: one content and one style vector per latent.

``paths.factors/``: ``factors.npz`` (``keys``, ``content (n, E)``, ``style (n, S)``,
``domain_index (n,)``, ``split (n,)``), ``manifest.csv`` (one :class:`FactorRecord` per
row) and ``manifest.json`` (which model and weights, the sites, the widths).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from meduet.io.atomic import atomic_path, write_json
from meduet.io.manifest import CaseIdentity, read_rows, write_rows
from meduet.stages import StageError

FACTORS = "factors.npz"
FACTOR_MANIFEST = "manifest.csv"
FACTOR_META = "manifest.json"


class FactorRecord(CaseIdentity):
    """One row of ``factors.npz`` and where it came from."""

    row: int  # index into the arrays of factors.npz
    domain_index: int
    split: str
    latent: str  # relative to the latent cache
    latent_shape: list[int]  # (C, d, h, w)
    windows: int  # sliding windows averaged


def save_factors(folder: Path, records: list[FactorRecord], content: np.ndarray, style: np.ndarray,
                 meta: dict[str, Any]) -> dict[str, Path]:
    """Write the three files atomically; ``records[i].row == i`` indexes ``content (n, E)``, ``style (n, S)``."""
    with atomic_path(folder / FACTORS) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, keys=np.array([r.key for r in records]), content=content.astype(np.float32),
                 style=style.astype(np.float32), domain_index=np.array([r.domain_index for r in records]),
                 split=np.array([r.split for r in records]))
    return {"factors": folder / FACTORS, "manifest": write_rows(folder / FACTOR_MANIFEST, records),
            "meta": write_json(folder / FACTOR_META, meta)}


def load_factors(folder: Path) -> tuple[dict[str, np.ndarray], list[FactorRecord], dict[str, Any]]:
    """The arrays of ``factors.npz``, the manifest rows in row order and the metadata."""
    if not (folder / FACTORS).is_file():
        raise StageError(f"{folder / FACTORS}: no factors; run the extract-factors stage first")
    with np.load(folder / FACTORS, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    records = sorted(read_rows(folder / FACTOR_MANIFEST, FactorRecord), key=lambda r: r.row)
    return arrays, records, json.loads((folder / FACTOR_META).read_text())
