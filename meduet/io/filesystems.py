"""One view of local folders and ``s3://`` prefixes as pyarrow filesystems.

Ray Train takes a ``storage_filesystem`` plus a path without the scheme; checkpoints and
run folders are read back through the same filesystem. S3 goes through s3fs (not
pyarrow's own S3 client), so endpoints and credentials work as everywhere else here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.fs


def arrow_filesystem(location: str, s3_options: Mapping[str, Any]) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem and the path on it for a local path or ``s3://`` URI.

    Args:
        location: absolute local path or ``s3://bucket/prefix``.
        s3_options: ``s3fs.S3FileSystem`` keyword arguments (endpoint, region).

    Returns:
        ``(filesystem, path)``; ``path`` has no scheme and no trailing slash.
    """
    if location.startswith("s3://"):
        import s3fs

        handler = pyarrow.fs.FSSpecHandler(s3fs.S3FileSystem(**dict(s3_options)))
        return pyarrow.fs.PyFileSystem(handler), location.removeprefix("s3://").rstrip("/")
    return pyarrow.fs.LocalFileSystem(), str(Path(location).resolve())


def read_bytes(fs: pyarrow.fs.FileSystem, path: str) -> bytes:
    """The whole content of ``path`` on ``fs``."""
    with fs.open_input_stream(path) as stream:
        return stream.readall()
