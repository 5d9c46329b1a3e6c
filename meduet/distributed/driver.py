"""Driver side of ``meduet.distributed``: start or join Ray, run a training loop on every worker."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch

from meduet.distributed import worker
from meduet.engine.checkpoint import CheckpointError, read_checkpoint
from meduet.engine.history import write_history_csv
from meduet.engine.runs import RunSpec, Scaling, claim_run_folder
from meduet.env import apply_offline_env, free_port

log = logging.getLogger(__name__)

# Ray puts Unix sockets at <temp_dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store;
# Linux caps a socket path at 107 bytes, and the part after <temp_dir> takes up to 64
# (7-digit pid), plus 2 for the ".N" Ray appends when a name is taken.
_MAX_SOCKET_PATH = 107
_SESSION_SOCKET_SUFFIX = 66


class DistributedError(RuntimeError):
    """Base class of this package's errors."""


class TrainingError(DistributedError):
    """A training run failed; the message carries the workers' errors."""


_STARTED_LOCAL = False
LOCAL_START_TRIES = 3
# Ray Train reads its controller's poll interval from the driver's environment when a run starts
# and passes it on to the controller and the workers.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# A local Ray is one node, the driver's own: no node of it can be preempted (drained) while the run goes on,
# so Ray Train's preemption watcher has nothing to watch there. It costs an actor process per run, whose
# start logs an error-level line about its own restart policy. A joined cluster keeps it (Ray's default).
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Ray announces at every local start that it chose token authentication, its default, which is also this
# pipeline's choice (README: "Running on a cluster"); the announcement is dropped, every other record of Ray's kept.
# RAY_AUTH_MODE cannot be set here instead: Ray reads it once, at import.
_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_RAY_AUTH_DEFAULT_NOTICE = "Token authentication is enabled for this Ray cluster."
# Ray's State API client, given no address, looks for "the" Ray running on the machine, and Ray Train's
# placement-group cleaner asks it without one: with two local Rays (two stages side by side in the flow) the
# cleaner's monitor died with "Found multiple active Ray instances". A local Ray's processes are started with its
# own API server's address in this variable, which the client reads first (they inherit ray.init's environment).
_API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
_LOCAL_HOST = "127.0.0.1"  # a local Ray's dashboard listens on loopback only


def _drop_auth_default_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_RAY_AUTH_DEFAULT_NOTICE)


def _ray_temp_dir(preferred: Path) -> Path:
    """``preferred`` if Ray's socket paths under it fit Linux's limit, else a short /tmp folder."""
    preferred = preferred.resolve()
    if len(str(preferred)) + _SESSION_SOCKET_SUFFIX <= _MAX_SOCKET_PATH:
        return preferred
    fallback = Path(tempfile.gettempdir()) / f"meduet-ray-{os.getuid()}"
    log.warning("Ray temp dir %s is too long for Unix socket paths; using %s", preferred, fallback)
    return fallback


def ensure_ray(run: RunSpec) -> None:
    """Connect this process to Ray: reuse it if initialised, else join or start a cluster.

    ``RAY_ADDRESS`` (environment) or ``run.address`` names a cluster to join; otherwise a
    local Ray starts with ``run.local_num_cpus`` CPUs, its dashboard on 127.0.0.1 only, and
    its session files under ``run.temp_dir`` (or a short /tmp folder if that path is too long
    for Unix sockets), and its workers at the driver's priority; its processes are told its own
    State API address (another local Ray may run beside it). Usage statistics are switched off
    first.
    """
    global _STARTED_LOCAL
    apply_offline_env()
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or run.address
    if address and address != "local":
        ray.init(address=address)
        return
    temp_dir = _ray_temp_dir(run.temp_dir)
    temp_dir.mkdir(parents=True, exist_ok=True)
    # address="local" always starts a fresh local Ray: without it, a stale cluster file
    # left by an earlier `ray stop` makes ray.init try a dead 127.0.0.1:6379.
    # The dashboard process also serves Ray's State API, which Ray Train's placement-group
    # cleaner polls every second: without it the cleaner cannot clean up after a dead
    # controller and logs a warning each time. It listens on loopback only.
    # Ray gives a new node a fixed time to come up; on a machine busy with other work that can
    # run out ("timed out during startup"). Agents get longer to register, and a start that
    # still times out is tried again from scratch.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    auth_log = logging.getLogger(_RAY_AUTH_LOGGER)
    if _drop_auth_default_notice not in auth_log.filters:
        auth_log.addFilter(_drop_auth_default_notice)
    # Ray starts its workers at nice 15, below the driver. The training and the task work of every
    # stage runs in those workers, so on a machine shared with other work (stages side by side in
    # the flow, another user) they got a few per cent of a core against any nice-0 process. They
    # run at the driver's priority instead (RAY_worker_niceness in the environment still wins),
    # set through this Ray's own config: an environment variable would also reach every process
    # this one starts later, such as a `ray start` of another cluster.
    niceness = int(os.environ.get("RAY_worker_niceness", "0"))
    for attempt in range(1, LOCAL_START_TRIES + 1):
        port = free_port(_LOCAL_HOST)
        try:
            with _environment({_API_SERVER_ENV: f"http://{_LOCAL_HOST}:{port}"}):
                ray.init(address="local", num_cpus=run.local_num_cpus, include_dashboard=True,
                         dashboard_host=_LOCAL_HOST, dashboard_port=port, _temp_dir=str(temp_dir),
                         _system_config={"worker_niceness": niceness})
            break
        except Exception as error:  # Ray raises a bare Exception for a startup timeout
            # a port free a moment ago can be taken by another process before the dashboard binds it
            if attempt == LOCAL_START_TRIES or not any(
                    reason in str(error) for reason in ("timed out during startup", "already occupied")):
                raise
            log.warning("local Ray did not start (attempt %d of %d: %s); trying again", attempt,
                        LOCAL_START_TRIES, str(error).splitlines()[0])
            ray.shutdown()
    _STARTED_LOCAL = True


