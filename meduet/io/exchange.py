"""Files handed between a stage's driver and its Ray tasks through object storage.

On a cluster whose nodes share no file system, a task cannot open the driver's project
folder, and the driver's DVC-tracked output folders stay on the driver. The data stages then
hand files over through an *exchange* (``ray.exchange``, an ``s3://`` prefix): the driver
:meth:`Exchange.pack`\\ s a task's inputs, the task :meth:`Exchange.unpack`\\ s them into its own
scratch folder, packs what it wrote, and the driver unpacks that into its output folder.

Objects are named by the SHA-256 of their bytes (``<prefix>/<2 hex>/<64 hex>``): a file already
there is not sent again (a harmonized volume that the encoding stage hands back to the cluster,
a model every task reads), a rerun finds its earlier uploads, and every download is checked
against its name before it is renamed into place, so a torn or altered object never lands.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meduet.io.atomic import atomic_path
from meduet.io.images import sha256_file
from meduet.io.storage import filesystem

# What a task needs to fetch one file or folder: relative file name -> SHA-256 of its bytes.
# The empty name stands for the path itself being a file (a volume); a folder (a DICOM
# series) lists its files.
Packed = dict[str, str]


class ExchangeError(RuntimeError):
    """A file could not be handed over (missing object, wrong bytes, storage unreachable): a failure
    of the storage, never of the case, so a stage stops (and resumes) instead of quarantining it."""


@dataclass(frozen=True)
class Exchange:
    """A content-addressed file exchange at ``url`` (``s3://bucket/prefix``, or a folder).

    Picklable (the URL and s3fs options; credentials come from each node's environment), so
    a task receives it inside its job.
    """

    url: str
    s3_options: dict[str, Any] = field(default_factory=dict)

    def _fs(self) -> tuple[Any, str]:
        return filesystem(self.url, self.s3_options)

    def _key(self, root: str, sha: str) -> str:
        return f"{root.rstrip('/')}/{sha[:2]}/{sha}"

    def put_file(self, path: Path, sha: str | None = None) -> str:
        """Upload one file unless an object with its bytes is there already; return its SHA-256.

        Raises:
            OSError: ``path`` cannot be read (a problem of the file).
            ExchangeError: the exchange cannot be reached or written (a problem of the storage).
        """
        sha = sha or sha256_file(path)
        fs, root = self._fs()
        key = self._key(root, sha)
        try:
            if fs.exists(key):
                return sha
            if self.url.startswith("s3://"):
                fs.put_file(str(path), key)  # an S3 PUT appears whole or not at all
                return sha
        except OSError as error:
            raise ExchangeError(f"{self.url}: cannot store {path.name} ({type(error).__name__}: {error})") from error
        with atomic_path(key) as tmp:
            shutil.copyfile(path, tmp)
        return sha

    def pack(self, path: Path) -> Packed:
        """Upload the file or every file of the folder at ``path``; what :meth:`unpack` needs."""
        path = Path(path)
        if path.is_file():
            return {"": self.put_file(path)}
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:  # a problem of the input, as a missing file is
            raise FileNotFoundError(f"{path}: nothing to hand over (no such file, or an empty folder)")
        return {file.relative_to(path).as_posix(): self.put_file(file) for file in files}

    def get_file(self, sha: str, target: Path) -> Path:
        """Download the object of ``sha`` to ``target`` atomically, after checking its bytes."""
        fs, root = self._fs()
        key = self._key(root, sha)
        with atomic_path(target) as tmp:
            try:
                fs.get_file(key, str(tmp))
            except FileNotFoundError as error:
                raise ExchangeError(f"{self.url}: no object {sha} (wanted for {target.name})") from error
            except OSError as error:
                raise ExchangeError(f"{self.url}: cannot fetch {sha} for {target.name} "
                                    f"({type(error).__name__}: {error})") from error
            got = sha256_file(tmp)
            if got != sha:
                raise ExchangeError(f"{self.url}: object {sha} holds bytes hashing to {got} (wanted for {target})")
        return target

    def unpack(self, packed: Packed, target: Path) -> Path:
        """Lay out what :meth:`pack` uploaded at ``target`` (a file, or a folder of files)."""
        for name, sha in packed.items():
            self.get_file(sha, target / name if name else target)
        return target

    def cached(self, sha: str, name: str) -> Path:
        """The file of ``sha`` in a per-node cache kept across tasks (files many tasks read: models).

        ``name`` is the file's name there (its suffix tells readers the format).
        """
        target = Path(tempfile.gettempdir()) / "meduet-exchange" / sha / name
        return target if target.is_file() else self.get_file(sha, target)
