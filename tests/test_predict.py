"""meduet predict: masks come back in each input's own geometry (every format and orientation), bad input is
quarantined, the summary's volumes are the mask's."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from meduet.artifacts.segmenter import save_segmenter
from meduet.cli import main
from meduet.config import HarmonizeConfig
from meduet.data.scanner import SiteGrid, to_storage
from meduet.harmonize.case import check_image, harmonize_volume, to_image
from meduet.harmonize.geometry import to_reference
from meduet.harmonize.settings import case_settings
from meduet.io.dicom import write_dicom_series
from meduet.io.images import read_image, write_image
from meduet.models.architectures import MEDUET_PRESETS, VAE_PRESETS, SegmenterArchitecture
from meduet.models.segmenter import LatentSegmenter
from meduet.models.vae import build_vae
from meduet.predict import list_inputs, predict

HARMONIZE = HarmonizeConfig(target_spacing=(3.0, 3.0, 3.0), min_size=(32, 32, 32), divisible_by=16)
BRIGHT_HU = 600.0
SUFFIX = {"nii.gz": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha"}


def _scan(spacing: tuple[float, float, float]) -> tuple[np.ndarray, SiteGrid]:
    """A canonical RAS ``(D, H, W)`` CT: a 40 HU body in air with a bright box off every axis's centre."""
    grid = SiteGrid.create(spacing=spacing, fov_mm=(120.0, 100.0), length_mm=80.0)
    z, y, x = np.meshgrid(grid.z, grid.y, grid.x, indexing="ij")
    hu = np.full(grid.shape, -1000.0, dtype=np.float32)
    hu[(x / 50) ** 2 + (y / 40) ** 2 + (z / 35) ** 2 < 1] = 40.0
    hu[(x > 10) & (x < 30) & (y > -25) & (y < -5) & (z > 0) & (z < 20)] = BRIGHT_HU  # right, posterior, superior
    return hu, grid


def _write(root: Path, name: str, file_format: str, orientation: str,
           spacing: tuple[float, float, float] = (2.0, 2.5, 4.0)) -> Path:
    hu, grid = _scan(spacing)
    stored = to_storage(np.round(hu).astype(np.int16), grid, orientation)
    if file_format == "dicom":
        write_dicom_series(stored, root / name, uid_key=f"test/{name}")
        return root / name
    return write_image(stored, root / f"{name}{SUFFIX[file_format]}")


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "PIR"])
@pytest.mark.parametrize("file_format", ["nii.gz", "nrrd", "mha", "dicom"])
def test_a_harmonized_mask_maps_back_onto_the_object_in_the_input_grid(tmp_path: Path, file_format: str,
                                                                        orientation: str) -> None:
    source = _write(tmp_path, "scan", file_format, orientation)
    image = read_image(source)
    check_image(image, source)
    harmonized = harmonize_volume(image, None, case_settings(HARMONIZE), name=str(source))
    assert harmonized.image.shape != sitk.GetArrayViewFromImage(image).shape  # resampled, cropped, padded
    labels = (harmonized.image >= 0.99).astype(np.uint8)  # the bright box (above the window's top) on that grid
    mask = to_reference(to_image(labels, harmonized.grid), image)

    for getter in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(mask, getter)(), getattr(image, getter)(), atol=1e-4), getter
    truth = sitk.GetArrayFromImage(image) >= BRIGHT_HU - 1  # the object in the input's own voxel grid
    found = sitk.GetArrayFromImage(mask).astype(bool)
    dice = 2 * (truth & found).sum() / (truth.sum() + found.sum())
    assert dice > 0.85, dice  # nearest-neighbour from 3 mm back to 2-4 mm voxels: only the rim may differ
    centre_error = np.abs(np.argwhere(found).mean(0) - np.argwhere(truth).mean(0))
    assert (centre_error < 1.0).all(), centre_error


def _segmenter_file(path: Path, *, body_context: bool = False) -> Path:
    """A segmenter file with untrained (seeded) weights: predict's plumbing does not depend on training."""
    torch.manual_seed(0)
    backbone = dataclasses.replace(MEDUET_PRESETS["tiny"], num_domains=2)
    head = SegmenterArchitecture(num_classes=3, decoder="refine", features=8, image_features=4,
                                 body_context=body_context)
    vae = build_vae(VAE_PRESETS["tiny"])
    return save_segmenter(path, model=LatentSegmenter(backbone, head).state_dict(), architecture=head,
                          backbone=backbone, config={"overlap": 0.25, "window_batch": 4},
                          harmonize=HARMONIZE.model_dump(mode="json"), labels=["background", "body", "box"],
                          scale_factor=1.0, vae_state=vae.state_dict(), vae_architecture=VAE_PRESETS["tiny"],
                          vae_sha256="0", meduet_sha256=None, labelled_cases=[], steps=0)


