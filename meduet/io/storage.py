"""Local paths and ``s3://`` URIs behind one interface (s3fs).

Remote datasets are mirrored into a local cache before processing: medical image readers
need seekable local files, and a mirror makes reruns cheap (unchanged objects are skipped).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import fsspec

from meduet.io.atomic import atomic_path

log = logging.getLogger(__name__)


def is_remote(uri: str | os.PathLike[str]) -> bool:
    return "://" in str(uri)


def filesystem(uri: str, s3_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    options = s3_options if str(uri).startswith("s3://") else {}
    fs, path = fsspec.core.url_to_fs(str(uri), **(options or {}))
    return fs, path


def mirror(uri: str, cache_root: Path, s3_options: dict[str, Any] | None = None) -> Path:
    """Mirror the folder at ``uri`` into ``cache_root`` and return the local copy.

    Objects whose local copy already has the remote size are not downloaded again; each
    download is atomic, so an interrupted mirror never leaves a partial file behind.
    """
    fs, root = filesystem(uri, s3_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"{uri}: remote dataset folder not found")
    local_root = cache_root / str(uri).replace("://", "/", 1).rstrip("/")
    fetched = 0
    for remote_path, info in sorted(fs.find(root, detail=True).items()):
        relative = remote_path[len(root.rstrip("/")) + 1 :]
        target = local_root / relative
        if target.is_file() and target.stat().st_size == int(info.get("size", -1)):
            continue
        with atomic_path(target) as tmp:
            fs.get_file(remote_path, str(tmp))
        fetched += 1
    log.info("mirrored %s -> %s (%d object(s) fetched)", uri, local_root, fetched)
    return local_root


def fetch_file(uri: str, cache_root: Path, s3_options: dict[str, Any] | None = None) -> Path:
    """A local copy of one remote file (downloaded again only when the size changed)."""
    fs, path = filesystem(uri, s3_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: remote file not found")
    target = cache_root / str(uri).replace("://", "/", 1)
    if not (target.is_file() and target.stat().st_size == int(fs.info(path).get("size", -1))):
        with atomic_path(target) as tmp:
            fs.get_file(path, str(tmp))
    return target
