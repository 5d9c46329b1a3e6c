"""Harmonization tasks that reach the driver's files only through the exchange (``ray.exchange``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meduet.config import MeduetConfig
from meduet.harmonize.case import harmonize_case, input_hash
from meduet.harmonize.datasets import DatasetInfo, discover
from meduet.harmonize.settings import case_settings
from meduet.io.exchange import Exchange
from meduet.stages.harmonize import collect_outputs, hand_over, harmonize_job
from tests.harmonize.test_stage import HARMONIZE, _msd_site

VOLATILE = {"seconds", "source_image", "source_label"}


def test_a_task_without_the_drivers_files_harmonizes_like_a_local_case(tmp_path: Path) -> None:
    site = _msd_site(tmp_path / "raw" / "site", 3, size=(24, 20, 12))
    whole = (site / "imagesTr" / "case_00.nii.gz").read_bytes()
    (site / "imagesTr" / "case_00.nii.gz").write_bytes(whole[: len(whole) // 3])  # a truncated file
    settings = case_settings(MeduetConfig.model_validate({"harmonize": HARMONIZE}).harmonize)
    specs = discover(DatasetInfo("site", site, "a", "abdomen"))
    digests = [input_hash(spec) for spec in specs]
    local = {spec.key: harmonize_case(spec, settings, tmp_path / "local", digest)
             for spec, digest in zip(specs, digests, strict=True)}

    exchange = Exchange(str(tmp_path / "exchange"))
    handed = [hand_over(spec, exchange) for spec in specs]
    site.rename(tmp_path / "raw" / "moved")  # what the task may not open: the driver's raw dataset
    out_dir = tmp_path / "cluster"
    for (spec, handover), digest in zip(handed, digests, strict=True):
        record = harmonize_job((spec, settings, out_dir, digest, handover))
        want = local[spec.key]
        assert not any((out_dir / r).exists() for r in (want.image, want.label) if r)  # the task wrote none
        collect_outputs(record, out_dir, exchange)
        assert record.model_dump(exclude=VOLATILE) == want.model_dump(exclude=VOLATILE)
        assert (record.source_image, record.source_label) == (str(spec.image), str(spec.label))
        if want.status == "ok":
            for relative in (want.image, want.label):
                assert (out_dir / relative).read_bytes() == (tmp_path / "local" / relative).read_bytes()
        else:  # the message names the driver's file, not the task's scratch copy
            assert str(spec.image) in record.reason and "meduet-harmonize-" not in record.reason
    assert sorted(r.status for r in local.values()) == ["ok", "ok", "quarantined"]


def test_a_storage_failure_stops_the_stage_instead_of_quarantining_a_good_case(tmp_path: Path) -> None:
    """An object the task cannot fetch is the exchange's fault: the case must not be recorded as
    quarantined (a rerun would reuse that record and never harmonize it)."""
    from meduet.config import Paths, RayConfig
    from meduet.io.images import sha256_file
    from meduet.stages.harmonize import HarmonizeError, harmonize_cases

    site = _msd_site(tmp_path / "raw" / "site", 2, size=(24, 20, 12))
    settings = case_settings(MeduetConfig.model_validate({"harmonize": HARMONIZE}).harmonize)
    specs = discover(DatasetInfo("site", site, "a", "abdomen"))
    exchange = tmp_path / "exchange"
    broken = sha256_file(specs[1].image)
    (exchange / broken[:2]).mkdir(parents=True)
    (exchange / broken[:2] / broken).write_bytes(b"torn")  # "there" to the uploader, wrong bytes for the task
    ray = RayConfig(exchange=str(exchange))
    paths = Paths.resolve(MeduetConfig(), tmp_path / "project")
    # workers=1: the Ray-task code path, run in this process (map_tasks' one-worker mode)
    finished = harmonize_cases([(spec, input_hash(spec)) for spec in specs], settings, tmp_path / "out", 1,
                               ("ray", ray, paths))
    first = next(finished)
    assert first.key == specs[0].key and first.status == "ok"
    torn = rf"{specs[1].key}: .*object {broken}: holds bytes hashing to .*rerun to resume"
    with pytest.raises(HarmonizeError, match=torn):
        next(finished)


@pytest.mark.services
def test_a_task_reads_an_s3_dataset_from_its_source_not_through_the_exchange(s3_server, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from meduet.config import Paths
    from meduet.io.exchange import ExchangeError
    from meduet.stages.harmonize import discover_all
    from tests.harmonize.synth import phantom, write_msd

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    local = write_msd(tmp_path / "upload", {f"case_{i}": phantom(seed=i) for i in range(3)})
    fs = s3_server.filesystem()
    fs.put(str(local) + "/", f"{s3_server.bucket}/raw/direct/", recursive=True)
    cfg = MeduetConfig.model_validate({
        "storage": {"s3_endpoint_url": s3_server.endpoint_url},
        "harmonize": {**HARMONIZE, "datasets": [{"name": "s3site", "root": f"s3://{s3_server.bucket}/raw/direct",
                                                 "domain": "a"}]}})
    paths = Paths.resolve(cfg, tmp_path / "project")
    settings = case_settings(cfg.harmonize)
    specs = discover_all(cfg.harmonize, paths)
    assert all(spec.source_uri(spec.image).startswith(f"s3://{s3_server.bucket}/raw/direct/") for spec in specs)
    digests = [input_hash(spec) for spec in specs]
    exchange = Exchange(f"s3://{s3_server.bucket}/exchange-direct", paths.s3_options)
    handed = [hand_over(spec, exchange) for spec in specs]
    assert not fs.exists(f"{s3_server.bucket}/exchange-direct")  # no raw case uploaded again
    (paths.work / "s3-mirror").rename(tmp_path / "mirror-moved")  # the driver's copies: not for the task
    fs.pipe(f"{s3_server.bucket}/raw/direct/imagesTr/case_2.nii.gz", b"changed after the driver mirrored it")

    out_dir, outputs = tmp_path / "out", set()
    for (spec, handover), digest in list(zip(handed, digests, strict=True))[:2]:
        record = harmonize_job((spec, settings, out_dir, digest, handover))
        assert record.status == "ok", record.reason
        collect_outputs(record, out_dir, exchange)
        assert (out_dir / record.image).is_file() and (out_dir / record.label).is_file()
        outputs |= {record.image_sha256, record.label_sha256}
    changed = r"raw/direct/imagesTr/case_2.nii.gz: holds bytes hashing to"  # the source moved on: not this case
    with pytest.raises(ExchangeError, match=changed):
        harmonize_job((handed[2][0], settings, out_dir, digests[2], handed[2][1]))
    # the exchange holds the outputs only (identical labels once)
    assert {key.rsplit("/", 1)[1] for key in fs.find(f"{s3_server.bucket}/exchange-direct")} == outputs