def shutdown_ray() -> None:
    """Stop the local Ray that :func:`ensure_ray` started (a joined cluster is left alone)."""
    global _STARTED_LOCAL
    if _STARTED_LOCAL and ray.is_initialized():
        ray.shutdown()
    _STARTED_LOCAL = False


@dataclass(frozen=True)
class FitResult:
    """What a finished :func:`fit` returns.

    Attributes:
        metrics: the last reported metrics (rank 0).
        checkpoint: the latest checkpoint folder (local path or ``s3://`` URI), or None.
        history: every reported metric row of the run, resumed parts included.
        metrics_csv: where the history CSV was written, or None.
        run: the run's spec.
    """

    metrics: dict[str, Any]
    checkpoint: str | None
    history: list[dict[str, Any]]
    metrics_csv: Path | None
    run: RunSpec

    def load_state(self) -> dict[str, Any]:
        """The latest checkpoint's ``state`` dict (tensors on CPU)."""
        if self.checkpoint is None:
            raise CheckpointError(f"run {self.run.run_dir} has no checkpoint")
        return read_checkpoint(self.checkpoint, self.run.s3_options, self.run.config_hash)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in this process's environment for the block only (not for processes started later)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _training_error(error: Exception, run: RunSpec) -> DistributedError:
    """Our error for Ray's: a worker's CheckpointError keeps its type and message."""
    # WorkerGroupError.worker_failures maps rank -> the exception the loop raised.
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        if isinstance(failure, CheckpointError):
            return type(failure)(str(failure))
    return TrainingError(f"run {run.run_dir} failed: {error}")


def _run_worker(config: dict[str, Any], *, loop: Callable[..., Any], session: worker.Session) -> dict[str, Any]:
    """Runs on each worker: installs the session the worker helpers read, then ``loop(**config)``.

    Module level (not a closure in ``fit``) so it unpickles by reference on the workers.
    """
    with worker.running(session) as live:
        loop(**config)
        return {"history": live.history}


def fit(loop: Callable[..., Any], loop_kwargs: dict[str, Any], scaling: Scaling, run: RunSpec) -> FitResult:
    """Run ``loop(**loop_kwargs)`` on every worker; resume from the run's latest checkpoint.

    Args:
        loop: per-worker training function, shipped to the workers with cloudpickle (a
            module-level function goes by reference, so its module must be importable
            there). It resumes through ``worker.resume`` and reports through
            ``worker.report``.
        loop_kwargs: keyword arguments for ``loop``, shipped to every worker (validated
            config sections travel as they are: pydantic models pickle).
        scaling: workers and their resources (``cpus_per_worker`` None: the cluster's CPUs shared
            by the workers, ``Scaling.with_cluster_cpus``); a worker runs as many torch threads as CPUs.
        run: run name, storage, checkpoint/failure policy and the controller's poll interval.

    Returns:
        The run's final metrics, latest checkpoint and full metric history (also
        written to ``run.metrics_csv``).

    Raises:
        CheckpointError: a worker could not read the checkpoint to resume from.
        ConfigMismatchError: the run folder or checkpoint belongs to another config hash.
        TrainingError: the loop failed more than ``run.max_failures`` times.
    """
    ensure_ray(run)
    scaling = scaling.with_cluster_cpus(ray.cluster_resources().get("CPU", 1.0),
                                        [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]])
    log.info("%s: %d worker(s), %g CPU(s) and %d torch thread(s) each%s", run.name, scaling.num_workers,
             scaling.cpus_per_worker, scaling.threads, ", GPU" if scaling.use_gpu else "")
    claim_run_folder(run)
    fs, root = run.filesystem()
    session = worker.Session(stage=run.stage, config_hash=run.config_hash, checkpoint_every=run.checkpoint_every,
                             scheme="s3://" if run.storage.startswith("s3://") else "", storage=run.storage,
                             s3_options=dict(run.s3_options), run_name=run.name, threads=scaling.threads)

    trainer = ray.train.torch.TorchTrainer(
        functools.partial(_run_worker, loop=loop, session=session),
        train_loop_config=loop_kwargs,
        torch_config=ray.train.torch.TorchConfig(backend=scaling.backend),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
            resources_per_worker=scaling.resources_per_worker(),
        ),
        run_config=ray.train.RunConfig(
            name=run.name, storage_path=root, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.keep_checkpoints),
        ),
    )
    # Both for this run only: Ray Train reads them when the run starts and passes them on to its controller
    # and workers, so nothing of one stage's settings is left to the next fit or to processes started later.
    environment = {TRAIN_POLL_ENV: f"{run.train_poll_s:g}"}
    if _STARTED_LOCAL and PREEMPTION_WATCHER_ENV not in os.environ:
        environment[PREEMPTION_WATCHER_ENV] = "0"
    try:
        with _environment(environment):
            result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise _training_error(error, run) from error

    history = list((result.return_value or {}).get("history", []))
    checkpoint = session.scheme + result.checkpoint.path if result.checkpoint is not None else None
    if run.metrics_csv is not None:
        write_history_csv(run.metrics_csv, history)
    return FitResult(metrics=dict(history[-1]) if history else dict(result.metrics or {}),
                     checkpoint=checkpoint, history=history, metrics_csv=run.metrics_csv, run=run)

