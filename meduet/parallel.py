"""Process pools for per-case image work (harmonization, demo generation).

Workers are spawned, not forked: they must not inherit the parent's threads (ITK's pool,
Prefect, tqdm) or locks. Each worker gets an equal share of the cores for ITK's own
multithreading, so ``workers`` processes never oversubscribe the machine.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import SimpleITK as sitk


def _init_worker(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A spawn-context pool of ``workers`` processes sharing the cores for ITK threads."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads,))
