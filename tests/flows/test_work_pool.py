"""The cluster path of the flow: ``prefect deploy --all`` (prefect.yaml) on a real Prefect server, a
process worker running the runs, and what two runs at once do.

The project is a tiny copy (tests/conftest.py) with ``prefect.yaml`` beside its ``dvc.yaml``;
runs select the cheap ``demo_data`` stage (flow parameter ``stages``). Two runs started together
must not overlap: Prefect holds the second (AwaitingConcurrencySlot) until the first ends, and
both complete. A run that finds the project lock taken (a run outside this deployment, e.g.
``make run`` on the same folder) fails at once, naming the holder, and writes nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from flows.local import PrefectServer, Service, background, prefect_server, tool, wait_until
from meduet.io.locks import output_lock
from tests.conftest import REPO_ROOT, make_project

POOL = "meduet"  # prefect.yaml's work pool
CRON = "0 3 * * 0"
DEMO_ONLY = {"stages": ["demo_data"], "force": True}  # a real run, seconds long
TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Deployed:
    server: PrefectServer
    project: Path
    deployment: dict[str, Any]
    worker: Service


def _pool_exists(server: PrefectServer) -> bool:
    try:
        server.api("GET", f"/work_pools/{POOL}")
        return True
    except OSError:  # urllib's HTTPError (404 until the worker created it) and URLError
        return False


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    """A Prefect server, a process worker on pool ``meduet``, and ``prefect deploy --all`` done."""
    tmp = tmp_path_factory.mktemp("work-pool")
    project = make_project(tmp / "project", {"orchestration.cron": CRON})
    shutil.copy2(REPO_ROOT / "prefect.yaml", project / "prefect.yaml")
    with pytest.MonkeyPatch.context() as patch, ExitStack() as stack:
        # A run held back by the concurrency limit is retried after this (30 s by default).
        patch.setenv("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "2")
        server = stack.enter_context(prefect_server(tmp / "prefect-home", timeout_s=TIMEOUT_S))
        env = {**server.client_env(), "PREFECT_WORKER_QUERY_SECONDS": "1"}
        # The pool's first worker creates it (`prefect work-pool create` looks worker types up online).
        worker_args = [tool("prefect"), "worker", "start", "--pool", POOL, "--type", "process"]
        worker = stack.enter_context(background("prefect worker", worker_args, env, tmp / "worker.log", cwd=tmp))
        wait_until(worker, lambda: _pool_exists(server), f"work pool {POOL}", TIMEOUT_S)
        deploy = subprocess.run([tool("prefect"), "--no-prompt", "deploy", "--all"], cwd=project, env=env,
                                capture_output=True, text=True, timeout=TIMEOUT_S)
        assert deploy.returncode == 0, f"{deploy.stdout[-3000:]}\n{deploy.stderr[-3000:]}"
        deployment = server.api("GET", "/deployments/name/meduet/full-pipeline")
        yield Deployed(server=server, project=project, deployment=deployment, worker=worker)
    assert not worker.group_alive() and not server.service.group_alive()


def _start(deployed: Deployed, parameters: dict[str, Any]) -> str:
    """A flow run of the deployment, scheduled now (as the cron or `prefect deployment run` makes it)."""
    run = deployed.server.api("POST", f"/deployments/{deployed.deployment['id']}/create_flow_run",
                              {"parameters": parameters})
    return run["id"]


def _finished(server: PrefectServer, run_ids: list[str]) -> list[dict[str, Any]]:
    """The flow runs, once all are in a final state."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        runs = [server.api("GET", f"/flow_runs/{run_id}") for run_id in run_ids]
        if all(run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for run in runs):
            return runs
        assert time.monotonic() < deadline, [run["state"] for run in runs]
        time.sleep(0.5)


def _state_names(server: PrefectServer, run_id: str) -> list[str]:
    return [state["name"] for state in server.api("GET", f"/flow_run_states/?flow_run_id={run_id}")]


def _utc(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@pytest.mark.services
def test_deploy_all_registers_the_pipeline_on_the_process_pool_and_a_worker_runs_it(deployed: Deployed) -> None:
    deployment, project = deployed.deployment, deployed.project
    assert deployment["work_pool_name"] == POOL
    assert deployment["entrypoint"] == "flows.pipeline.meduet"
    assert deployment["parameters"] == {"project_dir": str(project), "params": "params.yaml"}
    (schedule,) = deployment["schedules"]
    assert (schedule["schedule"]["cron"], schedule["schedule"]["timezone"], schedule["active"]) == (CRON, "UTC", True)
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"

    # Started the way an operator would; the worker picks it up and runs it in the project.
    watch = subprocess.run(
        [tool("prefect"), "deployment", "run", "meduet/full-pipeline", "--params", json.dumps(DEMO_ONLY), "--watch",
         "--watch-timeout", str(int(TIMEOUT_S))],
        env=deployed.server.client_env(), capture_output=True, text=True, timeout=TIMEOUT_S + 30,
    )
    assert watch.returncode == 0, f"{watch.stdout[-3000:]}\n{watch.stderr[-2000:]}\n{deployed.worker.log_tail(40)}"
    run = deployed.server.latest_flow_run(deployment["id"])
    assert run["state"]["type"] == "COMPLETED" and run["work_pool_name"] == POOL
    assert run["id"] in deployed.worker.log_path.read_text()
    assert (project / "reports" / "demo_data" / "metrics.json").is_file()
    assert (project / "reports" / "index.html").is_file()


@pytest.mark.services
def test_two_runs_at_once_run_one_after_the_other_and_both_complete(deployed: Deployed) -> None:
    # A manual run and the cron firing meanwhile look the same to Prefect: two runs due now.
    first, second = _start(deployed, DEMO_ONLY), _start(deployed, DEMO_ONLY)
    runs = _finished(deployed.server, [first, second])
    assert [run["state"]["type"] for run in runs] == ["COMPLETED", "COMPLETED"], [r["state"] for r in runs]
    earlier, later = sorted(runs, key=lambda run: _utc(run["start_time"]))
    assert _utc(earlier["end_time"]) <= _utc(later["start_time"]), "the two runs overlapped"
    assert "AwaitingConcurrencySlot" in _state_names(deployed.server, later["id"])


@pytest.mark.services
def test_a_run_finding_the_project_locked_fails_at_once_naming_the_holder(deployed: Deployed) -> None:
    project = deployed.project
    metrics = project / "reports" / "demo_data" / "metrics.json"
    before = metrics.stat().st_mtime_ns if metrics.exists() else None
    # This test holds the lock as another run of the project would (another deployment, `make run`).
    with output_lock(project / ".work" / "locks", project, owner="make run in another shell"):
        (run,) = _finished(deployed.server, [_start(deployed, DEMO_ONLY)])
    assert run["state"]["type"] == "FAILED"
    message = run["state"]["message"]
    assert "another run is writing here" in message and "make run in another shell" in message, message
    assert (metrics.stat().st_mtime_ns if metrics.exists() else None) == before  # no stage ran
