"""dvc.yaml as the pipeline: it reproduces, it is idempotent, and it reruns only what changed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
import yaml

from meduet.dvc_graph import load_stages


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


def test_repro_prints_no_error_line_about_ray_trains_preemption_watcher(
        reproduced_project: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """It came with every training stage; each starts a local Ray, where fit turns the watcher off."""
    _, first = reproduced_project
    output = first.stdout + first.stderr
    assert "Started training worker group" in output  # the Ray Train stages ran here, their lines shown
    assert "PreemptionWatcher" not in output


def test_second_repro_runs_nothing(reproduced_copy: Path, dvc) -> None:
    assert _status(dvc, reproduced_copy) == {}
    again = dvc(reproduced_copy, "repro")
    assert "Running stage" not in again.stdout
    for stage in load_stages(reproduced_copy):
        assert f"Stage '{stage.name}' didn't change" in again.stdout


def test_harmonize_param_change_reruns_only_harmonize(reproduced_copy: Path, dvc) -> None:
    # A harmonize param that does not change a harmonized volume (the worker count): DVC
    # reruns harmonize, which reuses every case, so the stages downstream see the same data
    # and stay put. (A param that changes the volumes reruns everything downstream too: the
    # whole tiny pipeline again, for nothing more DVC could show here. Which settings change
    # the volumes is the stage's business: tests/harmonize/test_stage.py.)
    params_path = reproduced_copy / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    assert params["harmonize"]["workers"] != 2
    params["harmonize"]["workers"] = 2
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))

    assert set(_status(dvc, reproduced_copy)) == {"harmonize"}
    rerun = dvc(reproduced_copy, "repro")
    assert "Stage 'demo_data' didn't change" in rerun.stdout
    assert "Running stage 'demo_data'" not in rerun.stdout
    assert "Running stage 'harmonize'" in rerun.stdout
    downstream = [s.name for s in load_stages(reproduced_copy) if s.name not in ("demo_data", "harmonize")]
    assert downstream  # all downstream of harmonize, whose outputs did not change
    for stage in downstream:
        assert f"Stage '{stage}' didn't change" in rerun.stdout, stage
        assert f"Running stage '{stage}'" not in rerun.stdout, stage
    assert _status(dvc, reproduced_copy) == {}


def test_replacing_pretrained_vae_weights_in_place_reruns_train_vae(reproduced_copy: Path, dvc) -> None:
    weights = reproduced_copy / "data" / "pretrained" / "vae.pt"
    saved = torch.load(reproduced_copy / "models" / "vae" / "vae.pt", weights_only=True)
    torch.save({"state_dict": saved["state_dict"]}, weights)
    params_path = reproduced_copy / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["vae"]["pretrained"] = "data/pretrained/vae.pt"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    assert "Running stage 'train_vae'" in dvc(reproduced_copy, "repro", "train_vae").stdout
    assert "train_vae" not in _status(dvc, reproduced_copy)

    # Same path, new content (e.g. a newer release of the weights copied over the old file).
    torch.save({"state_dict": {k: v + 0.01 if v.is_floating_point() else v for k, v in saved["state_dict"].items()}},
               weights)
    assert "train_vae" in _status(dvc, reproduced_copy)
    dvc(reproduced_copy, "repro", "train_vae")
    loaded = torch.load(reproduced_copy / "models" / "vae" / "vae.pt", weights_only=True)["state_dict"]
    key = next(k for k, v in saved["state_dict"].items() if v.is_floating_point())
    torch.testing.assert_close(loaded[key], saved["state_dict"][key] + 0.01)  # the new weights, not the old
