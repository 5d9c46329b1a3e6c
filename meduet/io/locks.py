"""One writer per output folder: an advisory file lock, released by the OS if the holder dies.

Two runs writing the same folder at once (a scheduled run firing during a manual one, two
shells) would prune each other's temporary files and interleave manifests. The lock files
live under the work folder (``<work>/locks/``), outside every versioned output, and hold the
holder's pid, host and start time for the message the second run gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path


class OutputLockedError(RuntimeError):
    """Another run holds the lock of an output folder; the message names the folder and the holder."""


@contextlib.contextmanager
def output_lock(locks_dir: Path, folder: Path | str, owner: str | None = None) -> Iterator[None]:
    """Hold the lock of ``folder`` (a local path or URI) for the duration of the block.

    Args:
        locks_dir: where the lock files live.
        folder: what is locked; the same path or URI is the same lock.
        owner: who holds it, in words (e.g. a Prefect flow run), added to the holder record.

    Raises:
        OutputLockedError: another process holds it (no waiting: the caller reports and stops).
    """
    key = str(folder).rstrip("/")
    path = locks_dir / f"{key.rsplit('/', 1)[-1]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown holder"
            raise OutputLockedError(
                f"{folder}: another run is writing here ({holder}); wait for it to finish or stop it "
                f"(lock file {path})"
            ) from None
        handle.seek(0)
        handle.truncate()
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        handle.write(json.dumps({**record, **({"owner": owner} if owner else {})}))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
