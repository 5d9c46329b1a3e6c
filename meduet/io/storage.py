"""Local paths and ``s3://`` URIs behind one interface (s3fs).

Remote datasets are mirrored into a local cache before processing: medical image readers
need seekable local files, and a mirror makes reruns cheap (unchanged objects are skipped).
"Unchanged" is the object's version tag (S3 ETag or version id), never its size: an edited
file of the same size is fetched again, and an object deleted remotely leaves the mirror.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import fsspec

from meduet.io.atomic import atomic_path, write_json, write_text

log = logging.getLogger(__name__)


def is_remote(uri: str | os.PathLike[str]) -> bool:
    return "://" in str(uri)


def filesystem(uri: str, s3_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    options = s3_options if str(uri).startswith("s3://") else {}
    fs, path = fsspec.core.url_to_fs(str(uri), **(options or {}))
    return fs, path


MIRROR_INDEX = ".meduet-mirror.json"  # relative path -> version tag of the local copy


def version_tag(info: dict[str, Any]) -> str:
    """What identifies one version of a remote object: its version id or ETag (size and mtime otherwise)."""
    for key in ("VersionId", "ETag", "etag"):
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}"
    return f"size:{info.get('size')}:mtime:{info.get('LastModified') or info.get('mtime')}"


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def mirror(uri: str, cache_root: Path, s3_options: dict[str, Any] | None = None) -> Path:
    """Mirror the folder at ``uri`` into ``cache_root`` and return the local copy.

    An object is downloaded unless its local copy was fetched at the same version tag
    (:func:`version_tag`); local files whose object is gone are removed. Each download is
    atomic, so an interrupted mirror never leaves a partial file behind.
    """
    fs, root = filesystem(uri, s3_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"{uri}: remote dataset folder not found")
    local_root = cache_root / str(uri).replace("://", "/", 1).rstrip("/")
    known = _read_index(local_root / MIRROR_INDEX)
    index: dict[str, str] = {}
    fetched = 0
    for remote_path, info in sorted(fs.find(root, detail=True).items()):
        relative = remote_path[len(root.rstrip("/")) + 1 :]
        target = local_root / relative
        index[relative] = version_tag(info)
        if target.is_file() and known.get(relative) == index[relative]:
            continue
        with atomic_path(target) as tmp:
            fs.get_file(remote_path, str(tmp))
        fetched += 1
    removed = 0
    for path in sorted(local_root.rglob("*")) if local_root.is_dir() else []:
        if path.is_file() and path.name != MIRROR_INDEX and path.relative_to(local_root).as_posix() not in index:
            path.unlink()
            removed += 1
    write_json(local_root / MIRROR_INDEX, index)
    log.info("mirrored %s -> %s (%d object(s) fetched, %d removed)", uri, local_root, fetched, removed)
    return local_root


def fetch_file(uri: str, cache_root: Path, s3_options: dict[str, Any] | None = None) -> Path:
    """A local copy of one remote file, downloaded again whenever the object's version tag changed."""
    fs, path = filesystem(uri, s3_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: remote file not found")
    target = cache_root / str(uri).replace("://", "/", 1)
    tag_file = target.with_name(target.name + ".version")
    tag = version_tag(fs.info(path))
    recorded = tag_file.read_text() if tag_file.is_file() else None
    if not (target.is_file() and recorded == tag):
        with atomic_path(target) as tmp:
            fs.get_file(path, str(tmp))
        write_text(tag_file, tag)
    return target
