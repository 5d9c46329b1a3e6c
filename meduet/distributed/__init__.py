"""Ray Train at the edge: the only module of the project that imports ``ray``.

A training stage hands a per-worker loop, ``loop(**loop_kwargs) -> None``, to :func:`fit`,
which runs it on every worker with ``ray.train.torch.TorchTrainer`` (gloo on CPU, NCCL on
GPU). The loop itself has no distributed branches: it calls the worker-side helpers below,
which wrap Ray's, and one worker is the same code path. (In this project the loop is
``meduet.engine.loop.train``; trainers supply only their parts.)

Driver side
    :func:`fit` -> :class:`FitResult`, :func:`ensure_ray` / :func:`shutdown_ray`,
    :func:`map_tasks`. What a run is (``RunSpec``, ``Scaling``, the run key) lives in
    ``meduet.engine.runs``; the checkpoint file in ``meduet.engine.checkpoint``.

Worker side (inside ``loop``)
    :func:`device`, :func:`world_rank`, :func:`world_size`, :func:`prepare_model`,
    :func:`unwrap`, :func:`prepare_loader`, :func:`set_epoch`, :func:`checkpoint_due`,
    :func:`load_checkpoint`, :func:`training_state`, :func:`resume`, :func:`report`.
    Called outside :func:`fit` (a loop run directly, e.g. in a unit test) they behave as
    one CPU worker with nowhere to save checkpoints.

Runs, checkpoints and resume
    Ray Train 2.x keeps a snapshot of the run's reported checkpoints in the run folder and,
    when a trainer is created again with the same name and storage, hands the latest one
    to the workers through ``ray.train.get_checkpoint()``; :func:`load_checkpoint` reads it,
    or a newer complete ``checkpoint_<step>`` folder that Ray had not listed yet when the
    run was killed. So a second :func:`fit` with the same ``RunSpec`` resumes where the
    first stopped (crash, kill, preemption), and Ray's own retries
    (``RunSpec.max_failures``) resume the same way. Every checkpoint and the run folder
    record the config hash; a mismatch is refused, never silently loaded.
    (Ray 2.x's ``TorchTrainer.restore`` / ``can_restore`` / ``resume_from_checkpoint``
    are deprecated and raise; reusing the run name is its resume mechanism.)

Metrics
    :func:`report` keeps rank 0's metric rows on the worker; they come back in the loop's
    return value and inside every checkpoint. Only checkpoints go through
    ``ray.train.report``, which waits for the controller's next poll of the workers when the
    previous checkpoint is not collected yet (every ``RunSpec.train_poll_s``, ``fit`` sets it).
"""

import importlib
from typing import Any

from meduet.distributed.worker import (checkpoint_due, device, load_checkpoint, prepare_loader, prepare_model, report,
                                       resume, set_epoch, training_state, unwrap, world_rank, world_size)

__all__ = [
    "DistributedError", "FitResult", "TaskError", "TrainingError", "checkpoint_due", "device", "ensure_ray", "fit",
    "load_checkpoint", "map_tasks", "prepare_loader", "prepare_model", "report", "resume", "set_epoch",
    "shutdown_ray", "training_state", "unwrap", "world_rank", "world_size",
]

# The driver side imports Ray at its top; it loads when one of its names is first used, so the
# worker helpers (what a trainer calls) import without Ray, as the step benchmarks need on a lent
# GPU machine that has no Ray. ``from meduet.distributed import fit`` works as before.
_DRIVER_SIDE = {
    "DistributedError": "driver", "FitResult": "driver", "TrainingError": "driver", "ensure_ray": "driver",
    "fit": "driver", "shutdown_ray": "driver", "TaskError": "tasks", "map_tasks": "tasks",
}


def __getattr__(name: str) -> Any:
    if name in _DRIVER_SIDE:
        return getattr(importlib.import_module(f"meduet.distributed.{_DRIVER_SIDE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
