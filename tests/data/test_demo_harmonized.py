"""The tiny demo through harmonization: every format (NIfTI, NRRD, MHA, DICOM) and orientation, and
anatomy that stays at its world position.

The demo's ground truth gives each lesion's centre in the RAS world frame; after reorientation,
resampling and cropping the harmonized label's lesion must still be there. An axis flipped or a
crop origin lost would move it by centimetres.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from meduet.config import MeduetConfig, Paths
from meduet.data.demo import DemoSummary
from meduet.data.phantom import Label
from meduet.harmonize.manifest import read_manifest
from meduet.stages import harmonize
from tests.data.tiny_demo import TINY_SITES


@pytest.fixture(scope="module")
def harmonized(tiny_demo: tuple[Path, DemoSummary], tmp_path_factory: pytest.TempPathFactory):
    demo_root, _ = tiny_demo
    datasets = [{"name": s.name, "root": str(demo_root / s.name), "domain": s.name, "body_part": "mixed"}
                for s in TINY_SITES]
    cfg = MeduetConfig.model_validate({"harmonize": {"datasets": datasets, "target_spacing": [3.0, 3.0, 3.0],
                                                     "min_size": [16, 16, 16], "divisible_by": 8, "workers": 2}})
    paths = Paths.resolve(cfg, tmp_path_factory.mktemp("harmonized_demo"))
    harmonize.run(cfg.harmonize, paths)
    return demo_root, paths


def test_every_format_and_orientation_is_harmonized_to_ras(harmonized) -> None:
    _, paths = harmonized
    records = read_manifest(paths.harmonized / "manifest.csv")
    assert {r.domain for r in records if r.status == "ok"} == {s.name for s in TINY_SITES}  # nii, nrrd, mha, dicom
    assert all(r.status == "ok" for r in records), [(r.key, r.reason) for r in records if r.status != "ok"]
    for record in records:
        image = sitk.ReadImage(str(paths.harmonized / record.image))
        # RAS storage: ITK's LPS direction matrix is diag(-1, -1, 1)
        np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3), np.diag([-1.0, -1.0, 1.0]))
        assert image.GetSpacing() == pytest.approx((3.0, 3.0, 3.0))


def test_lesions_stay_at_their_world_position_through_harmonization(harmonized) -> None:
    demo_root, paths = harmonized
    truth = {case["case_id"]: case for case in json.loads((demo_root / "ground_truth.json").read_text())["cases"]}
    records = {r.case_id: r for r in read_manifest(paths.harmonized / "manifest.csv")}
    checked = 0
    for case_id, case in truth.items():
        if not (case["lesion"] or {}).get("present"):
            continue
        label = sitk.ReadImage(str(paths.harmonized / records[case_id].label))
        zyx = np.argwhere(sitk.GetArrayFromImage(label) == Label.LESION)  # (n, 3) array indices (z, y, x)
        assert len(zyx), f"{case_id}: the lesion vanished"
        centre_lps = label.TransformContinuousIndexToPhysicalPoint(zyx.mean(0)[::-1].tolist())
        centre_ras = np.array(centre_lps) * [-1.0, -1.0, 1.0]
        # within half a voxel of the coarser grid (raw slice thickness or the 3 mm target) plus 1 mm
        site = next(s for s in TINY_SITES if s.name == case["site"])
        tolerance = 0.5 * np.maximum(site.spacing, 3.0) + 1.0
        error = np.abs(centre_ras - case["lesion"]["centre_world_mm"])
        assert np.all(error <= tolerance), f"{case_id}: lesion off by {error} mm (tolerance {tolerance})"
        checked += 1
    assert checked >= 4  # lesions at several sites, so several formats and orientations
