"""Worker side of ``meduet.distributed``: what a training loop calls on every worker.

Outside :func:`meduet.distributed.fit` (a loop run directly, e.g. in a unit test) every
helper behaves as one CPU worker with nowhere to save checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow.fs
import torch
import torch.distributed
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from meduet.engine.checkpoint import (STATE_FILE, CheckpointError, ConfigMismatchError, checkpoint_dir_name,
                                      checkpoint_step, load_envelope, make_envelope)
from meduet.engine.rng import capture_rng, restore_rng
from meduet.io.filesystems import arrow_filesystem, read_bytes

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- worker session
@dataclass
class Session:
    """What the worker-side helpers know about the run they are in (None outside fit)."""

    stage: str
    config_hash: str
    checkpoint_every: int
    scheme: str  # "s3://" or "": turns Ray's scheme-less paths back into names users know
    storage: str  # RunSpec.storage, s3_options and name: where load_checkpoint finds the run folder
    s3_options: Mapping[str, Any]
    run_name: str
    threads: int = 1  # torch threads: the worker's reserved CPUs
    history: list[dict[str, Any]] = field(default_factory=list)


_SESSION: Session | None = None


def _in_fit() -> bool:
    return _SESSION is not None


def _ray_train() -> ModuleType:
    """Ray Train's worker API, imported on first use, which is always inside ``fit``: outside it the
    helpers act as one CPU worker without touching Ray, so a trainer can be built and stepped where
    Ray is not installed (the step benchmarks on a lent GPU machine)."""
    import ray.train.torch

    return ray.train


def device() -> torch.device:
    """This worker's device: its GPU, or the CPU (always the CPU outside ``distributed.fit``)."""
    return _ray_train().torch.get_device() if _in_fit() else torch.device("cpu")


def world_rank() -> int:
    """This worker's rank in ``[0, world_size())``; rank 0 writes checkpoints."""
    return _ray_train().get_context().get_world_rank() if _in_fit() else 0


def world_size() -> int:
    """Number of workers in the run."""
    return _ray_train().get_context().get_world_size() if _in_fit() else 1


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Move ``model`` to :func:`device` and wrap it in DDP when there are several workers.

    Save and load weights through :func:`unwrap` so checkpoints do not depend on the
    number of workers. Outside ``fit`` the model stays where its caller put it (the CPU
    unless a benchmark chose a GPU), so a trainer built for another device keeps it.
    """
    if _in_fit():
        return _ray_train().torch.prepare_model(model)
    return model


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
        return _ray_train().torch.prepare_data_loader(loader, add_dist_sampler=False, move_to_device=True)
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle a :func:`prepare_loader` loader for ``epoch`` (no-op for other samplers)."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def checkpoint_due(step: int, last_step: int) -> bool:
    """Whether to pass ``state`` to :func:`report` after ``step`` (1-based count of steps done).

    True every ``RunSpec.checkpoint_every`` steps and at ``last_step``; always False
    outside ``distributed.fit``, where there is nowhere to save.
    """
    if _SESSION is None:
        return False
    return step % _SESSION.checkpoint_every == 0 or step == last_step


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
    checkpoint = _ray_train().get_checkpoint()
    listed = checkpoint_step(checkpoint.path) if checkpoint is not None else -1
    envelope = _newer_unlisted_checkpoint(listed)
    if envelope is None:
        if checkpoint is None:
            return None
        path = f"{checkpoint.path}/{STATE_FILE}"
        name = _SESSION.scheme + path
        try:
            data = read_bytes(checkpoint.filesystem, path)
        except (FileNotFoundError, OSError) as error:
            raise CheckpointError(f"{name}: cannot be read ({error})") from None
        envelope = load_envelope(data, name, _SESSION.config_hash)
    _SESSION.history = [dict(row) for row in envelope.get("history", [])]
    return envelope["state"]


def _newer_unlisted_checkpoint(listed_step: int) -> dict[str, Any] | None:
    """The envelope of the newest complete checkpoint folder newer than Ray's listed one.

    Ray lists a checkpoint in its run snapshot some time after the folder is in storage;
    a run killed in between (node loss, SIGKILL) would otherwise resume from the previous
    one and redo those steps. A folder that cannot be read (an upload cut short) is skipped
    with a warning; one of another config is refused as always.
    """
    fs, root = arrow_filesystem(_SESSION.storage, _SESSION.s3_options)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/{_SESSION.run_name}", allow_not_found=True))
    except OSError as error:
        log.warning("cannot list run folder %s for unlisted checkpoints: %s", _SESSION.run_name, error)
        return None
    folders = sorted((info.path for info in infos if info.type == pyarrow.fs.FileType.Directory
                      and checkpoint_step(info.path) > listed_step), key=checkpoint_step, reverse=True)
    for folder in folders:
        name = f"{_SESSION.scheme}{folder}/{STATE_FILE}"
        try:
            envelope = load_envelope(read_bytes(fs, f"{folder}/{STATE_FILE}"), name, _SESSION.config_hash)
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
    restore_rng(state["rng"], world_rank())
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
    checkpoint and Ray registers it (when the previous one is not yet collected, this
    waits for the controller's next poll, ``ray.train_poll_s``).

    Args:
        metrics: numbers (tensors and numpy scalars are unwrapped) or strings.
        state: what a resumed loop needs: model / optimizer / scheduler / scaler state
            dicts, ``"step"``, and ``"rng"`` (:func:`capture_rng`; captured here if absent).
            Each rank's ``"rng"`` is gathered, so after a resume ``restore_rng(state["rng"], rank)``
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
        # a ray.train.report waits for the controller's next poll whenever the previous
        # one is not collected yet, which would throttle a loop that reports every step.
        return
    per_rank_rng = _gather(state.get("rng") or capture_rng())
    if rank != 0:
        _ray_train().report(row)
        return
    payload = make_envelope(stage=session.stage, config_hash=session.config_hash,
                            state={**state, "rng": {"per_rank": per_rank_rng}}, history=session.history)
    step = int(state.get("step", len(session.history)))
    # Ray copies the staged folder to the run's storage and only then lists it in the run
    # snapshot. load_checkpoint also takes a complete folder that is not listed yet (a kill
    # in between) and skips one whose state.pt is torn (a kill mid-upload).
    with tempfile.TemporaryDirectory(prefix="meduet-ckpt-", ignore_cleanup_errors=True) as staging:
        torch.save(payload, Path(staging) / STATE_FILE)
        _ray_train().report(row, checkpoint=_ray_train().Checkpoint.from_directory(staging),
                         checkpoint_dir_name=checkpoint_dir_name(step))


@contextlib.contextmanager
def running(session: Session) -> Iterator[Session]:
    """Install ``session`` for the helpers of this module while a loop runs (inside ``distributed.fit``)."""
    global _SESSION
    _SESSION = dataclasses.replace(session, history=[])
    torch.set_num_threads(session.threads)  # Ray's OMP_NUM_THREADS says the same; torch may have read it late
    try:
        yield _SESSION
    finally:
        _SESSION = None
