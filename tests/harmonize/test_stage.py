import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
import yaml

from meduet.config import MeduetConfig, Paths
from meduet.harmonize.manifest import read_manifest
from meduet.stages import harmonize
from tests.harmonize.synth import phantom, write_msd

HARMONIZE = {"target_spacing": [2.0, 2.0, 2.0], "min_size": [16, 16, 16], "divisible_by": 8, "workers": 2}


def _config(root: Path, datasets: list[dict], **overrides) -> tuple[MeduetConfig, Paths]:
    cfg = MeduetConfig.model_validate({"harmonize": {**HARMONIZE, "datasets": datasets, **overrides}})
    return cfg, Paths.resolve(cfg, root)


def _msd_site(root: Path, n: int, seed: int = 0, size=(48, 40, 20)) -> Path:
    cases = {f"case_{i:02d}": phantom(size_xyz=size, seed=seed + i) for i in range(n)}
    return write_msd(root, cases)


def _nnunet_site(root: Path) -> Path:
    image, label = phantom(seed=7)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    sitk.WriteImage(image, str(root / "imagesTr" / "pat1_0000.nii.gz"))
    sitk.WriteImage(label, str(root / "labelsTr" / "pat1.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0},
                                                   "numTraining": 1, "file_ending": ".nii.gz"}))
    return root


def _ds(name: str, root: Path, domain: str) -> dict:
    return {"name": name, "root": str(root), "domain": domain, "body_part": "abdomen"}


