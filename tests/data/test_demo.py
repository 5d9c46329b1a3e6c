"""The demo dataset on disk: MSD folders, formats, world geometry, ground truth, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from meduet.cli import main
from meduet.data.demo import DemoSummary
from meduet.data.phantom import LABELS, Label
from tests.data.tiny_demo import TINY_SITES, generate, tiny_config

MSD_KEYS = {"name", "description", "reference", "licence", "tensorImageSize", "modality", "labels",
            "numTraining", "numTest", "training", "test"}


def read(path: Path) -> sitk.Image:
    """Any site's image or label: a file, or a DICOM series folder."""
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)))
        return reader.Execute()
    return sitk.ReadImage(str(path))


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_dataset_json_is_msd_and_its_paths_exist(tiny_demo: tuple[Path, DemoSummary]) -> None:
    root, _ = tiny_demo
    for site in TINY_SITES:
        meta = json.loads((root / site.name / "dataset.json").read_text())
        assert MSD_KEYS <= set(meta)
        assert meta["tensorImageSize"] == "3D" and meta["modality"] == {"0": "CT"}
        assert meta["labels"] == {str(k): v for k, v in LABELS.items()}
        assert meta["numTraining"] == len(meta["training"]) == 3 and meta["numTest"] == 0 and meta["test"] == []
        for k, entry in enumerate(meta["training"]):
            assert entry["image"].startswith(f"./imagesTr/{site.name}_{k:03d}")
            assert entry["body_part"] in ("chest", "abdomen")
            assert (root / site.name / entry["image"]).exists() and (root / site.name / entry["label"]).is_file()
        if site.file_format == "dicom":
            assert (root / site.name / meta["training"][0]["image"]).is_dir()
            assert meta["training"][0]["label"].endswith(".nrrd")
        # Nothing else left in the folders (no temporary files, no stale cases).
        listed = {Path(e[key]).name for e in meta["training"] for key in ("image", "label")}
        assert {p.name for sub in ("imagesTr", "labelsTr") for p in (root / site.name / sub).iterdir()} == listed


