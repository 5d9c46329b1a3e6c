"""A training stage on a real two-node Ray cluster, checkpointing to S3, survives a killed worker;
a few hundred volumes harmonize there as Ray tasks.

The cluster is what an operator starts by hand (README, "Running on a cluster"): a head
node (``ray start --head``, no CPUs, so no training lands there) and a worker node
(``ray start --address``, two CPUs: ``ray.cpus_per_worker: auto`` gives the one training worker
both, so it runs the reference's two torch threads and can match its weights), each its own ``ray start --block`` process in its own
session, with token authentication. The stage is the ``meduet pretrain`` CLI with
``RAY_ADDRESS`` naming the head and ``ray.storage`` on the moto S3 endpoint. Once a
checkpoint is on S3 the training process on the worker node is SIGKILLed; Ray Train's
failure handling (``ray.max_failures``) starts a new one, which resumes from that
checkpoint, and the run ends with the weights of an uninterrupted run of the same params
and inputs: the session's one (tests/stages/trainers.py, also the kill/resume test's
reference), run on a local Ray on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from flows.local import Service, ServiceError, background, free_port, tool, wait_until
from meduet.env import offline_env
from meduet.harmonize.manifest import read_manifest
from tests.harmonize.test_stage import HARMONIZE, _msd_site
from tests.stages.trainers import TRAINERS, history, kill_session

REPO = Path(__file__).resolve().parents[1]
TRAINER = TRAINERS["pretrain"]
STEPS, EVERY = TRAINER.steps, 5  # every checkpoint kept; most of the run still to go after the first
TIMEOUT_S = 300.0
STARTUP_TRIES = 3
VOLUMES = 240  # small volumes harmonized as Ray tasks on the cluster


@dataclass(frozen=True)
class RayCluster:
    """A running head and worker node; ``driver_env`` is what a driver needs to join."""

    address: str
    head: Service
    worker: Service
    driver_env: dict[str, str]


def _log_says(service: Service, text: str) -> bool:
    return text in service.log_path.read_text(encoding="utf-8", errors="replace")


def _stop_node(node: Service) -> None:
    node.stop()  # SIGTERM: `ray start --block` stops the node's processes
    kill_session(node.pid)  # and whatever Ray put in other process groups


@contextlib.contextmanager
def _ray_node(name: str, args: list[str], env: dict[str, str], log_path: Path,
              prefix: tuple[str, ...] = ()) -> Iterator[Service]:
    """``ray start --block <args>`` in its own session; stopped with every process it started.

    Ray gives a new node's raylet a fixed 30 s to register, and the raylet first waits for its
    agents (Python processes): on a machine busy with other work that can run out, and the
    node is started again, up to ``STARTUP_TRIES`` times.
    """
    for attempt in range(1, STARTUP_TRIES + 1):
        with contextlib.ExitStack() as stack:
            log = log_path.with_suffix(f".{attempt}.log")
            node = stack.enter_context(background(name, [*prefix, tool("ray"), "start", "--block", *args], env, log))
            stack.callback(_stop_node, node)
            try:
                wait_until(node, lambda: _log_says(node, "Ray runtime started"), "Ray runtime", TIMEOUT_S)
            except ServiceError:
                if attempt < STARTUP_TRIES and _log_says(node, "timed out during startup"):
                    continue
                raise
            yield node
            return


def _node_ports() -> list[str]:
    """Options every node needs on a machine shared with other nodes: its own free ports."""
    return ["--node-ip-address=127.0.0.1", "--disable-usage-stats", "--object-store-memory=100000000",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def hiding(folder: Path) -> tuple[str, ...]:
    """A command prefix that runs a process where ``folder`` looks empty: a node of another machine.

    An unprivileged user and mount namespace (``unshare``) with a fresh tmpfs over ``folder``;
    the network, the processes and every other path are this machine's.
    """
    return ("unshare", "--user", "--map-root-user", "--mount", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"',
            str(folder))


def can_hide() -> bool:
    """Whether this machine allows the unprivileged namespaces :func:`hiding` needs."""
    with tempfile.TemporaryDirectory() as folder:
        return subprocess.run([*hiding(Path(folder)), "true"], capture_output=True).returncode == 0


@contextlib.contextmanager
def ray_cluster(env: dict[str, str], hidden: Path | None = None) -> Iterator[RayCluster]:
    """A head node without CPUs and a worker node with two, on this machine.

    ``hidden``: a folder the worker node's processes see empty (see :func:`hiding`), as a node
    on another machine would not see this machine's files.

    Every port is picked free (a Ray left running by anything else is not touched), each
    node keeps its session files in its own short temp folder (Unix socket paths are
    capped at 107 bytes), and a fresh token authenticates every client. Ray replaces
    127.0.0.1 by the host's address for its node IP. No dashboard: it saves start-up time,
    and the only one to miss it is Ray Train's placement-group cleaner, which then logs
    that the State API is unavailable.
    """
    temp = Path(tempfile.mkdtemp(prefix="meduet-rc-"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    node_env = {
        **offline_env(env), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_ADDRESS": address,  # Ray Train's helpers on the nodes look the cluster up by it
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # a test cluster stops at once
        "RAY_agent_register_timeout_ms": "120000",  # node agents start slowly on a busy machine
        "AUTOSCALER_METRIC_PORT": str(free_port()),  # the head's monitor; default 44217 may be taken
    }
    head_args = ["--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                 f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
                 f"--temp-dir={temp / 'head'}", *_node_ports()]
    worker_args = [f"--address={address}", "--num-cpus=2", f"--temp-dir={temp / 'worker'}", *_node_ports()]
    try:
        with _ray_node("ray head", head_args, node_env, temp / "head.log") as head:
            with _ray_node("ray worker", worker_args, node_env, temp / "worker.log",
                           hiding(hidden) if hidden else ()) as worker:
                yield RayCluster(address=address, head=head, worker=worker, driver_env=node_env)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _train_workers(node: Service) -> list[int]:
    """Pids of Ray Train's worker processes on ``node`` (Ray titles them ``ray::RayTrainWorker``)."""
    listing = subprocess.run(["ps", "-o", "pid=,args=", "-s", str(node.pid)], capture_output=True, text=True)
    rows = (line.split(None, 1) for line in listing.stdout.splitlines())
    return [int(pid) for pid, args in rows if args.startswith("ray::RayTrainWorker")]


