"""Ray Train at the edge: the only module of the project that imports ``ray``.

A training stage hands a plain per-worker loop, ``loop(config: dict) -> None``, to
:func:`fit`, which runs it on every worker with ``ray.train.torch.TorchTrainer`` (gloo on
CPU, NCCL on GPU). The loop itself has no distributed branches: it calls the worker-side
helpers below, which wrap Ray's, and one worker is the same code path.

Driver side
    :class:`Scaling`, :class:`RunSpec`, :func:`fit` -> :class:`FitResult`,
    :func:`ensure_ray` / :func:`shutdown_ray`, :func:`read_checkpoint`.

Worker side (inside ``loop``)
    :func:`device`, :func:`world_rank`, :func:`world_size`, :func:`prepare_model`,
    :func:`unwrap`, :func:`prepare_loader`, :func:`set_epoch`, :func:`checkpoint_due`,
    :func:`load_checkpoint`, :func:`report`, :func:`capture_rng`, :func:`restore_rng`.
    Called outside :func:`fit` (a loop run directly, e.g. in a unit test) they behave as
    one CPU worker with nowhere to save checkpoints.

Runs, checkpoints and resume
    A run is named ``<stage>-<config hash>`` under ``RunSpec.storage`` (local folder or
    ``s3://``). Ray Train 2.x keeps a snapshot of the run's reported checkpoints in that
    folder and, when a trainer is created again with the same name and storage, hands the
    latest one to the workers through ``ray.train.get_checkpoint()``; :func:`load_checkpoint`
    reads it, or a newer complete ``checkpoint_<step>`` folder that Ray had not listed yet
    when the run was killed. So a second :func:`fit` with the same :class:`RunSpec`
    resumes where the first stopped (crash, kill, preemption), and Ray's own retries
    (``RunSpec.max_failures``) resume the same way. Every checkpoint and the run folder
    record the config hash; a mismatch is refused, never silently loaded.
    (Ray 2.x's ``TorchTrainer.restore`` / ``can_restore`` / ``resume_from_checkpoint``
    are deprecated and raise; reusing the run name is its resume mechanism.)

Metrics
    :func:`report` keeps rank 0's metric rows on the worker; they come back in the loop's
    return value and inside every checkpoint. Only checkpoints go through
    ``ray.train.report``, which waits for the controller's next poll of the workers.

Checkpoint file
    One ``state.pt`` per checkpoint folder, a dict ``{"format", "stage", "config_hash",
    "state", "history"}`` saved with ``torch.save`` and loaded with
    ``torch.load(weights_only=True)``: ``state`` is what the loop passed to :func:`report`
    (plain tensors, numbers, strings, lists and dicts only), ``history`` the metric rows
    reported so far, so a resumed run's history equals the uninterrupted run's.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import logging
import os
import pickle
import random
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from meduet.config import Paths, RayConfig
from meduet.env import apply_offline_env
from meduet.io.atomic import write_json, write_text

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
RUN_MARKER = "meduet_run.json"
CHECKPOINT_FORMAT = 1

# Ray puts Unix sockets at <temp_dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store;
# Linux caps a socket path at 107 bytes, and the part after <temp_dir> takes up to 64
# (7-digit pid), plus 2 for the ".N" Ray appends when a name is taken.
_MAX_SOCKET_PATH = 107
_SESSION_SOCKET_SUFFIX = 66


class DistributedError(RuntimeError):
    """Base class of this module's errors."""


class CheckpointError(DistributedError):
    """A checkpoint that cannot be used; the message names the file."""


class ConfigMismatchError(CheckpointError):
    """A checkpoint or run folder written by another configuration (config hash)."""


class TrainingError(DistributedError):
    """A training run failed; the message carries the workers' errors."""


