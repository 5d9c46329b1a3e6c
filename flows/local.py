"""Real local services for ``make run`` and the tests: a Prefect server, a served
deployment, an S3 endpoint (moto). Each is a context manager around a subprocess.

Every process starts in its own session (``start_new_session=True``, so its own process
group), binds 127.0.0.1 only, runs with the offline environment, writes its output to a
log file, and is stopped on exit by signalling that process group: SIGTERM, then SIGKILL
after a grace period. Nothing is found or killed by name. A service that dies or does not
become ready raises ``ServiceError`` with the tail of its log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from meduet.env import free_port, offline_env

HOST = "127.0.0.1"
# Prefect puts an artifact's data into the event it emits for it and drops events over its limit (1.5 MB by default)
# with a warning: the results report embeds every figure (3.2 MB for the demo), and its event is what an automation
# on the report reacts to. A server of your own needs the same setting (README: "Running on a cluster").
EVENT_LIMIT_BYTES = 32 * 1024 * 1024
BIN = Path(sys.executable).parent  # prefect, moto_server, dvc of this venv


class ServiceError(RuntimeError):
    """A local service failed to start or stopped working."""


def tool(name: str) -> str:
    return str(BIN / name) if (BIN / name).is_file() else name


# --------------------------------------------------------------------------- processes
@dataclass
class Service:
    """A started subprocess with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def group_alive(self) -> bool:
        """Whether any process of the service's group is left (the group id is the pid:
        the service leads its own session)."""
        try:
            os.killpg(self.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the service's process group; SIGKILL what is left after ``grace_s``."""
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self._signal_group(signal.SIGKILL)
            self.process.wait(timeout=5.0)
        # Helpers that ignore SIGTERM (multiprocessing's resource tracker) leave once
        # the leader is gone; give them a moment, then make sure.
        deadline = time.monotonic() + grace_s
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._signal_group(signal.SIGKILL)


@contextlib.contextmanager
def background(
    name: str, args: list[str], env: Mapping[str, str], log_path: Path, cwd: Path | None = None
) -> Iterator[Service]:
    """Start ``args`` in its own process group, output to ``log_path``; stop it on exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            args, cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    service = Service(name, process, log_path)
    try:
        yield service
    finally:
        service.stop()


def wait_until(service: Service, ready: Callable[[], bool], what: str, timeout_s: float) -> None:
    """Poll ``ready`` until it is true; fail early if ``service`` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not service.running():
            raise ServiceError(
                f"{service.name} exited with code {service.process.returncode} before {what}; "
                f"log {service.log_path}:\n{service.log_tail()}"
            )
        if ready():
            return
        if time.monotonic() > deadline:
            raise ServiceError(f"{service.name}: no {what} after {timeout_s:.0f} s; log {service.log_path}:\n{service.log_tail()}")
        time.sleep(0.5)


BUSY_RETRIES = 5  # a Prefect server on SQLite answers 503 while its database is locked by another writer


def http_json(method: str, url: str, body: Any = None, timeout_s: float = 10.0) -> Any:
    """A JSON request with the standard library; raises ``urllib.error.URLError``.

    A 503 (the server's database busy; nothing was written) is retried with a growing pause.
    """
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(BUSY_RETRIES + 1):
        request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                payload = response.read()
            return json.loads(payload) if payload else None
        except urllib.error.HTTPError as error:
            if error.code != 503 or attempt == BUSY_RETRIES:
                raise
            time.sleep(0.5 * 2**attempt)


def _answers(method: str, url: str) -> bool:
    try:
        http_json(method, url, timeout_s=2.0)
        return True
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return False


# --------------------------------------------------------------------------- prefect
@dataclass
class PrefectServer:
    """A running Prefect API; ``client_env()`` is the environment for its clients."""

    api_url: str
    home: Path
    service: Service

    def client_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = offline_env(None if base is None else dict(base))
        env.update(PREFECT_API_URL=self.api_url, PREFECT_HOME=str(self.home))
        return env

    def api(self, method: str, path: str, body: Any = None) -> Any:
        return http_json(method, f"{self.api_url}{path}", body)

    def latest_flow_run(self, deployment_id: str) -> dict[str, Any] | None:
        """The most recently started flow run of a deployment (not a future scheduled one)."""
        runs = self.api("POST", "/flow_runs/filter", {
            "deployments": {"id": {"any_": [deployment_id]}},
            "flow_runs": {"state": {"type": {"not_any_": ["SCHEDULED"]}}},
            "sort": "START_TIME_DESC", "limit": 1,
        })
        return runs[0] if runs else None

    def artifacts(self, flow_run_id: str) -> list[dict[str, Any]]:
        return self.api("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})


@contextlib.contextmanager
def prefect_server(home: Path, port: int | None = None, timeout_s: float = 120.0) -> Iterator[PrefectServer]:
    """``prefect server start`` on 127.0.0.1 with its SQLite database under ``home``."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = offline_env()
    env.pop("PREFECT_API_URL", None)  # the server must not talk to another API
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",  # nothing to look at after the run; saves start time
        PREFECT_SERVER_EVENTS_MAXIMUM_SIZE_BYTES=str(EVENT_LIMIT_BYTES),
    )
    args = [tool("prefect"), "server", "start", "--host", HOST, "--port", str(port)]
    with background("prefect server", args, env, home / "server.log", cwd=home) as service:
        server = PrefectServer(api_url=f"http://{HOST}:{port}/api", home=home, service=service)
        wait_until(service, lambda: _answers("GET", f"{server.api_url}/health"), "healthy API", timeout_s)
        yield server


@dataclass
class ServedDeployment:
    """A deployment registered by a running ``flows.serve`` process."""

    name: str  # "<flow>/<deployment>"
    id: str
    service: Service


def _utc(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


@contextlib.contextmanager
def served_deployment(
    server: PrefectServer,
    project_dir: Path,
    params: str = "params.yaml",
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    schedule: bool = True,
    poll_frequency_s: int = 2,
    timeout_s: float = 120.0,
) -> Iterator[ServedDeployment]:
    """``python -m flows.serve`` for ``project_dir``; ready once its runner polls the API.

    ``env`` adds variables for the served process and so for its flow runs (e.g. the
    credentials ``dvc push`` needs); the Prefect client settings are always set.
    ``schedule=False`` serves it without the params' cron schedule.

    "Registered" alone is not enough: a deployment left by an earlier serve in the same
    database would look ready before this runner is. So we wait until the deployment
    was polled after this process started.
    """
    # Imported here: the flow module pulls in Prefect, which callers of moto_s3 do not need.
    from flows.pipeline import FLOW_NAME
    from meduet.config import load_config

    project_dir = Path(project_dir).resolve()
    deployment = load_config(project_dir / params).orchestration.deployment_name
    name = f"{FLOW_NAME}/{deployment}"
    served_env = {**server.client_env(), **(env or {}), "PREFECT_RUNNER_POLL_FREQUENCY": str(poll_frequency_s)}
    served_env.update(PREFECT_API_URL=server.api_url, PREFECT_HOME=str(server.home))
    args = [sys.executable, "-m", "flows.serve", "--params", params, "--project-dir", str(project_dir)]
    args += [] if schedule else ["--no-schedule"]
    log_path = log_path or server.home / f"serve-{deployment}.log"
    started = datetime.now(timezone.utc) - timedelta(seconds=1)
    found: dict[str, Any] = {}

    def polled() -> bool:
        try:
            found.update(server.api("GET", f"/deployments/name/{name}"))
        except urllib.error.URLError:
            return False
        last = _utc(found.get("last_polled"))
        return last is not None and last >= started

    # Started outside the project: a project folder holding a partial copy of meduet/
    # (DVC deps) would shadow the installed package for `python -m` and its flow runs.
    with background(f"serve {name}", args, served_env, log_path, cwd=log_path.parent) as service:
        wait_until(service, polled, f"deployment {name} polled by its runner", timeout_s)
        yield ServedDeployment(name=name, id=found["id"], service=service)


# --------------------------------------------------------------------------- s3
@dataclass
class S3Server:
    """A moto S3 endpoint with one bucket; ``env`` holds its (dummy) credentials."""

    endpoint_url: str
    bucket: str
    service: Service
    env: dict[str, str] = field(default_factory=dict)

    def filesystem(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(
            key=self.env["AWS_ACCESS_KEY_ID"], secret=self.env["AWS_SECRET_ACCESS_KEY"],
            client_kwargs={"endpoint_url": self.endpoint_url},
        )


# Distinctive values, so a test can scan logs and artifacts for them (a leaked secret would show).
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIAMEDUETLOOPBACK01",
                     "AWS_SECRET_ACCESS_KEY": "meduet-loopback-secret-5c1e9a"}


@contextlib.contextmanager
def moto_s3(log_dir: Path, bucket: str = "meduet", port: int | None = None, timeout_s: float = 60.0) -> Iterator[S3Server]:
    """``moto_server`` on 127.0.0.1 (in memory) with ``bucket`` created through s3fs."""
    port = port or free_port()
    endpoint = f"http://{HOST}:{port}"
    env = offline_env()
    env.update(DUMMY_CREDENTIALS)
    args = [tool("moto_server"), "-H", HOST, "-p", str(port)]
    with background("moto_server", args, env, Path(log_dir) / "moto.log") as service:
        wait_until(service, lambda: _answers("GET", f"{endpoint}/moto-api/data.json"), "S3 endpoint", timeout_s)
        server = S3Server(endpoint_url=endpoint, bucket=bucket, service=service, env=dict(DUMMY_CREDENTIALS))
        # No region argument: moto rejects a location constraint for us-east-1.
        server.filesystem().mkdir(bucket)
        yield server
