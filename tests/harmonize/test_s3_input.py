"""Harmonizing a dataset that lives on S3 (a real moto endpoint on 127.0.0.1, via s3fs)."""

import pytest
import SimpleITK as sitk

from meduet.config import MeduetConfig, Paths
from meduet.harmonize.manifest import read_manifest
from meduet.stages import harmonize
from tests.harmonize.synth import phantom, write_msd


@pytest.mark.services
def test_dataset_on_s3_is_mirrored_and_harmonized(s3_server, tmp_path, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    local = write_msd(tmp_path / "upload", {f"case_{i}": phantom(seed=i) for i in range(2)})
    fs = s3_server.filesystem()
    fs.put(str(local) + "/", f"{s3_server.bucket}/raw/site_s3/", recursive=True)
    uri = f"s3://{s3_server.bucket}/raw/site_s3"
    cfg = MeduetConfig.model_validate({
        "storage": {"s3_endpoint_url": s3_server.endpoint_url},
        "harmonize": {"datasets": [{"name": "s3site", "root": uri, "domain": "site_s3"}],
                      "target_spacing": [2.0, 2.0, 2.0], "min_size": [16, 16, 16], "divisible_by": 8, "workers": 1},
    })
    paths = Paths.resolve(cfg, tmp_path / "project")

    metrics = harmonize.run(cfg.harmonize, paths).metrics
    assert metrics["ok"] == 2
    records = read_manifest(paths.harmonized / "manifest.csv")
    assert all((paths.harmonized / r.image).is_file() for r in records)
    mirrored = paths.work / "s3-mirror" / "s3" / s3_server.bucket / "raw" / "site_s3" / "imagesTr" / "case_0.nii.gz"
    assert mirrored.read_bytes() == (local / "imagesTr" / "case_0.nii.gz").read_bytes()

    mtime = mirrored.stat().st_mtime_ns
    assert harmonize.run(cfg.harmonize, paths).metrics["reused"] == 2
    assert mirrored.stat().st_mtime_ns == mtime  # unchanged objects are not fetched again


@pytest.mark.services
def test_unreachable_s3_dataset_is_quarantined_not_fatal(s3_server, tmp_path, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    write_msd(tmp_path / "local_site", {"case_0": phantom()})
    cfg = MeduetConfig.model_validate({
        "storage": {"s3_endpoint_url": s3_server.endpoint_url},
        "harmonize": {"datasets": [{"name": "gone", "root": f"s3://{s3_server.bucket}/no/such/prefix", "domain": "x"},
                                   {"name": "local", "root": str(tmp_path / "local_site"), "domain": "y"}],
                      "target_spacing": [2.0, 2.0, 2.0], "min_size": [16, 16, 16], "divisible_by": 8, "workers": 1},
    })
    metrics = harmonize.run(cfg.harmonize, Paths.resolve(cfg, tmp_path / "project")).metrics
    assert (metrics["ok"], metrics["quarantined"]) == (1, 1)


@pytest.mark.services
def test_same_size_edits_and_deletions_on_s3_reach_the_mirror(s3_server, tmp_path, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    # Uncompressed NIfTI: an image with other voxel values has exactly the same size.
    local = write_msd(tmp_path / "upload", {f"case_{i}": phantom(seed=i) for i in range(2)}, suffix=".nii")
    fs = s3_server.filesystem()
    prefix = f"{s3_server.bucket}/raw/edited"
    fs.put(str(local) + "/", prefix + "/", recursive=True)
    cfg = MeduetConfig.model_validate({
        "storage": {"s3_endpoint_url": s3_server.endpoint_url},
        "harmonize": {"datasets": [{"name": "s3site", "root": f"s3://{prefix}", "domain": "site_s3"}],
                      "target_spacing": [2.0, 2.0, 2.0], "min_size": [16, 16, 16], "divisible_by": 8, "workers": 1},
    })
    paths = Paths.resolve(cfg, tmp_path / "project")
    harmonize.run(cfg.harmonize, paths)
    before = {r.key: r.image_sha256 for r in read_manifest(paths.harmonized / "manifest.csv")}

    edited = tmp_path / "edited.nii"
    image, _ = phantom(seed=1)
    sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16) * 0 + image // 2, str(edited))  # other values, same shape
    original = local / "imagesTr" / "case_0.nii"
    assert edited.stat().st_size == original.stat().st_size and edited.read_bytes() != original.read_bytes()
    fs.put(str(edited), f"{prefix}/imagesTr/case_0.nii")
    fs.rm(f"{prefix}/labelsTr/case_1.nii")

    metrics = harmonize.run(cfg.harmonize, paths).metrics
    mirror = paths.work / "s3-mirror" / "s3" / prefix
    assert (mirror / "imagesTr" / "case_0.nii").read_bytes() == edited.read_bytes()  # fetched again
    assert not (mirror / "labelsTr" / "case_1.nii").exists()  # the deletion reached the mirror
    after = {r.key: r for r in read_manifest(paths.harmonized / "manifest.csv")}
    assert after["s3site__case_0"].status == "ok" and after["s3site__case_0"].image_sha256 != before["s3site__case_0"]
    assert after["s3site__case_1"].status == "quarantined" and "case_1.nii" in after["s3site__case_1"].reason
    assert metrics["processed"] == 2 and metrics["reused"] == 0
