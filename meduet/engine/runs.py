"""What a training run is: its name (run key), where it lives, how it is scaled.

A run is named ``<stage>-<run key>`` under ``RunSpec.storage`` (local folder or ``s3://``).
A run folder with that name is resumed, or returned as is when finished, so the key
changes with everything that would make the old run's weights wrong (:func:`run_key`).
Nothing here imports ray: ``meduet.distributed`` runs what these specs describe.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow.fs

from meduet.config import TRAIN_POLL_S, Paths, RayConfig
from meduet.engine.checkpoint import CheckpointError, ConfigMismatchError
from meduet.io.atomic import write_json
from meduet.io.filesystems import arrow_filesystem, read_bytes
from meduet.io.storage import is_remote

RUN_MARKER = "meduet_run.json"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def run_key(config_digest: str, input_file: Path, scaling: Scaling | None = None) -> str:
    """Name part of a training run: its config section, its input data, its scaling and the code.

    Args:
        config_digest: ``meduet.config.config_hash`` of the stage's section.
        input_file: the input listing (a manifest): new data means a new run.
        scaling: workers and devices; the batch each optimizer step sees and the numerics
            change with them, so another scaling is another run.

    Returns:
        16 hex digits.
    """
    digest = hashlib.sha256(f"{config_digest}:".encode())
    digest.update(hashlib.sha256(input_file.read_bytes()).digest())
    if scaling is not None:
        digest.update(f"workers={scaling.num_workers}:gpu={scaling.use_gpu}".encode())
    for source in sorted(PACKAGE_ROOT.rglob("*.py")):
        digest.update(source.relative_to(PACKAGE_ROOT).as_posix().encode())
        digest.update(hashlib.sha256(source.read_bytes()).digest())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Scaling:
    """How many workers and what each one gets.

    Args:
        num_workers: training processes (one per GPU when ``use_gpu``).
        use_gpu: train on GPUs with NCCL; otherwise CPUs with gloo.
        cpus_per_worker: CPUs reserved per worker, also its torch threads; None = decided on
            the cluster (:meth:`with_cluster_cpus`).
        gpus_per_worker: GPUs reserved per worker (ignored without ``use_gpu``).
    """

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = 1.0
    gpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ValueError(f"gpus_per_worker must be > 0 with use_gpu, got {self.gpus_per_worker}")

    @classmethod
    def from_config(cls, ray_cfg: RayConfig) -> Scaling:
        """The training workers of the ``ray`` section (``cpus_per_worker: auto`` is None here)."""
        cpus = None if ray_cfg.cpus_per_worker == "auto" else float(ray_cfg.cpus_per_worker)
        return cls(num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu, cpus_per_worker=cpus,
                   gpus_per_worker=ray_cfg.gpus_per_worker)

    @classmethod
    def for_tasks(cls, ray_cfg: RayConfig) -> Scaling:
        """One data-stage task of the ``ray`` section: ``cpus_per_task`` CPUs (and a GPU share with ``use_gpu``)."""
        return cls(num_workers=1, use_gpu=ray_cfg.use_gpu, cpus_per_worker=ray_cfg.cpus_per_task,
                   gpus_per_worker=ray_cfg.gpus_per_worker)

    def with_cluster_cpus(self, cluster_cpus: float, node_cpus: list[float]) -> Scaling:
        """This scaling with ``cpus_per_worker`` decided when it is None: the cluster's CPUs shared by the
        workers, whole CPUs, at most the largest node's, at least one.

        A Ray worker gets as many torch threads as CPUs, so a single worker reserving one CPU of a
        2-core machine would leave a core idle.
        """
        if self.cpus_per_worker is not None:
            return self
        share = int(cluster_cpus // self.num_workers)
        return replace(self, cpus_per_worker=float(max(1, min(share, int(max(node_cpus, default=1))))))

    @property
    def threads(self) -> int:
        """torch threads of one worker: its whole CPUs, at least one."""
        return max(1, int(self.cpus_per_worker or 1))

    @property
    def backend(self) -> str:
        """torch.distributed backend: NCCL between GPUs, gloo between CPU processes."""
        return "nccl" if self.use_gpu else "gloo"

    def resources_per_worker(self) -> dict[str, float]:
        if self.cpus_per_worker is None:
            raise ValueError("cpus_per_worker is decided on the cluster first (with_cluster_cpus)")
        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = self.gpus_per_worker
        return resources


@dataclass(frozen=True)
class RunSpec:
    """Where and how one stage's training run lives; equal specs mean the same run.

    Args:
        stage: pipeline stage name (``train_vae``, ``pretrain``, ...); first half of the run name.
        config_hash: the run key (:func:`run_key`); second half of the run name, stored in
            every checkpoint and checked on load.
        storage: folder (absolute path) or ``s3://bucket/prefix`` holding run folders.
        s3_options: ``s3fs.S3FileSystem`` keyword arguments for ``s3://`` storage.
        checkpoint_every: steps between checkpoints (see ``distributed.checkpoint_due``).
        keep_checkpoints: checkpoints kept per run; older ones are deleted (the latest
            always stays).
        max_failures: worker-group failures Ray retries (from the latest checkpoint)
            before ``distributed.fit`` raises.
        address: Ray cluster to join; None starts (or reuses) a local one. The
            ``RAY_ADDRESS`` environment variable overrides it.
        temp_dir: Ray's session folder for a local cluster (sockets, logs).
        local_num_cpus: CPUs a local cluster may use; None = all of this machine.
        metrics_csv: where ``distributed.fit`` writes the metric history (one row per
            report); None writes none.
        train_poll_s: seconds between the Ray Train controller's polls of its workers.
    """

    stage: str
    config_hash: str
    storage: str
    s3_options: Mapping[str, Any] = field(default_factory=dict)
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_failures: int = 1
    address: str | None = None
    temp_dir: Path = Path(tempfile.gettempdir()) / "meduet-ray"
    local_num_cpus: int | None = None
    metrics_csv: Path | None = None
    train_poll_s: float = TRAIN_POLL_S

    def __post_init__(self) -> None:
        for label, value in (("stage", self.stage), ("config_hash", self.config_hash)):
            if not value or any(c in value for c in "/\\ "):
                raise ValueError(f"{label} must be non-empty without '/', '\\' or spaces, got {value!r}")
        if not is_remote(self.storage) and not os.path.isabs(self.storage):
            raise ValueError(f"storage must be an absolute path or an s3:// URI, got {self.storage!r}")
        if is_remote(self.storage) and not self.storage.startswith("s3://"):
            raise ValueError(f"only local folders and s3:// URIs are supported, got {self.storage!r}")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.max_failures < 0:
            raise ValueError("checkpoint_every and keep_checkpoints must be >= 1, max_failures >= 0")
        if self.train_poll_s <= 0:
            raise ValueError(f"train_poll_s must be > 0, got {self.train_poll_s}")

    @classmethod
    def from_config(
        cls, ray_cfg: RayConfig, paths: Paths, stage: str, section_hash: str, metrics_csv: Path | None = None
    ) -> RunSpec:
        """A stage's run from the ``ray`` section and the resolved paths.

        Args:
            ray_cfg: the ``ray`` section.
            paths: resolved project paths (``work`` holds Ray's files by default).
            stage: stage name.
            section_hash: the run key.
            metrics_csv: history CSV; default ``<reports>/<stage>/history.csv``.
        """
        storage = str(paths.local(ray_cfg.storage)) if ray_cfg.storage else str(paths.work / "ray_results")
        return cls(
            stage=stage, config_hash=section_hash, storage=storage, s3_options=dict(paths.s3_options),
            checkpoint_every=ray_cfg.checkpoint_every, keep_checkpoints=ray_cfg.keep_checkpoints,
            max_failures=ray_cfg.max_failures, address=ray_cfg.address, temp_dir=paths.work / "ray",
            local_num_cpus=ray_cfg.local_num_cpus, train_poll_s=ray_cfg.train_poll_s,
            metrics_csv=metrics_csv if metrics_csv is not None else paths.reports / stage / "history.csv",
        )

    @property
    def name(self) -> str:
        """Run name: a reused name is a resumed run, so it carries the run key."""
        return f"{self.stage}-{self.config_hash}"

    @property
    def run_dir(self) -> str:
        """The run folder, as a local path or ``s3://`` URI."""
        return f"{self.storage.rstrip('/')}/{self.name}"

    def filesystem(self) -> tuple[pyarrow.fs.FileSystem, str]:
        """The storage's filesystem and the storage root on it."""
        return arrow_filesystem(self.storage, self.s3_options)


def claim_run_folder(run: RunSpec) -> None:
    """Record the config hash in the run folder, or refuse one written by another config.

    The run name already contains the hash; this catches run folders that were copied,
    renamed or hand-edited, before any worker starts.
    """
    fs, root = run.filesystem()
    marker = f"{root}/{run.name}/{RUN_MARKER}"
    uri = f"{run.run_dir}/{RUN_MARKER}"
    if fs.get_file_info(marker).type == pyarrow.fs.FileType.File:
        try:
            recorded = json.loads(read_bytes(fs, marker))["config_hash"]
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"{uri}: unreadable run marker ({error}); delete the run folder to start afresh"
            ) from None
        if recorded != run.config_hash:
            raise ConfigMismatchError(
                f"{uri}: run folder belongs to config hash {recorded}, not {run.config_hash}; refusing to "
                f"resume another configuration's checkpoints (delete {run.run_dir} or use a new stage name)"
            )
        return
    payload = {"stage": run.stage, "config_hash": run.config_hash, "name": run.name}
    if is_remote(run.storage):
        fs.create_dir(f"{root}/{run.name}")
        with fs.open_output_stream(marker) as stream:  # one S3 PUT: all or nothing
            stream.write(json.dumps(payload, indent=2).encode())
    else:
        write_json(marker, payload)
