"""Independent stages run side by side in the flow, for real: a local Prefect server (SQLite),
``dvc repro`` per stage, and stage commands that record when they ran.

A started server rather than the ephemeral one Prefect starts inside a flow called without an
API URL: on a busy 2-core machine the ephemeral server once timed out starting and left the flow
process hanging until the test's own timeout.

The graph is ``a -> (b, c) -> d``. With two lanes b and c overlap, d waits for both, and DVC
records every stage although two ``dvc repro`` processes shared the repository. When c fails,
b (already running beside it) still finishes and is recorded, d never starts, and the run fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.local import prefect_server
from flows.pipeline import Slots, stage_env, stage_slots
from meduet.config import MeduetConfig
from meduet.dvc_graph import Stage
from tests.conftest import REPO_ROOT

STAGE_SCRIPT = """\
import json, sys, time
name, seconds, fail = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "fail"
start = time.time()
time.sleep(seconds)
if fail:
    sys.exit(f"stage {name} fails on purpose")
with open(f"out/{name}.json", "w") as fh:
    json.dump({"start": start, "end": time.time()}, fh)
"""

RUN_FLOWS = """\
import json, sys
from flows.pipeline import meduet
results = {}
for project in sys.argv[1:]:
    try:
        results[project] = {"stages": meduet(project_dir=project)["stages"]}
    except Exception as error:
        results[project] = {"error": str(error)}
print("RESULTS " + json.dumps(results))
"""


def _project(root: Path, failing: str | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "stage.py").write_text(STAGE_SCRIPT)
    (root / "out").mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump({
        "ray": {"local_num_cpus": 1},
        "orchestration": {"parallel_stages": 2, "push": False, "task_retries": 0, "cron": None}}))

    def stage(name: str, seconds: float, deps: list[str]) -> dict:
        mode = "fail" if name == failing else "ok"
        return {"cmd": f"python stage.py {name} {seconds} {mode}", "deps": ["stage.py", *deps],
                "outs": [f"out/{name}.json"]}

    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": stage("a", 0, []),
        "b": stage("b", 3, ["out/a.json"]),
        "c": stage("c", 3 if failing is None else 0.5, ["out/a.json"]),
        "d": stage("d", 0, ["out/b.json", "out/c.json"]),
    }}, sort_keys=False))
    subprocess.run([Path(sys.executable).parent / "dvc", "init", "--no-scm", "-q"], cwd=root, check=True,
                   env=stage_env(root))
    return root


def _times(project: Path, name: str) -> dict[str, float]:
    return json.loads((project / "out" / f"{name}.json").read_text())


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two lanes need two CPUs at ray.local_num_cpus 1")
def test_independent_stages_run_side_by_side_and_a_failure_lets_the_running_ones_finish(tmp_path: Path) -> None:
    parallel, failing = _project(tmp_path / "parallel"), _project(tmp_path / "failing", failing="c")
    with prefect_server(tmp_path / "prefect") as server:
        env = {**server.client_env(stage_env(REPO_ROOT)), "PYTHONPATH": str(REPO_ROOT)}
        done = subprocess.run([sys.executable, "-c", RUN_FLOWS, str(parallel), str(failing)], cwd=REPO_ROOT,
                              env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, f"the flows did not finish ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    results = json.loads(lines[-1].removeprefix("RESULTS "))

    assert results[str(parallel)] == {"stages": {"a": "ran", "b": "ran", "c": "ran", "d": "ran"}}
    a, b, c, d = (_times(parallel, name) for name in "abcd")
    assert a["end"] <= min(b["start"], c["start"])
    assert max(b["start"], c["start"]) < min(b["end"], c["end"])  # b and c overlapped
    assert d["start"] >= max(b["end"], c["end"])
    lock = yaml.safe_load((parallel / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"a", "b", "c", "d"}  # both repro processes recorded their stage

    assert "stage 'c' failed" in results[str(failing)]["error"]
    assert _times(failing, "b")["end"] > _times(failing, "b")["start"]  # b, running beside c, finished
    assert not (failing / "out" / "d.json").exists()  # nothing started after the failure
    assert set(yaml.safe_load((failing / "dvc.lock").read_text())["stages"]) == {"a", "b"}


VAE, MAE, VIT, EVAL = "train_vae", "pretrain_mae", "pretrain", "evaluate_disentanglement"


def _slots(monkeypatch: pytest.MonkeyPatch, cpus: int, ray: dict, parallel: int = 2) -> Slots:
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = MeduetConfig.model_validate({"ray": ray, "orchestration": {"parallel_stages": parallel}})
    return stage_slots(cfg, [Stage(name, "true", (), (), (), ()) for name in (VAE, MAE, VIT, EVAL)])


def test_stages_side_by_side_never_oversubscribe_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    demo = _slots(monkeypatch, 2, {"local_num_cpus": 1, "stage_cpus": {VAE: 2}})
    assert demo.demand == {VAE: 2, MAE: 1, VIT: 1, EVAL: 1}
    assert demo.fits(VIT, [MAE]) and not demo.fits(VAE, [MAE]) and not demo.fits(MAE, [VAE])
    assert demo.fits(VAE, [])  # alone a stage always runs
    assert not _slots(monkeypatch, 2, {"local_num_cpus": 1}, parallel=1).fits(VIT, [MAE])  # the cap
    assert not _slots(monkeypatch, 2, {}).fits(VIT, [MAE])  # null: every core, so one at a time
    assert not _slots(monkeypatch, 2, {"local_num_cpus": 8}).fits(VIT, [MAE])  # more than the machine: all
    many = _slots(monkeypatch, 16, {"local_num_cpus": 4}, parallel=8)
    assert many.fits(EVAL, [MAE, VIT, VAE])  # 4 x 4 = 16
    assert not _slots(monkeypatch, 12, {"local_num_cpus": 4}, parallel=8).fits(EVAL, [MAE, VIT, VAE])


def test_on_a_cluster_ray_shares_the_cpus_and_only_the_cap_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    slots = _slots(monkeypatch, 2, {"address": "ray://head:10001"}, parallel=3)
    assert slots.cpus is None and slots.fits(VIT, [MAE, EVAL]) and not slots.fits(VIT, [MAE, EVAL, VAE])


def test_stage_cpus_names_must_be_stages() -> None:
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['train-vae'\]: use dvc.yaml's names"):
        MeduetConfig.model_validate({"ray": {"stage_cpus": {"train-vae": 2}}})