def test_every_format_reads_back_with_its_label_geometry(tiny_demo: tuple[Path, DemoSummary]) -> None:
    root, _ = tiny_demo
    for site in TINY_SITES:
        entry = json.loads((root / site.name / "dataset.json").read_text())["training"][0]
        image, label = read(root / site.name / entry["image"]), read(root / site.name / entry["label"])
        # GDCM applies the rescale, so a DICOM series comes back as 32-bit HU.
        expected = sitk.sitkInt32 if site.file_format == "dicom" else sitk.sitkInt16
        assert image.GetPixelID() == expected and label.GetPixelID() == sitk.sitkUInt8
        assert image.GetSize() == label.GetSize()
        np.testing.assert_allclose(image.GetSpacing(), label.GetSpacing(), atol=1e-4)
        np.testing.assert_allclose(image.GetOrigin(), label.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(image.GetDirection(), label.GetDirection(), atol=1e-6)
        assert sorted(image.GetSpacing()) == sorted(site.spacing)
        corners = sitk.GetArrayFromImage(sitk.DICOMOrient(image, "RAS"))[:, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert np.all(corners == site.pad_value)  # outside the reconstruction circle


def test_same_case_index_is_the_same_anatomy_in_the_same_world_place(tiny_demo: tuple[Path, DemoSummary]) -> None:
    root, _ = tiny_demo
    for k in range(3):
        centroids = []
        for site in TINY_SITES:
            entry = json.loads((root / site.name / "dataset.json").read_text())["training"][k]
            label = sitk.DICOMOrient(read(root / site.name / entry["label"]), "RAS")
            stats = sitk.LabelShapeStatisticsImageFilter()
            stats.Execute(label)
            centroids.append(stats.GetCentroid(int(Label.LIVER)))  # physical (LPS) mm
        centroids = np.asarray(centroids)
        assert np.all(centroids[:, 0] < 0)  # LPS x < 0: the patient's right
        assert np.abs(centroids - centroids.mean(axis=0)).max() < 2.5, centroids


def test_ground_truth_describes_every_case(tiny_demo: tuple[Path, DemoSummary]) -> None:
    root, summary = tiny_demo
    truth = json.loads((root / "ground_truth.json").read_text())
    assert truth["labels"] == {str(k): v for k, v in LABELS.items()} and "RAS" in truth["frame"]
    cases = truth["cases"]
    assert [c["case_id"] for c in cases] == [f"{s.name}_{k:03d}" for s in TINY_SITES for k in range(3)]
    assert cases == json.loads(json.dumps(summary.records))  # plain JSON types only, nothing stringified
    for case in cases:
        content = case["content"]
        assert case["body_part"] == content["body_part"] and case["subject"] == content["index"]
        assert {"body", "organs", "deformation", "texture"} <= set(content)
        assert (case["lesion_voxels"] > 0) == case["lesion"]["present"]
        if case["lesion"]["present"]:
            assert case["lesion"]["radius_mm"] > 0 and len(case["lesion"]["centre_world_mm"]) == 3
    by_subject = {}
    for case in cases:  # the content of subject k is the same record at every site
        by_subject.setdefault(case["subject"], []).append(json.dumps(case["content"], sort_keys=True))
    assert all(len(set(records)) == 1 for records in by_subject.values())


def test_more_cases_keep_the_earlier_ones_and_runs_are_byte_identical(tmp_path: Path,
                                                                      tiny_demo: tuple[Path, DemoSummary]) -> None:
    """Two processes and one more case: every file of the shared cases is identical
    (NIfTI gzip headers and DICOM UIDs and dates included)."""
    reference, _ = tiny_demo
    generate(tiny_config(cases_per_site=4, workers=2), tmp_path)
    again, first = digests(tmp_path), digests(reference)
    shared = {name for name in first if name not in ("ground_truth.json",) and not name.endswith("dataset.json")}
    assert shared <= set(again)
    assert {name: again[name] for name in shared} == {name: first[name] for name in shared}
    assert any("_003" in name for name in set(again) - set(first))


def test_rerun_with_fewer_cases_removes_stale_files(tmp_path: Path) -> None:
    sites = [TINY_SITES[0], TINY_SITES[3]]
    generate(tiny_config(sites=sites, cases_per_site=2), tmp_path)
    generate(tiny_config(sites=sites, cases_per_site=1), tmp_path)
    for site in sites:
        names = sorted(p.name for sub in ("imagesTr", "labelsTr") for p in (tmp_path / site.name / sub).iterdir())
        assert all(name.startswith(f"{site.name}_000") for name in names) and len(names) == 2


@pytest.mark.parametrize("lesion_probability", [0.0, 1.0])
def test_lesion_presence_follows_the_probability(tmp_path: Path, lesion_probability: float) -> None:
    summary = generate(tiny_config(sites=TINY_SITES[:1], lesion_probability=lesion_probability), tmp_path)
    assert all(r["lesion"]["present"] == bool(lesion_probability) for r in summary.records)
    assert all((r["lesion_voxels"] > 0) == bool(lesion_probability) for r in summary.records)


def test_stage_through_the_cli_writes_all_outputs(tmp_path: Path) -> None:
    cfg = tiny_config(sites=TINY_SITES[:2], cases_per_site=1)
    params = {"paths": {"demo_dir": "out/demo", "reports_dir": "out/reports"},
              "demo_data": cfg.model_dump(mode="json")}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert main(["demo-data", "--params", str(path)]) == 0

    demo, reports = tmp_path / "out" / "demo", tmp_path / "out" / "reports" / "demo_data"
    assert (demo / "ground_truth.json").is_file()
    assert all((demo / site.name / "dataset.json").is_file() for site in cfg.sites)
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["cases"] == 2 and metrics["cases_per_site"] == 1 and metrics["voxels"] > 0
    assert set(metrics["per_site"]) == {site.name for site in cfg.sites}
    assert (reports / "sites.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
