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
    with pytest.raises(HarmonizeError, match=rf"{specs[1].key}: .*object {broken} holds bytes hashing to .*rerun to resume"):
        next(finished)
