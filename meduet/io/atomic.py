"""Atomic file writes: write to a temporary file beside the target, then rename.

A reader (or a resumed run) therefore sees either the old file or the complete new one,
never a half-written file, even if the process is killed mid-write.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; rename it onto ``target`` on success.

    The temporary name keeps ``target``'s suffixes (writers such as SimpleITK pick the
    file format from them). On error the temporary file is removed and ``target`` is
    left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            # mkstemp creates 0600; give the file the mode a plain open() would (shared datasets).
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically write ``data`` to ``target``."""
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(target)


def write_text(target: str | os.PathLike[str], text: str) -> Path:
    """Atomically write UTF-8 ``text`` to ``target``."""
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON (stable for DVC hashing)."""
    return write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save(target: str | os.PathLike[str], obj: Any) -> Path:
    """``torch.save(obj)`` to ``target`` atomically (model files, checkpoints)."""
    import torch  # only the writers of model files need it; keep this module light

    with atomic_path(target) as tmp:
        torch.save(obj, tmp)
    return Path(target)