# --------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class Scaling:
    """How many workers and what each one gets.

    Args:
        num_workers: training processes (one per GPU when ``use_gpu``).
        use_gpu: train on GPUs with NCCL; otherwise CPUs with gloo.
        cpus_per_worker: CPUs reserved per worker.
        gpus_per_worker: GPUs reserved per worker (ignored without ``use_gpu``).
    """

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ValueError(f"gpus_per_worker must be > 0 with use_gpu, got {self.gpus_per_worker}")

    @classmethod
    def from_config(cls, ray_cfg: RayConfig) -> Scaling:
        """The ``ray`` section's scaling fields."""
        return cls(num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu,
                   cpus_per_worker=ray_cfg.cpus_per_worker, gpus_per_worker=ray_cfg.gpus_per_worker)

    @property
    def backend(self) -> str:
        """torch.distributed backend: NCCL between GPUs, gloo between CPU processes."""
        return "nccl" if self.use_gpu else "gloo"

    def resources_per_worker(self) -> dict[str, float]:
        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = self.gpus_per_worker
        return resources


@dataclass(frozen=True)
class RunSpec:
    """Where and how one stage's training run lives; equal specs mean the same run.

    Args:
        stage: pipeline stage name (``vae``, ``pretrain``, ...); first half of the run name.
        config_hash: hash of the stage's config section (``meduet.config.config_hash``);
            second half of the run name, stored in every checkpoint and checked on load.
        storage: folder (absolute path) or ``s3://bucket/prefix`` holding run folders.
        s3_options: ``s3fs.S3FileSystem`` keyword arguments for ``s3://`` storage.
        checkpoint_every: steps between checkpoints (see :func:`checkpoint_due`).
        keep_checkpoints: checkpoints kept per run; older ones are deleted (the latest
            always stays).
        max_failures: worker-group failures Ray retries (from the latest checkpoint)
            before :func:`fit` raises.
        address: Ray cluster to join; None starts (or reuses) a local one. The
            ``RAY_ADDRESS`` environment variable overrides it.
        temp_dir: Ray's session folder for a local cluster (sockets, logs).
        local_num_cpus: CPUs a local cluster may use; None = all of this machine.
        metrics_csv: where :func:`fit` writes the metric history (one row per report);
            None writes none.
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

    def __post_init__(self) -> None:
        for label, value in (("stage", self.stage), ("config_hash", self.config_hash)):
            if not value or any(c in value for c in "/\\ "):
                raise ValueError(f"{label} must be non-empty without '/', '\\' or spaces, got {value!r}")
        if not _is_uri(self.storage) and not os.path.isabs(self.storage):
            raise ValueError(f"storage must be an absolute path or an s3:// URI, got {self.storage!r}")
        if _is_uri(self.storage) and not self.storage.startswith("s3://"):
            raise ValueError(f"only local folders and s3:// URIs are supported, got {self.storage!r}")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.max_failures < 0:
            raise ValueError("checkpoint_every and keep_checkpoints must be >= 1, max_failures >= 0")

    @classmethod
    def from_config(
        cls, ray_cfg: RayConfig, paths: Paths, stage: str, section_hash: str, metrics_csv: Path | None = None
    ) -> RunSpec:
        """A stage's run from the ``ray`` section and the resolved paths.

        Args:
            ray_cfg: the ``ray`` section.
            paths: resolved project paths (``work`` holds Ray's files by default).
            stage: stage name.
            section_hash: ``config_hash`` of the stage's own config section.
            metrics_csv: history CSV; default ``<reports>/<stage>/history.csv``.
        """
        storage = str(paths.local(ray_cfg.storage)) if ray_cfg.storage else str(paths.work / "ray_results")
        return cls(
            stage=stage, config_hash=section_hash, storage=storage, s3_options=dict(paths.s3_options),
            checkpoint_every=ray_cfg.checkpoint_every, keep_checkpoints=ray_cfg.keep_checkpoints,
            max_failures=ray_cfg.max_failures, address=ray_cfg.address, temp_dir=paths.work / "ray",
            local_num_cpus=ray_cfg.local_num_cpus,
            metrics_csv=metrics_csv if metrics_csv is not None else paths.reports / stage / "history.csv",
        )

    @property
    def name(self) -> str:
        """Run name: a reused name is a resumed run, so it carries the config hash."""
        return f"{self.stage}-{self.config_hash}"

    @property
    def run_dir(self) -> str:
        """The run folder, as a local path or ``s3://`` URI."""
        return f"{self.storage.rstrip('/')}/{self.name}"


# --------------------------------------------------------------------------- storage
def _is_uri(path: str) -> bool:
    return "://" in path


def _filesystem(location: str, s3_options: Mapping[str, Any]) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem and the path on it for a local path or ``s3://`` URI.

    Ray Train takes ``storage_filesystem`` plus a path without the scheme; S3 goes through
    s3fs (not pyarrow's own S3) so endpoints and credentials work as everywhere else here.
    """
    if location.startswith("s3://"):
        import s3fs

        handler = pyarrow.fs.FSSpecHandler(s3fs.S3FileSystem(**dict(s3_options)))
        return pyarrow.fs.PyFileSystem(handler), location.removeprefix("s3://").rstrip("/")
    return pyarrow.fs.LocalFileSystem(), str(Path(location).resolve())


def _read_bytes(fs: pyarrow.fs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.readall()


def _claim_run_folder(run: RunSpec) -> None:
    """Record the config hash in the run folder, or refuse one written by another config.

    The run name already contains the hash; this catches run folders that were copied,
    renamed or hand-edited, before any worker starts.
    """
    fs, root = _filesystem(run.storage, run.s3_options)
    marker = f"{root}/{run.name}/{RUN_MARKER}"
    uri = f"{run.run_dir}/{RUN_MARKER}"
    if fs.get_file_info(marker).type == pyarrow.fs.FileType.File:
        try:
            recorded = json.loads(_read_bytes(fs, marker))["config_hash"]
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
    if _is_uri(run.storage):
        fs.create_dir(f"{root}/{run.name}")
        with fs.open_output_stream(marker) as stream:  # one S3 PUT: all or nothing
            stream.write(json.dumps(payload, indent=2).encode())
    else:
        write_json(marker, payload)


# --------------------------------------------------------------------------- checkpoint files
def _load_envelope(data: bytes, name: str, config_hash: str | None) -> dict[str, Any]:
    """Parse a ``state.pt`` payload, with errors that name the file ``name``."""
    try:
        envelope = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" in str(error).lower():
            raise CheckpointError(
                f"{name}: holds objects that torch.load(weights_only=True) refuses; checkpoint state must be "
                f"tensors, numbers, strings, lists and dicts ({error})"
            ) from None
        raise CheckpointError(f"{name}: corrupted or truncated checkpoint ({error})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"{name}: corrupted or truncated checkpoint ({type(error).__name__}: {error}); "
            "delete this checkpoint folder (or the run folder) to continue"
        ) from None
    if not isinstance(envelope, dict) or envelope.get("format") != CHECKPOINT_FORMAT or "state" not in envelope:
        raise CheckpointError(f"{name}: not a meduet checkpoint (format {CHECKPOINT_FORMAT} expected)")
    if config_hash is not None and envelope.get("config_hash") != config_hash:
        raise ConfigMismatchError(
            f"{name}: written with config hash {envelope.get('config_hash')}, this run has {config_hash}; "
            "refusing to load another configuration's checkpoint"
        )
    return envelope


def read_checkpoint(
    checkpoint: str, s3_options: Mapping[str, Any] | None = None, config_hash: str | None = None
) -> dict[str, Any]:
    """The ``state`` dict saved in a checkpoint folder (e.g. ``FitResult.checkpoint``).

    Args:
        checkpoint: checkpoint folder, local path or ``s3://`` URI.
        s3_options: ``s3fs.S3FileSystem`` keyword arguments for ``s3://``.
        config_hash: if given, refuse a checkpoint written with another config hash.

    Returns:
        What the training loop passed to :func:`report` as ``state``, tensors on CPU.
    """
    fs, path = _filesystem(checkpoint, s3_options or {})
    name = f"{checkpoint.rstrip('/')}/{STATE_FILE}"
    try:
        data = _read_bytes(fs, f"{path}/{STATE_FILE}")
    except (FileNotFoundError, OSError) as error:
        raise CheckpointError(f"{name}: cannot be read ({error})") from None
    return _load_envelope(data, name, config_hash)["state"]


# --------------------------------------------------------------------------- worker session
@dataclass
class _Session:
    """What the worker-side helpers know about the run they are in (None outside fit)."""

    stage: str
    config_hash: str
    checkpoint_every: int
    scheme: str  # "s3://" or "": turns Ray's scheme-less paths back into names users know
    storage: str  # RunSpec.storage, s3_options and name: where load_checkpoint finds the run folder
    s3_options: Mapping[str, Any]
    run_name: str
    history: list[dict[str, Any]] = field(default_factory=list)


_SESSION: _Session | None = None


def _in_fit() -> bool:
    return _SESSION is not None


def device() -> torch.device:
    """This worker's device: its GPU, or the CPU (always the CPU outside :func:`fit`)."""
    return ray.train.torch.get_device() if _in_fit() else torch.device("cpu")


def world_rank() -> int:
    """This worker's rank in ``[0, world_size())``; rank 0 writes checkpoints."""
    return ray.train.get_context().get_world_rank() if _in_fit() else 0


def world_size() -> int:
    """Number of workers in the run."""
    return ray.train.get_context().get_world_size() if _in_fit() else 1


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Move ``model`` to :func:`device` and wrap it in DDP when there are several workers.

    Save and load weights through :func:`unwrap` so checkpoints do not depend on the
    number of workers.
    """
    if _in_fit():
        return ray.train.torch.prepare_model(model)
    return model.to(device())


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside :func:`prepare_model`'s DDP wrapper (the model itself if not wrapped)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def prepare_loader(loader: DataLoader, seed: int | None = None) -> DataLoader:
    """Shard ``loader`` over workers and move its batches to :func:`device`.

    Unlike ``ray.train.torch.prepare_data_loader``, the default sampler is replaced by a
    ``DistributedSampler`` for one worker too: the batch order then depends only on
    ``(seed, epoch)`` (see :func:`set_epoch`), so a run resumed mid-epoch sees the same
    batches as an uninterrupted one, and one worker is the same code path.

    Args:
        loader: a map-style ``DataLoader`` with the default sampler (``shuffle=True`` or
            ``False``); a custom sampler or an ``IterableDataset`` is left as is.
        seed: shuffling seed; None uses the loader's ``generator`` seed, else 0.

    Returns:
        The prepared loader; its ``sampler`` attribute is the ``DistributedSampler``.
    """
    default_sampler = isinstance(loader.sampler, (RandomSampler, SequentialSampler))
    if default_sampler and not isinstance(loader.dataset, IterableDataset):
        if seed is None:
            seed = loader.generator.initial_seed() if loader.generator is not None else 0
        sampler = DistributedSampler(
            loader.dataset, num_replicas=world_size(), rank=world_rank(),
            shuffle=isinstance(loader.sampler, RandomSampler), seed=seed, drop_last=loader.drop_last,
        )
        loader = DataLoader(
            loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
            collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
            timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
            multiprocessing_context=loader.multiprocessing_context, prefetch_factor=loader.prefetch_factor,
            persistent_workers=loader.persistent_workers,
        )
    if _in_fit():
        return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False, move_to_device=True)
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle a :func:`prepare_loader` loader for ``epoch`` (no-op for other samplers)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def checkpoint_due(step: int, last_step: int) -> bool:
    """Whether to pass ``state`` to :func:`report` after ``step`` (1-based count of steps done).

    True every ``RunSpec.checkpoint_every`` steps and at ``last_step``; always False
    outside :func:`fit`, where there is nowhere to save.
    """
    if _SESSION is None:
        return False
    return step % _SESSION.checkpoint_every == 0 or step == last_step


def capture_rng() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / python RNG states, as checkpointable values.

    Everything is a tensor, number or tuple so it loads with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore RNG states from :func:`capture_rng`, or this rank's from a checkpoint.

    A checkpoint holds every rank's states (see :func:`report`); each rank takes its own.
    Resumed with more workers than were saved, the extra ranks take rank 0's states
    (the run then no longer repeats an uninterrupted one exactly).
    """
    if "per_rank" in state:
        per_rank = state["per_rank"]
        rank = world_rank()
        if rank >= len(per_rank):
            log.warning("checkpoint holds RNG states of %d ranks; rank %d takes rank 0's", len(per_rank), rank)
        state = per_rank[rank if rank < len(per_rank) else 0]
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    # Tuples come back as lists from some serialisers; random.setstate wants tuples.
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint() -> dict[str, Any] | None:
    """The ``state`` of the run's latest checkpoint, or None when starting fresh.

    Tensors are loaded to CPU (``load_state_dict`` moves them). Also restores the metric
    history up to that checkpoint, so the run's history CSV has no gaps or repeats.

    Raises:
        CheckpointError: the checkpoint file is missing, corrupted or truncated (the
            message names it).
        ConfigMismatchError: the checkpoint was written with another config hash.
    """
    if _SESSION is None:
        return None
    checkpoint = ray.train.get_checkpoint()
    listed = _checkpoint_step(checkpoint.path) if checkpoint is not None else -1
    envelope = _newer_unlisted_checkpoint(listed)
    if envelope is None:
        if checkpoint is None:
            return None
        path = f"{checkpoint.path}/{STATE_FILE}"
        name = _SESSION.scheme + path
        try:
            data = _read_bytes(checkpoint.filesystem, path)
        except (FileNotFoundError, OSError) as error:
            raise CheckpointError(f"{name}: cannot be read ({error})") from None
        envelope = _load_envelope(data, name, _SESSION.config_hash)
    _SESSION.history = [dict(row) for row in envelope.get("history", [])]
    return envelope["state"]


def _checkpoint_step(path: str) -> int:
    """Step of a ``.../checkpoint_<step>`` folder (-1 for other names)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    digits = name.removeprefix("checkpoint_")
    return int(digits) if name.startswith("checkpoint_") and digits.isdigit() else -1


def _newer_unlisted_checkpoint(listed_step: int) -> dict[str, Any] | None:
    """The envelope of the newest complete checkpoint folder newer than Ray's listed one.

    Ray lists a checkpoint in its run snapshot some time after the folder is in storage;
    a run killed in between (node loss, SIGKILL) would otherwise resume from the previous
    one and redo those steps. A folder that cannot be read (an upload cut short) is skipped
    with a warning; one of another config is refused as always.
    """
    fs, root = _filesystem(_SESSION.storage, _SESSION.s3_options)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/{_SESSION.run_name}", allow_not_found=True))
    except OSError as error:
        log.warning("cannot list run folder %s for unlisted checkpoints: %s", _SESSION.run_name, error)
        return None
    folders = sorted((info.path for info in infos if info.type == pyarrow.fs.FileType.Directory
                      and _checkpoint_step(info.path) > listed_step), key=_checkpoint_step, reverse=True)
    for folder in folders:
        name = f"{_SESSION.scheme}{folder}/{STATE_FILE}"
        try:
            envelope = _load_envelope(_read_bytes(fs, f"{folder}/{STATE_FILE}"), name, _SESSION.config_hash)
        except ConfigMismatchError:
            raise
        except (OSError, CheckpointError) as error:
            log.warning("skipping unlisted checkpoint %s: %s", name, error)
            continue
        log.info("resuming from %s, written before the run stopped but not yet listed by Ray", name)
        return envelope
    return None


def _bare(part: Any) -> Any:
    return unwrap(part) if isinstance(part, torch.nn.Module) else part


def training_state(step: int, **parts: Any) -> dict[str, Any]:
    """A checkpoint ``state``: every part's ``state_dict`` (models without their DDP
    wrapper), the step reached and this rank's RNG states.

    Args:
        step: steps completed.
        parts: models, optimizers, schedulers, ... by the name :func:`resume` loads them under.
    """
    return {**{name: _bare(part).state_dict() for name, part in parts.items()}, "step": step, "rng": capture_rng()}


def resume(**parts: Any) -> int:
    """Load the run's latest checkpoint into ``parts`` and return the step to continue from.

    The counterpart of :func:`training_state` (same part names); 0 when starting fresh.
    RNG states are restored last, so a resumed run draws what the uninterrupted one would.
    """
    state = load_checkpoint()
    if state is None:
        return 0
    for name, part in parts.items():
        _bare(part).load_state_dict(state[name])
    restore_rng(state["rng"])
    return int(state["step"])


def _plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as Python numbers/strings (tensors and numpy scalars unwrapped)."""
    plain: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, (torch.Tensor, np.generic, np.ndarray)):
            value = value.item()
        if not isinstance(value, (int, float, str, bool)) and value is not None:
            raise TypeError(f"metric {key!r} must be a number or string, got {type(value).__name__}")
        plain[str(key)] = value
    return plain


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a collective: all ranks must call it)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def report(metrics: Mapping[str, Any], state: dict[str, Any] | None = None) -> None:
    """Record one row of metrics and, with ``state``, save a checkpoint.

    Rank 0's rows are the run's history. Without ``state`` this is cheap and local, so
    reporting every step is fine. With ``state`` it is collective: every rank must pass
    ``state`` at the same steps (see :func:`checkpoint_due`); rank 0 writes the
    checkpoint and Ray registers it (this waits for Ray's controller, up to ~2 s).

    Args:
        metrics: numbers (tensors and numpy scalars are unwrapped) or strings.
        state: what a resumed loop needs: model / optimizer / scheduler / scaler state
            dicts, ``"step"``, and ``"rng"`` (:func:`capture_rng`; captured here if absent).
            Each rank's ``"rng"`` is gathered, so after a resume ``restore_rng(state["rng"])``
            gives every rank its own generators back. The config hash is added.
    """
    row = _plain_metrics(metrics)
    session = _SESSION
    if session is None:
        return
    rank = world_rank()
    if rank == 0:
        session.history.append(row)
    if state is None:
        # Rows stay here and travel back in checkpoints and the loop's return value:
        # each ray.train.report waits for the controller's next poll (2 s by default),
        # which would throttle a loop that reports every step.
        return
    per_rank_rng = _gather(state.get("rng") or capture_rng())
    if rank != 0:
        ray.train.report(row)
        return
    envelope = {
        "format": CHECKPOINT_FORMAT, "stage": session.stage, "config_hash": session.config_hash,
        "state": {**state, "rng": {"per_rank": per_rank_rng}}, "history": list(session.history),
    }
    step = int(state.get("step", len(session.history)))
    # Ray copies the staged folder to the run's storage and only then lists it in the run
    # snapshot. load_checkpoint also takes a complete folder that is not listed yet (a kill
    # in between) and skips one whose state.pt is torn (a kill mid-upload).
    with tempfile.TemporaryDirectory(prefix="meduet-ckpt-", ignore_cleanup_errors=True) as staging:
        torch.save(envelope, Path(staging) / STATE_FILE)
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(staging),
                         checkpoint_dir_name=f"checkpoint_{step:09d}")


