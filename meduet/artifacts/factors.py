"""The factor store written by ``extract-factors``: content and style per latent and per window.

``paths.factors/``:

- ``factors.npz``: ``keys``, ``domain_index (n,)``, ``split (n,)``; for every encoding
  weights ``w`` (``teacher``, ``student``) ``{w}_content (n, E)`` and ``{w}_style (n, S)``
  (window means per volume) and ``{w}_window_content (W, E)``, ``{w}_window_style (W, S)``
  (one row per sliding window); ``window_volume (W,)`` (the volume row of each window) and
  ``window_box_mm (W, 2, 3)`` (its low and high RAS corner). ``content``/``style`` are the
  first (primary) weights' volume factors.
- ``manifest.csv``: one :class:`FactorRecord` per volume row.
- ``manifest.json``: which model and weights, the sites, the widths.
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


def save_factors(folder: Path, records: list[FactorRecord], arrays: dict[str, np.ndarray],
                 meta: dict[str, Any]) -> dict[str, Path]:
    """Write the three files atomically; ``records[i].row == i`` indexes the volume arrays.

    Args:
        arrays: the factor arrays named as in the module docstring (``content`` and ``style``
            at least); float arrays are stored as float32.
    """
    missing = {"content", "style"} - set(arrays)
    if missing:
        raise ValueError(f"factor arrays lack {sorted(missing)}")
    stored = {name: a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a for name, a in arrays.items()}
    with atomic_path(folder / FACTORS) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, keys=np.array([r.key for r in records]), domain_index=np.array([r.domain_index for r in records]),
                 split=np.array([r.split for r in records]), **stored)
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
