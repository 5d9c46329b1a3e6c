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

    @staticmethod
    def _files(path: Path) -> dict[str, Path]:
        """The file at ``path`` (named ``""``), or every file of the folder by its relative name."""
        if path.is_file():
            return {"": path}
        files = {file.relative_to(path).as_posix(): file for file in sorted(path.rglob("*")) if file.is_file()}
        if not files:  # a problem of the input, as a missing file is
            raise FileNotFoundError(f"{path}: nothing to hand over (no such file, or an empty folder)")
        return files

    def pack(self, path: Path, sha: str | None = None) -> Packed:
        """Upload the file or every file of the folder at ``path``; what :meth:`unpack` needs.
        ``sha``: the file's SHA-256 when the caller has it already."""
        if sha and Path(path).is_file():
            return {"": self.put_file(Path(path), sha)}
        return {name: self.put_file(file) for name, file in self._files(Path(path)).items()}

    def describe(self, path: Path, sha: str | None = None) -> Packed:
        """Like :meth:`pack` for files a task reads from their own remote location: hashes, no upload."""
        if sha and Path(path).is_file():
            return {"": sha}
        return {name: sha256_file(file) for name, file in self._files(Path(path)).items()}

    def get_file(self, sha: str, target: Path, source: str | None = None) -> Path:
        """Download the object of ``sha`` (or the file at URI ``source``) to ``target`` atomically,
        after checking that its bytes hash to ``sha``."""
        fs, root = filesystem(source, self.s3_options) if source else self._fs()
        key = root if source else self._key(root, sha)
        where = source or f"{self.url}: object {sha}"
        with atomic_path(target) as tmp:
            try:
                fs.get_file(key, str(tmp))
            except FileNotFoundError as error:
                raise ExchangeError(f"{where}: not found (wanted for {target.name})") from error
            except OSError as error:
                raise ExchangeError(f"{where}: cannot fetch it for {target.name} "
                                    f"({type(error).__name__}: {error})") from error
            got = sha256_file(tmp)
            if got != sha:  # torn or altered in the exchange; at a source, changed since the driver read it
                raise ExchangeError(f"{where}: holds bytes hashing to {got}, not {sha} (wanted for {target})")
        return target

    def unpack(self, packed: Packed, target: Path, source: str | None = None) -> Path:
        """Lay out what :meth:`pack` uploaded at ``target`` (a file, or a folder of files); with
        ``source``, what :meth:`describe` hashed, read from that URI (the folder's files under it)."""
        for name, sha in packed.items():
            at = (f"{source.rstrip('/')}/{name}" if name else source) if source else None
            self.get_file(sha, target / name if name else target, at)
        return target

    def cached(self, sha: str, name: str) -> Path:
        """The file of ``sha`` in a per-node cache kept across tasks (files many tasks read: models).

        ``name`` is the file's name there (its suffix tells readers the format).
        """
        target = Path(tempfile.gettempdir()) / "meduet-exchange" / sha / name
        return target if target.is_file() else self.get_file(sha, target)