def _s3_checkpoints(fs: Any, prefix: str) -> dict[str, Any]:
    """``{key: LastModified}`` of every checkpoint's state file under ``prefix`` (listed afresh)."""
    fs.invalidate_cache()
    found = fs.find(prefix, detail=True)
    return {key: info["LastModified"] for key, info in found.items()
            if key.endswith("/state.pt") and "/checkpoint_" in key}


@pytest.fixture(scope="module")
def cluster(s3_server: Any) -> Iterator[RayCluster]:
    with ray_cluster(s3_server.env) as running:  # the nodes write checkpoints: they hold the credentials
        yield running


@pytest.mark.services
def test_training_on_a_cluster_survives_a_killed_worker_process_and_ends_like_an_uninterrupted_run(
    cluster: RayCluster, s3_server: Any, uninterrupted_run: Callable[[str], Path], tmp_path: Path
) -> None:
    reference = uninterrupted_run("pretrain")  # the same params and inputs, uninterrupted, on a local Ray
    root = tmp_path / "killed"
    params = TRAINER.write_project(root)
    prefix = f"{s3_server.bucket}/cluster/killed"
    params.write_text(yaml.safe_dump({
        TRAINER.section: TRAINER.settings,
        "ray": {"checkpoint_every": EVERY, "keep_checkpoints": STEPS // EVERY, "max_failures": 1,
                "storage": f"s3://{prefix}"},
        "storage": {"s3_endpoint_url": s3_server.endpoint_url},
    }))
    env = {**cluster.driver_env, **s3_server.env}

    # ``meduet pretrain`` as the driver, its output to killed.log.
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        args = [sys.executable, "-m", "meduet.cli", TRAINER.cli, "--params", str(params)]
        process = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    fs = s3_server.filesystem()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (before := _s3_checkpoints(fs, prefix)):
            assert process.poll() is None, f"the run ended before its first checkpoint:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no checkpoint on S3 in time:\n{log.read_text()[-4000:]}"
            time.sleep(0.05)
        # The training process runs on the worker node: the head has no CPU to give it.
        workers = _train_workers(cluster.worker)
        assert len(workers) == 1, f"training processes on the worker node: {workers}"
        os.kill(pid := workers[0], signal.SIGKILL)
        written = {int(key.split("checkpoint_")[1].split("/")[0]) for key in before}
        assert process.poll() is None and max(written) < STEPS, "the run ended before it could be killed"
        process.wait(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, log.read_text()[-4000:]
    assert pid not in _train_workers(cluster.worker)

    # Resumed, not restarted: the checkpoints written before the kill were not written again.
    after = _s3_checkpoints(fs, prefix)
    assert all(after[key] == modified for key, modified in before.items()), (before, after)
    assert len(after) == STEPS // EVERY
    assert not (root / ".work" / "ray_results").exists()  # every checkpoint went to S3

    rows = history(root, TRAINER.stage)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))  # no step lost, none repeated
    for got, want in zip(rows, history(reference, TRAINER.stage), strict=True):
        assert got[TRAINER.term] == pytest.approx(want[TRAINER.term], rel=1e-4), got["step"]
    got = torch.load(root / TRAINER.model_file, weights_only=True)
    want = torch.load(reference / TRAINER.model_file, weights_only=True)
    for which in TRAINER.weights:
        assert got[which].keys() == want[which].keys()
        for key, value in want[which].items():
            torch.testing.assert_close(got[which][key], value, rtol=1e-4, atol=1e-5, msg=f"{which}.{key}")


