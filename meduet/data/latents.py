"""The latent cache: one ``.npy`` per case plus a manifest and the latent scale factor.

``.npy`` files open memory-mapped, so a random ``24³`` crop reads only the bytes it
needs; the manifest carries everything later stages need to know about a latent without
opening the image it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from meduet.io.atomic import atomic_path, write_json
from meduet.io.manifest import CaseIdentity, read_rows, write_rows

MANIFEST = "manifest.csv"
SCALE = "scale.json"


class LatentRecord(CaseIdentity):
    """One cached latent and its provenance."""

    domain_index: int  # position of ``domain`` in the sorted list of all domains
    split: str  # "train" or "held_out" (the VAE's hold-out)
    latent: str  # path relative to the cache folder
    latent_std: str = ""
    latent_shape: list[int]  # (C, d, h, w)
    affine: list[float]  # 16 values, row-major 4×4: latent voxel (i, j, k) → RAS world mm
    orig_spacing: list[float]  # of the raw scan (x, y, z), from the harmonization manifest
    image_sha256: str  # the harmonized volume it was encoded from
    vae_sha256: str  # the VAE weights file it was encoded with


def save_array(path: Path, array: np.ndarray) -> Path:
    """Atomically save one array as ``.npy``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array))
    return path


def load_latent(cache_dir: Path, record: LatentRecord, mmap: bool = True) -> np.ndarray:
    """The ``(C, d, h, w)`` latent of ``record`` (memory-mapped by default)."""
    return np.load(cache_dir / record.latent, mmap_mode="r" if mmap else None)


def write_manifest(cache_dir: Path, records: list[LatentRecord]) -> Path:
    return write_rows(cache_dir / MANIFEST, records)


def read_manifest(cache_dir: Path) -> list[LatentRecord]:
    return read_rows(cache_dir / MANIFEST, LatentRecord)


def latent_affine(image_affine: np.ndarray, factor: int = 4) -> np.ndarray:
    """Latent voxel → world, given the image's voxel → world affine.

    Latent voxel ``i`` summarises image voxels ``factor·i … factor·i + factor - 1``; its
    centre is image voxel ``factor·i + (factor - 1) / 2``.
    """
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2
    return image_affine @ scale


def write_scale(cache_dir: Path, latents: list[np.ndarray]) -> dict[str, float]:
    """Compute and save the latent scale factor ``1 / std`` over the training latents."""
    values = np.concatenate([np.asarray(latent, dtype=np.float64).reshape(-1) for latent in latents])
    stats = {"scale_factor": float(1.0 / values.std()), "mean": float(values.mean()), "std": float(values.std()),
             "latents": len(latents)}
    write_json(cache_dir / SCALE, stats)
    return stats


def read_scale(cache_dir: Path) -> float:
    return float(json.loads((cache_dir / SCALE).read_text())["scale_factor"])
