"""End to end through real services: a Prefect server, the served deployment, S3 for push.

Flow runs are started the way an operator would (``prefect deployment run ... --watch``).
The first must finish Completed with every dvc.yaml output written, every metrics/plots
file published as an artifact, the results report written and published, and the DVC cache
pushed to the S3 endpoint; the second passes flow parameters through the deployment (one
stage, forced: the last one, a Ray training stage, runs under the served flow).

The project is a copy of the session's reproduced tiny project (tests/conftest.py): that
``dvc repro`` from scratch is tested in tests/test_dvc_pipeline.py, so the flow here starts
where it left off and finds its stages up to date, except harmonize (its params name the S3
endpoint, set here), which DVC runs again under the flow.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from flows.local import PrefectServer, ServedDeployment, prefect_server, served_deployment, tool
from flows.pipeline import REPORT_ARTIFACT_KEY, artifact_key
from meduet.dvc_graph import load_stages
from tests.conftest import write_params


def _deployment_run(server: PrefectServer, deployment: ServedDeployment, params: dict | None = None) -> dict:
    """``prefect deployment run <name> --watch``; returns the flow run it started."""
    # The watch timeout guards against a hang; it is no speed test (2 busy cores can take minutes).
    args = [tool("prefect"), "deployment", "run", deployment.name, "--watch", "--watch-timeout", "600"]
    args += ["--params", json.dumps(params)] if params else []
    watch = subprocess.run(
        args, env=server.client_env(), capture_output=True, encoding="utf-8", errors="replace", check=False
    )
    assert watch.returncode == 0, (
        f"{watch.stdout}\n{watch.stderr}\n--- serve log ---\n{deployment.service.log_tail(60)}"
    )
    run = server.latest_flow_run(deployment.id)
    assert run is not None and run["state"]["type"] == "COMPLETED"
    return run


def _log_text(server: PrefectServer, flow_run_id: str) -> str:
    """Every log line of a flow run (its tasks' DVC and stage output included), page by page."""
    messages: list[str] = []
    while True:
        page = server.api("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200,
                                                   "offset": len(messages)})
        messages += [entry["message"] for entry in page]
        if len(page) < 200:
            return "\n".join(messages)


@pytest.mark.services
def test_served_deployment_runs_pipeline_and_pushes(reproduced_copy: Path, s3_server, tmp_path: Path, dvc) -> None:
    project = reproduced_copy
    write_params(project, {
        "storage.dvc_remote_url": f"s3://{s3_server.bucket}/served",
        "storage.s3_endpoint_url": s3_server.endpoint_url,
    })
    with prefect_server(tmp_path / "prefect-home") as server:
        with served_deployment(server, project, env=s3_server.env) as deployment:
            assert deployment.name == "meduet/full-pipeline"
            first = _deployment_run(server, deployment)
            assert "Running stage 'harmonize'" in _log_text(server, first["id"])  # a stage ran under the flow
            published_artifacts = server.artifacts(first["id"])
            artifacts = {a["key"] for a in published_artifacts}
            progress = {a["key"]: a["data"] for a in published_artifacts if a["type"] == "progress"}

            stages = load_stages(project)
            for stage in stages:
                assert all((project / rel).exists() for rel in stage.outputs), stage.name
                assert {artifact_key(stage.name, rel) for rel in stage.metrics + stage.plots} <= artifacts
                assert progress[artifact_key(stage.name, "progress")] == 100.0, stage.name  # a finished stage
            assert dvc(project, "status", "--json").stdout.strip() in ("{}", "")
            # The run ends with the results report: the HTML page and its markdown artifact.
            assert REPORT_ARTIFACT_KEY in artifacts and (project / "reports" / "index.html").is_file()
            assert s3_server.filesystem().find(f"{s3_server.bucket}/served"), "dvc push sent nothing"
            # Every file of every DVC output is in the remote, not just something.
            cloud = dvc(project, "status", "--cloud", "--json", env=s3_server.env).stdout.strip()
            assert cloud in ("{}", ""), cloud

            last = stages[-1].name
            second = _deployment_run(server, deployment, {"stages": [last], "force": True})
            log = _log_text(server, second["id"])
            assert f"Running stage '{last}'" in log
            # No secret in any log line or artifact (the credentials went to every stage and dvc push).
            published = _log_text(server, first["id"]) + log + json.dumps(server.artifacts(first["id"]))
            assert "Running stage" in published
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert s3_server.env[name] not in published, f"{name} leaked into the Prefect logs"
            assert all(f"stage '{s.name}'" not in log for s in stages[:-1])

    # Leaving the context managers stopped both process groups, children included.
    assert not server.service.group_alive() and not deployment.service.group_alive()


def _artifact_events(server: PrefectServer, key: str) -> list[dict]:
    """The events the server has stored for the artifact collection ``key``."""
    page = server.api("POST", "/events/filter", {
        "filter": {"event": {"prefix": ["prefect.artifact-collection."]}}, "limit": 50})
    return [event for event in page["events"] if event["resource"].get("prefect.resource.name") == key]


@pytest.mark.services
def test_the_server_keeps_the_event_of_an_artifact_as_large_as_the_demo_report(tmp_path: Path) -> None:
    # Prefect puts an artifact's data into the event it emits for it and by default drops events over 1.5 MB, with
    # a warning in the server's log: the demo's results report (every figure embedded) is 3.2 MB, so the event that
    # an automation on the report would react to was lost at the end of every `make run`.
    key = "large-report"
    with prefect_server(tmp_path / "prefect-home") as server:
        server.api("POST", "/artifacts/", {"key": key, "type": "markdown", "data": "x" * 3_200_000})
        deadline = time.monotonic() + 120  # events are stored in batches; this guards against a hang only
        while not _artifact_events(server, key):
            assert "Refusing to publish" not in server.service.log_tail(50), server.service.log_tail(50)
            assert time.monotonic() < deadline, server.service.log_tail(50)
            time.sleep(1)