def test_stage_harmonizes_good_cases_and_quarantines_bad_ones(tmp_path):
    site_a = _msd_site(tmp_path / "raw" / "a", 2)
    (tmp_path / "raw" / "outside.nii.gz").write_bytes((site_a / "imagesTr" / "case_00.nii.gz").read_bytes())
    broken = site_a / "imagesTr" / "case_broken.nii.gz"
    whole = (site_a / "imagesTr" / "case_01.nii.gz").read_bytes()
    broken.write_bytes(whole[: len(whole) // 2])
    meta = json.loads((site_a / "dataset.json").read_text())
    meta["training"] += [{"image": "./imagesTr/case_broken.nii.gz"}, {"image": "../outside.nii.gz"},
                         {"image": "./imagesTr/case_gone.nii.gz"}]
    (site_a / "dataset.json").write_text(json.dumps(meta))
    site_b = _nnunet_site(tmp_path / "raw" / "b")
    cfg, paths = _config(tmp_path, [_ds("a", site_a, "site_a"), _ds("b", site_b, "site_b"),
                                    _ds("c", tmp_path / "raw" / "missing", "site_c")])

    result = harmonize.run(cfg.harmonize, paths)

    assert result.metrics["ok"] == 3 and result.metrics["quarantined"] == 4
    assert result.metrics["ok_per_domain"] == {"site_a": 2, "site_b": 1}
    records = {r.key: r for r in read_manifest(paths.harmonized / "manifest.csv")}
    assert len(records) == 7
    assert "escapes the dataset root" in records["a__outside"].reason
    assert "truncated" in records["a__case_broken"].reason and str(broken) in records["a__case_broken"].reason
    assert "file not found" in records["a__case_gone"].reason
    assert "dataset folder not found" in records["c__dataset.json"].reason
    good = records["b__pat1"]
    assert good.status == "ok" and good.image == "b/imagesTr/pat1.nii.gz" and good.label == "b/labelsTr/pat1.nii.gz"
    out = sitk.ReadImage(str(paths.harmonized / good.image))
    assert out.GetSpacing() == (2.0, 2.0, 2.0) and all(n % 8 == 0 for n in out.GetSize())
    assert list(out.GetSize()) == good.out_size
    report = (paths.reports / "harmonize" / "report.md").read_text()
    assert "a__case_broken" in report and "escapes the dataset root" in report
    fingerprint = json.loads((paths.reports / "harmonize" / "fingerprint.json").read_text())
    assert set(fingerprint) == {"site_a", "site_b"}
    assert fingerprint["site_a"]["spacing_z_mm"]["median"] == pytest.approx(2.5)
    assert (paths.reports / "harmonize" / "montage.png").stat().st_size > 1000


def test_rerun_reuses_finished_cases_and_a_setting_change_redoes_them(tmp_path):
    site = _msd_site(tmp_path / "raw", 3)
    cfg, paths = _config(tmp_path, [_ds("a", site, "site_a")])
    first = harmonize.run(cfg.harmonize, paths)
    manifest = (paths.harmonized / "manifest.csv").read_bytes()
    second = harmonize.run(cfg.harmonize, paths)
    assert (first.metrics["processed"], second.metrics["processed"], second.metrics["reused"]) == (3, 0, 3)
    assert (paths.harmonized / "manifest.csv").read_bytes() == manifest  # idempotent

    changed, paths = _config(tmp_path, [_ds("a", site, "site_a")], foreground_margin=4)
    assert harmonize.run(changed.harmonize, paths).metrics["processed"] == 3
    # an edited input file is redone, the others reused
    sitk.WriteImage(phantom(seed=99)[0], str(site / "imagesTr" / "case_01.nii.gz"), useCompression=True)
    metrics = harmonize.run(changed.harmonize, paths).metrics
    assert (metrics["processed"], metrics["reused"]) == (1, 2)


def test_outputs_of_dropped_cases_and_stale_temp_files_are_pruned(tmp_path):
    site = _msd_site(tmp_path / "raw", 2)
    cfg, paths = _config(tmp_path, [_ds("a", site, "site_a")])
    harmonize.run(cfg.harmonize, paths)
    stale_tmp = paths.harmonized / "a" / "imagesTr" / ".case_00.nii.gz.x1.tmp.nii.gz"
    stale_tmp.write_bytes(b"partial")
    meta = json.loads((site / "dataset.json").read_text())
    meta["training"] = meta["training"][:1]
    (site / "dataset.json").write_text(json.dumps(meta))
    metrics = harmonize.run(cfg.harmonize, paths).metrics
    assert metrics["cases"] == 1 and metrics["pruned_files"] == 4  # image, label, record, temp file
    assert not stale_tmp.exists() and not (paths.harmonized / "a" / "imagesTr" / "case_01.nii.gz").exists()


@pytest.mark.parametrize("outage", ["folder gone", "empty mount point", "index unreadable"])
def test_a_dataset_that_cannot_be_listed_keeps_its_earlier_outputs(tmp_path, outage):
    site_a, site_b = _msd_site(tmp_path / "raw" / "a", 2), _msd_site(tmp_path / "raw" / "b", 1, seed=5)
    cfg, paths = _config(tmp_path, [_ds("a", site_a, "site_a"), _ds("b", site_b, "site_b")])
    harmonize.run(cfg.harmonize, paths)
    before = {p.relative_to(paths.harmonized): p.read_bytes() for p in (paths.harmonized / "a").rglob("*")
              if p.is_file()} | {p.relative_to(paths.harmonized): p.read_bytes()
                                  for p in (paths.harmonized / "records").glob("a__*.json")}
    assert len(before) == 6  # 2 images, 2 labels, 2 records

    hidden = tmp_path / "hidden"
    site_a.rename(hidden)  # an unmounted share: the folder is gone ...
    if outage == "empty mount point":
        site_a.mkdir()  # ... or its mount point is left empty
    elif outage == "index unreadable":
        site_a.mkdir()
        (site_a / "dataset.json").write_text("{ half-written")
    metrics = harmonize.run(cfg.harmonize, paths).metrics

    assert metrics["pruned_files"] == 0 and metrics["kept_from_unlisted"] == 2
    assert list(metrics["unlisted_datasets"]) == ["a"]
    after = {rel: (paths.harmonized / rel).read_bytes() for rel in before}
    assert after == before  # every earlier output of the dataset untouched
    records = {r.key: r for r in read_manifest(paths.harmonized / "manifest.csv")}
    assert {k for k, r in records.items() if r.status == "ok"} == {"a__case_00", "a__case_01", "b__case_00"}
    assert records["a__dataset.json"].status == "quarantined"  # and the outage is reported

    if outage != "folder gone":
        (site_a / "dataset.json").unlink(missing_ok=True)
        site_a.rmdir()
    hidden.rename(site_a)  # back again: nothing to redo, the outage's entry is gone
    metrics = harmonize.run(cfg.harmonize, paths).metrics
    assert (metrics["processed"], metrics["reused"], metrics["unlisted_datasets"]) == (0, 3, {})
    assert "a__dataset.json" not in {r.key for r in read_manifest(paths.harmonized / "manifest.csv")}


def test_a_second_run_on_the_same_output_is_refused_while_the_first_finishes_intact(tmp_path):
    # Enough work that the first run still holds its lock when the second has started up.
    site = _msd_site(tmp_path / "raw", 16, size=(96, 96, 48))
    params = tmp_path / "params.yaml"
    section = {**HARMONIZE, "workers": 1, "datasets": [_ds("a", site, "site_a")]}
    params.write_text(yaml.safe_dump({"harmonize": section}))
    cmd = [sys.executable, "-m", "meduet.cli", "harmonize", "--params", str(params)]
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    locks = tmp_path / ".work" / "locks"
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size for p in locks.glob("*.lock")) if locks.is_dir() else True:
        assert first.poll() is None and time.monotonic() < deadline, "the first run never took its lock"
        time.sleep(0.01)

    second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    out, err = first.communicate(timeout=300)
    assert second.returncode == 1
    assert "data/harmonized: another run is writing here" in second.stderr and f'"pid": {first.pid}' in second.stderr
    assert first.returncode == 0, err[-3000:]
    records = read_manifest(tmp_path / "data" / "harmonized" / "manifest.csv")
    assert len(records) == 16 and all(r.status == "ok" and (tmp_path / "data" / "harmonized" / r.image).is_file()
                                      for r in records)
    assert json.loads(out)["metrics"]["processed"] == 16


def test_killed_run_resumes_without_redoing_finished_cases(tmp_path):
    site = _msd_site(tmp_path / "raw", 10, size=(96, 96, 48))
    params = tmp_path / "params.yaml"
    harmonize_section = {**HARMONIZE, "workers": 1, "datasets": [_ds("a", site, "site_a")]}
    params.write_text(yaml.safe_dump({"harmonize": harmonize_section}))
    cmd = [sys.executable, "-m", "meduet.cli", "harmonize", "--params", str(params)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records_dir = tmp_path / "data" / "harmonized" / "records"

    def finished() -> list[Path]:  # not the hidden temp file of a record being written
        return [p for p in records_dir.glob("*.json") if not p.name.startswith(".")] if records_dir.is_dir() else []

    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if finished():
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: workers too
            break
        time.sleep(0.01)
    proc.wait()
    finished_before = len(finished())
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 1 <= finished_before < 10 and not (tmp_path / "data" / "harmonized" / "manifest.csv").exists()

    resumed = subprocess.run(cmd, cwd=tmp_path, capture_output=True, encoding="utf-8")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads(resumed.stdout)["metrics"]
    assert metrics["reused"] == finished_before
    assert metrics["processed"] == 10 - finished_before
    assert metrics["ok"] == 10

    # identical to an uninterrupted run, and no partial files left behind
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "params.yaml").write_text(params.read_text())
    subprocess.run([*cmd[:-1], str(clean / "params.yaml")], cwd=clean, capture_output=True, check=True)
    hashes = lambda root: {r.key: (r.image_sha256, r.label_sha256)  # noqa: E731
                           for r in read_manifest(root / "data" / "harmonized" / "manifest.csv")}
    assert hashes(tmp_path) == hashes(clean)
    assert not list((tmp_path / "data" / "harmonized").rglob(".*tmp*"))


def test_fail_fast_stops_at_the_first_bad_case(tmp_path):
    site = _msd_site(tmp_path / "raw", 1)
    (site / "imagesTr" / "case_00.nii.gz").write_bytes(b"")
    cfg, paths = _config(tmp_path, [_ds("a", site, "site_a")], fail_fast=True)
    with pytest.raises(harmonize.HarmonizeError, match="fail_fast: a__case_00: .*empty file"):
        harmonize.run(cfg.harmonize, paths)


def test_nothing_usable_fails_the_stage_with_a_pointer_to_the_report(tmp_path):
    cfg, paths = _config(tmp_path, [_ds("a", tmp_path / "nowhere", "site_a")])
    with pytest.raises(harmonize.HarmonizeError, match="no usable case"):
        harmonize.run(cfg.harmonize, paths)
    assert "dataset folder not found" in (paths.reports / "harmonize" / "report.md").read_text()


def test_cli_exit_codes(tmp_path):
    from meduet.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"harmonize": {"datasets": [_ds("a", tmp_path / "nowhere", "x")]}}))
    assert main(["harmonize", "--params", str(params)]) == 1
    assert main(["harmonize", "--params", str(params), "--set", "harmonize.workers=0"]) == 2
