"""Removing the files of an output folder that no current record owns."""

from __future__ import annotations

from pathlib import Path


def prune_unowned(folder: Path, owned: set[Path]) -> int:
    """Delete every file under ``folder`` not in ``owned`` (dropped cases, temp files of a killed run).

    Returns:
        the number of files removed.
    """
    removed = 0
    for path in list(folder.rglob("*")):
        if path.is_file() and path not in owned:
            path.unlink()
            removed += 1
    return removed