# --------------------------------------------------------------------------- driver
_STARTED_LOCAL = False


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
    for Unix sockets). Usage statistics are switched off first.
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
    ray.init(address="local", num_cpus=run.local_num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             _temp_dir=str(temp_dir))
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


def write_history_csv(path: Path, history: list[dict[str, Any]]) -> Path:
    """Write metric rows atomically as CSV; columns in order of first appearance."""
    columns: dict[str, None] = {}
    for row in history:
        columns.update(dict.fromkeys(row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return write_text(path, buffer.getvalue())


def _training_error(error: Exception, run: RunSpec) -> DistributedError:
    """Our error for Ray's: a worker's CheckpointError keeps its type and message."""
    # WorkerGroupError.worker_failures maps rank -> the exception the loop raised.
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        if isinstance(failure, CheckpointError):
            return type(failure)(str(failure))
    return TrainingError(f"run {run.run_dir} failed: {error}")


def _run_worker(config: dict[str, Any], *, loop: Callable[[dict[str, Any]], Any], session: _Session) -> dict[str, Any]:
    """Runs on each worker: installs the session the helpers read, then the loop.

    Module level (not a closure in ``fit``) so it unpickles by reference on the workers
    and its ``global`` is this module's ``_SESSION``.
    """
    global _SESSION
    _SESSION = dataclasses.replace(session, history=[])
    try:
        loop(config)
        return {"history": _SESSION.history}
    finally:
        _SESSION = None


def fit(
    loop: Callable[[dict[str, Any]], Any], loop_config: dict[str, Any], scaling: Scaling, run: RunSpec
) -> FitResult:
    """Run ``loop(loop_config)`` on every worker; resume from the run's latest checkpoint.

    Args:
        loop: per-worker training function, shipped to the workers with cloudpickle (a
            module-level function goes by reference, so its module must be importable
            there). It resumes through :func:`load_checkpoint` and reports through
            :func:`report`.
        loop_config: plain values handed to every worker.
        scaling: workers and their resources.
        run: run name, storage and checkpoint/failure policy.

    Returns:
        The run's final metrics, latest checkpoint and full metric history (also
        written to ``run.metrics_csv``).

    Raises:
        CheckpointError: a worker could not read the checkpoint to resume from.
        ConfigMismatchError: the run folder or checkpoint belongs to another config hash.
        TrainingError: the loop failed more than ``run.max_failures`` times.
    """
    ensure_ray(run)
    _claim_run_folder(run)
    fs, root = _filesystem(run.storage, run.s3_options)
    session = _Session(stage=run.stage, config_hash=run.config_hash, checkpoint_every=run.checkpoint_every,
                       scheme="s3://" if run.storage.startswith("s3://") else "", storage=run.storage,
                       s3_options=dict(run.s3_options), run_name=run.name)

    trainer = ray.train.torch.TorchTrainer(
        functools.partial(_run_worker, loop=loop, session=session),
        train_loop_config=loop_config,
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
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise _training_error(error, run) from error

    history = list((result.return_value or {}).get("history", []))
    checkpoint = session.scheme + result.checkpoint.path if result.checkpoint is not None else None
    if run.metrics_csv is not None:
        write_history_csv(run.metrics_csv, history)
    return FitResult(metrics=dict(history[-1]) if history else dict(result.metrics or {}),
                     checkpoint=checkpoint, history=history, metrics_csv=run.metrics_csv, run=run)


# --------------------------------------------------------------------------- embarrassingly parallel work
class TaskError(DistributedError):
    """A Ray task of :func:`map_tasks` failed; the message names the item."""


def map_tasks(fn: Callable[[Any], Any], items: list[Any], *, workers: int, scaling: Scaling,
              run: RunSpec) -> Iterator[Any]:
    """Run ``fn(item)`` for every item as Ray tasks; yield results as they finish.

    For independent per-case work such as encoding volumes with a frozen model. At most
    ``workers`` tasks are in flight; each reserves ``scaling.cpus_per_worker`` CPUs (and
    ``gpus_per_worker`` GPUs when ``use_gpu``), so the cluster's scheduler places them.
    With ``workers == 1`` the work runs in this process (same code, no Ray start-up).

    Args:
        fn: an importable module-level function (Ray ships it by reference).
        items: plain, picklable arguments.
        run: where Ray runs (its address / local settings); no checkpoints are kept.

    Raises:
        TaskError: naming the failing item's index and the task's error.
    """
    if workers == 1:
        for index, item in enumerate(items):
            try:
                yield fn(item)
            except Exception as error:
                raise TaskError(f"task {index} of {len(items)} failed: {type(error).__name__}: {error}") from error
        return
    ensure_ray(run)
    remote = ray.remote(num_cpus=scaling.cpus_per_worker,
                        num_gpus=scaling.gpus_per_worker if scaling.use_gpu else 0)(fn)
    pending: dict[Any, int] = {}
    queue = list(enumerate(items))
    while queue or pending:
        while queue and len(pending) < workers:
            index, item = queue.pop(0)
            pending[remote.remote(item)] = index
        done, _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(done[0])
        try:
            yield ray.get(done[0])
        except ray.exceptions.RayError as error:
            for ref in pending:
                ray.cancel(ref)
            cause = getattr(error, "cause", None) or error  # the task's own exception, without Ray's wrapping
            raise TaskError(f"task {index} of {len(items)} failed: {type(cause).__name__}: {cause}") from None