def test_predict_writes_masks_in_the_inputs_geometry_and_quarantines_bad_input(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    scans = [_write(inputs, "nrrd_case", "nrrd", "LPS"), _write(inputs, "dicom_case", "dicom", "PIR")]
    (inputs / "broken.nii.gz").write_bytes(b"not an image")
    flat = sitk.Image([16, 16, 1], sitk.sitkInt16)  # a single slice: 2-D in effect
    sitk.WriteImage(flat, str(inputs / "flat.mha"))
    model = _segmenter_file(tmp_path / "models" / "finetune" / "segmenter.pt")
    assert sorted(p.name for p in list_inputs(inputs)) == ["broken.nii.gz", "dicom_case", "flat.mha", "nrrd_case.nrrd"]

    out = tmp_path / "out"
    assert main(["predict", "--model", str(model.parent), "--input", str(inputs), "--output", str(out)]) == 0
    summary = {r["case"]: r for r in json.loads((out / "summary.json").read_text())}
    assert {c: r["status"] for c, r in summary.items()} == {"broken": "quarantined", "dicom_case": "ok",
                                                           "flat": "quarantined", "nrrd_case": "ok"}
    assert summary["broken"]["reason"].startswith(str(inputs / "broken.nii.gz"))
    assert "single slice" in summary["flat"]["reason"]
    for scan in scans:
        case = summary[scan.name.removesuffix(".nrrd")]
        image, mask = read_image(scan), sitk.ReadImage(case["mask"])
        assert case["mask"].endswith(".nrrd" if scan.is_file() else ".nii.gz")
        for getter in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
            assert np.allclose(getattr(mask, getter)(), getattr(image, getter)(), atol=1e-4), getter
        counts = np.bincount(sitk.GetArrayViewFromImage(mask).ravel(), minlength=3)
        voxel_ml = np.prod(image.GetSpacing()) / 1000
        assert case["volumes_ml"] == {name: pytest.approx(counts[c] * voxel_ml, abs=1e-3)
                                      for c, name in ((1, "body"), (2, "box")) if counts[c]}
        assert set(case["seconds"]) == {"harmonize", "encode", "segment"}
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["case", "status"] and rows[0].endswith("body_ml,box_ml") and len(rows) == 5


def test_predict_fails_clearly_without_a_model_or_any_usable_case(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no segmenter; run the finetune stage first"):
        predict(tmp_path / "missing", tmp_path, tmp_path / "out")
    model = _segmenter_file(tmp_path / "segmenter.pt")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.nrrd").write_bytes(b"")
    with pytest.raises(Exception, match="no case could be segmented: .*empty.nrrd: empty file"):
        predict(model, tmp_path / "in", tmp_path / "out")


def _dataset(root: Path) -> Path:
    """An MSD folder: one training case with a label, one test case, one test entry whose file is missing."""
    scan = _write(root / "imagesTr", "case_a", "nii.gz", "LPS")
    _write(root / "imagesTs", "case_b", "mha", "RAS")
    index = {"name": "user data", "training": [{"image": f"imagesTr/{scan.name}", "label": f"imagesTr/{scan.name}"}],
             "test": ["imagesTs/case_b.mha", "imagesTs/gone.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(index))
    return root / "dataset.json"


@pytest.mark.parametrize("body_context", [False, True])
def test_predict_reads_the_cases_a_dataset_json_lists(tmp_path: Path, body_context: bool) -> None:
    index = _dataset(tmp_path / "msd")
    (tmp_path / "msd" / "imagesTs" / "unlisted.nii.gz").write_bytes(b"not listed: never read")
    model = _segmenter_file(tmp_path / "segmenter.pt", body_context=body_context)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model), "--input", str(index), "--output", str(out)]) == 0
    summary = {r["case"]: r for r in json.loads((out / "summary.json").read_text())}
    assert {c: r["status"] for c, r in summary.items()} == {"case_a": "ok", "case_b": "ok", "gone": "quarantined"}
    assert summary["gone"]["reason"] == f"{(tmp_path / 'msd' / 'imagesTs' / 'gone.nii.gz').resolve()}: file not found"
    assert sorted(p.name for p in out.glob("*_seg.*")) == ["case_a_seg.nii.gz", "case_b_seg.mha"]


@pytest.mark.services
def test_predict_reads_inputs_from_s3(s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MEDUET_S3_ENDPOINT_URL", s3_server.endpoint_url)
    _dataset(tmp_path / "upload")
    fs = s3_server.filesystem()
    fs.put(str(tmp_path / "upload") + "/", f"{s3_server.bucket}/predict/msd/", recursive=True)
    model = _segmenter_file(tmp_path / "segmenter.pt")
    bucket = f"s3://{s3_server.bucket}/predict/msd"

    by_index = predict(model, f"{bucket}/dataset.json", tmp_path / "by_index")
    assert sorted((r.case, r.status) for r in by_index) == [("case_a", "ok"), ("case_b", "ok"),
                                                            ("gone", "quarantined")]
    one = predict(model, f"{bucket}/imagesTs/case_b.mha", tmp_path / "one")
    assert [(r.case, r.status) for r in one] == [("case_b", "ok")]
    folder = predict(model, f"{bucket}/imagesTr/", tmp_path / "folder")
    assert [(r.case, r.status) for r in folder] == [("case_a", "ok")]
    # the masks of remote inputs are the masks of the same files read locally
    local = predict(model, tmp_path / "upload" / "imagesTs" / "case_b.mha", tmp_path / "local")
    remote_mask = sitk.GetArrayFromImage(sitk.ReadImage(one[0].mask))
    assert np.array_equal(remote_mask, sitk.GetArrayFromImage(sitk.ReadImage(local[0].mask)))
    with pytest.raises(Exception, match="remote file not found"):
        predict(model, f"{bucket}/imagesTs/absent.mha", tmp_path / "absent")
