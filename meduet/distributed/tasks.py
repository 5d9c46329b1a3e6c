"""Embarrassingly parallel per-case work as Ray tasks (e.g. encoding volumes with a frozen model)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import ray

from meduet.distributed.driver import DistributedError, ensure_ray
from meduet.engine.runs import RunSpec, Scaling


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
