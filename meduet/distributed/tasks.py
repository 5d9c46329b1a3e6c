"""Embarrassingly parallel per-case work as Ray tasks (e.g. encoding volumes with a frozen model)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

import ray

from meduet.distributed.driver import DistributedError, ensure_ray
from meduet.engine.runs import RunSpec, Scaling


class TaskError(DistributedError):
    """A Ray task of :func:`map_tasks` failed; the message names the item, ``index`` is its position.

    ``cause`` is the exception the task raised (None when its process died), so a caller can
    tell a failure of the item from one of the infrastructure around it.
    """

    def __init__(self, message: str, index: int = -1, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.cause = cause


def map_tasks(fn: Callable[[Any], Any], items: list[Any], *, workers: int, scaling: Scaling,
              run: RunSpec, errors: Literal["raise", "yield"] = "raise") -> Iterator[Any]:
    """Run ``fn(item)`` for every item as Ray tasks; yield results as they finish.

    For independent per-case work such as encoding volumes with a frozen model. At most
    ``workers`` tasks are in flight; each reserves ``scaling.cpus_per_worker`` CPUs (and
    ``gpus_per_worker`` GPUs when ``use_gpu``), so the cluster's scheduler places them.
    With ``workers == 1`` the work runs in this process (same code, no Ray start-up).

    Args:
        fn: an importable module-level function (Ray ships it by reference).
        items: plain, picklable arguments.
        run: where Ray runs (its address / local settings); no checkpoints are kept.
        errors: ``raise`` stops at the first failed task (the others are cancelled);
            ``yield`` yields a :class:`TaskError` (its ``index`` names the item) in the failed
            task's place and goes on, for per-item work where one bad item must not stop the rest.

    Raises:
        TaskError: naming the failing item's index and the task's error (``errors="raise"``).
    """
    if workers == 1:
        for index, item in enumerate(items):
            try:
                yield fn(item)
            except Exception as error:
                failure = TaskError(f"task {index} of {len(items)} failed: {type(error).__name__}: {error}", index,
                                    error)
                if errors == "raise":
                    raise failure from error
                yield failure
        return
    ensure_ray(run)
    remote = ray.remote(num_cpus=scaling.cpus_per_worker or 1.0,
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
            result = ray.get(done[0])
        except ray.exceptions.RayError as error:  # the task raised, or its worker process died
            cause = getattr(error, "cause", None) or error  # the task's own exception, without Ray's wrapping
            failure = TaskError(f"task {index} of {len(items)} failed: {type(cause).__name__}: {cause}", index,
                                None if isinstance(error, ray.exceptions.WorkerCrashedError) else cause)
            if errors == "yield":
                yield failure
                continue
            for ref in pending:
                ray.cancel(ref)
            raise failure from None
        yield result
