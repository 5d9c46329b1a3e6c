"""meduet.cli: every stage run leaves its wall time in ``reports/<stage>/timing.json``."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from meduet import cli
from meduet.stages import STAGES, StageResult, StageTiming


def _fake_stage(monkeypatch: pytest.MonkeyPatch, run) -> None:
    """``meduet train-vae`` calls ``run`` instead of the real stage."""
    spec = SimpleNamespace(section="vae", extra=("ray",), help="a stand-in", load=lambda: run)
    monkeypatch.setitem(STAGES, "train-vae", spec)


def test_stage_run_records_its_wall_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "params.yaml").write_text("paths: {reports_dir: out/reports}\n")
    ticks = iter([100.0, 112.25])
    monkeypatch.setattr(cli.time, "perf_counter", lambda: next(ticks))
    _fake_stage(monkeypatch, lambda cfg, paths, ray: StageResult("train-vae", metrics={"loss": 1.0}))

    assert cli.main(["train-vae", "--params", str(tmp_path / "params.yaml")]) == 0

    timing = StageTiming.read(tmp_path / "out" / "reports", "train_vae")  # the dvc.yaml name, as the report reads it
    assert timing is not None and timing.seconds == 12.25 and timing.ok
    assert datetime.fromisoformat(timing.finished).utcoffset().total_seconds() == 0


def test_a_failing_stage_is_timed_as_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "params.yaml").write_text("{}\n")

    def broken(cfg, paths, ray):
        raise cli.StageError("no input")

    _fake_stage(monkeypatch, broken)
    assert cli.main(["train-vae", "--params", str(tmp_path / "params.yaml")]) == 1
    recorded = json.loads((tmp_path / "reports" / "train_vae" / "timing.json").read_text())
    assert recorded["ok"] is False and recorded["stage"] == "train_vae" and recorded["seconds"] >= 0


@pytest.fixture
def torch_threads():
    """Restores this process's torch thread count after a stage run set it."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("extra", "library_env"), [(("ray",), False), ((), True)])
def test_a_stage_gets_its_cpus_for_its_ray_and_its_own_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               torch_threads, extra: tuple[str, ...],
                                                               library_env: bool) -> None:
    import torch

    for name in cli.THREAD_ENV:
        monkeypatch.delenv(name, raising=False)  # restored after the test
    (tmp_path / "params.yaml").write_text("ray: {local_num_cpus: 2, stage_cpus: {train_vae: 1}}\n")
    seen = {}

    def stage(cfg, paths, **sections):
        seen.update(ray=sections.get("ray"), threads=torch.get_num_threads(),
                    env={name: cli.os.environ.get(name) for name in cli.THREAD_ENV})
        return StageResult("train-vae")

    monkeypatch.setitem(STAGES, "train-vae", SimpleNamespace(section="vae", extra=extra, help="", load=lambda: stage))
    assert cli.main(["train-vae", "--params", str(tmp_path / "params.yaml")]) == 0
    assert seen["threads"] == 1  # its stage_cpus entry, not local_num_cpus
    if extra:
        assert seen["ray"].local_num_cpus == 1  # its local Ray's CPUs
    # A stage on Ray leaves the BLAS/OpenMP variables to Ray (per worker); one without sets them.
    assert seen["env"] == {name: "1" if library_env else None for name in cli.THREAD_ENV}
