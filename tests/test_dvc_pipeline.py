"""dvc.yaml as the pipeline: it reproduces, it is idempotent, and it reruns only what changed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from flows.dag import load_stages


def _status(dvc, project: Path) -> dict:
    return json.loads(dvc(project, "status", "--json").stdout or "{}")


def test_repro_reproduces_every_declared_output(reproduced_project: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    project, first = reproduced_project
    for stage in load_stages(project):
        assert f"Running stage '{stage.name}'" in first.stdout
        missing = [rel for rel in stage.outputs if not (project / rel).exists()]
        assert not missing, f"{stage.name} did not write {missing}"
        for rel in stage.outputs:  # real contents, not just a name: no empty folder or file
            path = project / rel
            files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            assert files and all(f.stat().st_size > 0 for f in files), (stage.name, rel)
        for rel in stage.metrics:
            metrics = json.loads((project / rel).read_text())
            assert isinstance(metrics, dict) and metrics, (stage.name, rel)
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert set(lock) == {stage.name for stage in load_stages(project)}  # every stage recorded with its hashes


def test_second_repro_runs_nothing(reproduced_copy: Path, dvc) -> None:
    assert _status(dvc, reproduced_copy) == {}
    again = dvc(reproduced_copy, "repro")
    assert "Running stage" not in again.stdout
    for stage in load_stages(reproduced_copy):
        assert f"Stage '{stage.name}' didn't change" in again.stdout


def test_harmonize_param_change_reruns_only_harmonize(reproduced_copy: Path, dvc) -> None:
    params_path = reproduced_copy / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["harmonize"]["intensity"]["a_max"] = 300.0
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))

    assert set(_status(dvc, reproduced_copy)) == {"harmonize"}
    rerun = dvc(reproduced_copy, "repro")
    assert "Stage 'demo_data' didn't change" in rerun.stdout
    assert "Running stage 'demo_data'" not in rerun.stdout
    assert "Running stage 'harmonize'" in rerun.stdout
    assert _status(dvc, reproduced_copy) == {}