@pytest.mark.services
def test_a_few_hundred_volumes_harmonize_as_ray_tasks_on_the_cluster_as_on_a_local_pool(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """``harmonize`` with a cluster named runs each case as a Ray task on the worker node; the
    outputs are the local pool's, byte for byte, and a corrupt file is quarantined, not fatal."""
    site = _msd_site(tmp_path / "raw", VOLUMES, size=(20, 18, 10))
    whole = (site / "imagesTr" / "case_00.nii.gz").read_bytes()
    (site / "imagesTr" / "case_broken.nii.gz").write_bytes(whole[: len(whole) // 3])
    meta = json.loads((site / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/case_broken.nii.gz"})
    (site / "dataset.json").write_text(json.dumps(meta))
    datasets = [{"name": "many", "root": str(site), "domain": "a", "body_part": "abdomen"}]
    manifests = {}
    for executor in ("ray", "pool"):
        project = tmp_path / executor
        project.mkdir()
        (project / "params.yaml").write_text(yaml.safe_dump({"harmonize": {
            **HARMONIZE, "datasets": datasets, "executor": executor, "workers": 4 if executor == "ray" else 2}}))
        args = [sys.executable, "-m", "meduet.cli", "harmonize", "--params", str(project / "params.yaml")]
        done = subprocess.run(args, cwd=REPO, env=cluster.driver_env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        metrics = yaml.safe_load((project / "reports" / "harmonize" / "metrics.json").read_text())
        assert metrics["executor"] == executor and metrics["cases"] == VOLUMES + 1, metrics
        assert metrics["ok"] == VOLUMES and metrics["quarantined"] == 1, metrics
        manifests[executor] = {r.key: (r.status, r.image_sha256, r.label_sha256)
                               for r in read_manifest(project / "data" / "harmonized" / "manifest.csv")}
    assert manifests["ray"] == manifests["pool"]
    assert manifests["ray"]["many__case_broken"][0] == "quarantined"
