"""Tiny synthetic CT cases for harmonization tests (the demo generator is tested elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def phantom(size_xyz: tuple[int, int, int] = (48, 40, 20), spacing: tuple[float, float, float] = (1.0, 1.2, 2.5),
            seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    """An ellipsoid 'body' (40 HU, with a 'liver' at 60 HU and noise) in air, RAS-oriented.

    Returns:
        (image int16 HU, label uint8 with 1 = body, 2 = liver), same RAS geometry.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = size_xyz
    z, y, x = np.meshgrid(np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 + (z / 1.3) ** 2 < 1
    liver = ((x - 0.3) / 0.3) ** 2 + (y / 0.25) ** 2 + (z / 0.6) ** 2 < 1
    hu = np.full(body.shape, -1000.0)
    hu[body] = 40
    hu[liver] = 60
    hu += rng.normal(0, 5, hu.shape)
    label = body.astype(np.uint8) + liver.astype(np.uint8)
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    lab = sitk.GetImageFromArray(label)
    for img in (image, lab):
        img.SetSpacing(spacing)
        img.SetOrigin((12.0, -30.0, 7.5))
        img.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))  # RAS
    return image, lab


def write_msd(root: Path, cases: dict[str, tuple[sitk.Image | None, sitk.Image | None]], suffix: str = ".nii.gz",
              extra_entries: list[dict] | None = None) -> Path:
    """Write an MSD-style folder; ``None`` images are listed in dataset.json but not written."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for case_id, (image, label) in cases.items():
        entry = {"image": f"./imagesTr/{case_id}{suffix}"}
        if image is not None:
            sitk.WriteImage(image, str(root / entry["image"]), useCompression=True)
        if label is not None:
            entry["label"] = f"./labelsTr/{case_id}{suffix}"
            sitk.WriteImage(label, str(root / entry["label"]), useCompression=True)
        training.append(entry)
    training += extra_entries or []
    meta = {"name": root.name, "modality": {"0": "CT"}, "labels": {"0": "background", "1": "body", "2": "liver"},
            "numTraining": len(training), "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root
