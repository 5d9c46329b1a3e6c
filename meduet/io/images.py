"""Reading and writing medical images with SimpleITK, with errors that name the file.

Supported inputs: NIfTI (``.nii``/``.nii.gz``), NRRD, MetaImage (``.mha``/``.mhd``) and
DICOM series folders. Every failure is raised as :class:`ImageReadError` whose message
starts with the offending path, so callers can quarantine the case and move on.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from zlib_ng import gzip_ng

from meduet.io.atomic import atomic_path
from meduet.io.dicom import preserved_locale


class ImageReadError(Exception):
    """An input image that cannot be used; ``str(error)`` names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _itk_message(error: RuntimeError) -> str:
    """The informative line of an ITK exception (they span lines of C++ context)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "ERROR" in line or line.startswith("["):
            # "ITK ERROR: MetaImageIO(0x55..): File cannot be read: ..." -> "File cannot be read: ..."
            return re.sub(r"^(sitk::ERROR:|ITK ERROR:\s*\w+\(0x[0-9a-f]+\):)\s*", "", line)
    return lines[-1] if lines else "unknown ITK error"


def _check_nifti(path: Path) -> None:
    """Raise if a NIfTI file is truncated or holds non-finite voxels.

    ITK fills a truncated NIfTI with whatever it could read and reports success, so the
    check is ours. For ``.nii.gz`` the gzip trailer stores the uncompressed length
    (mod 2**32); comparing it with the header's promise costs a few hundred bytes of I/O.
    """
    try:
        header_img = nib.load(str(path))
    except Exception as error:  # nibabel raises many types for a bad header
        raise ImageReadError(path, f"corrupt or unreadable NIfTI header ({error})") from None
    proxy = header_img.dataobj
    expected = int(proxy.offset) + int(proxy.dtype.itemsize) * int(_prod(proxy.shape))
    if path.name.endswith(".gz"):
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            (isize,) = struct.unpack("<I", fh.read(4))
        # A truncated stream ends in arbitrary compressed bytes: a chance match is ~2**-32.
        complete = isize == expected % 2**32
    else:
        complete = path.stat().st_size >= expected
    if not complete:
        raise ImageReadError(path, f"truncated file: header promises {expected} bytes of image data")
    if proxy.dtype.kind == "f":
        # ITK's NIfTI reader silently turns NaN/inf into 0, hiding corrupt data: look first.
        raw = proxy.get_unscaled()
        bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
        if bad:
            raise ImageReadError(path, f"{bad} non-finite (NaN/inf) voxels")


def _prod(shape: tuple[int, ...]) -> int:
    total = 1
    for n in shape:
        total *= int(n)
    return total


def _read_dicom_series(folder: Path) -> sitk.Image:
    with preserved_locale():
        return _read_dicom_series_as_is(folder)


def _read_dicom_series_as_is(folder: Path) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise ImageReadError(folder, "folder holds no DICOM series")
    if len(series_ids) > 1:
        raise ImageReadError(folder, f"folder holds {len(series_ids)} DICOM series; expected exactly one")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise ImageReadError(folder, f"unreadable DICOM series: {_itk_message(error)}") from None


def read_image(path: str | os.PathLike[str]) -> sitk.Image:
    """Read an image file or a DICOM series folder.

    Args:
        path: file path, or a folder holding exactly one DICOM series.

    Returns:
        The image with its true geometry (spacing, origin, direction in ITK's LPS world).

    Raises:
        ImageReadError: missing, empty, truncated, corrupt or unsupported input.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if path.is_dir():
        return _read_dicom_series(path)
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    if path.name.endswith((".nii", ".nii.gz")):
        _check_nifti(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ImageReadError(path, f"unreadable or corrupt image: {_itk_message(error)}") from None


_COPY_CHUNK = 4 << 20  # bytes per read while gzipping: bounded memory for any volume size


def write_image(image: sitk.Image, path: str | os.PathLike[str], compression_level: int = 1) -> Path:
    """Atomically write ``image``; the format follows the suffix (``.nii.gz`` compressed).

    ``compression_level`` is zlib's 0-9 (0: uncompressed where the format allows). Level 1
    compresses CT volumes nearly as well as level 6 at a fraction of the time. ``.nii.gz`` is
    compressed by zlib-ng (:func:`_write_nifti_gz`).
    """
    path = Path(path)
    if path.name.endswith(".nii.gz") and compression_level > 0:
        return _write_nifti_gz(image, path, compression_level)
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compression_level > 0, compressionLevel=compression_level)
    return path


def _write_nifti_gz(image: sitk.Image, path: Path, compression_level: int) -> Path:
    """ITK writes the NIfTI uncompressed, then zlib-ng gzips it at the same zlib level.

    Compressing was most of the harmonization stage's time (README, Benchmarks): zlib-ng's
    level 1 is ~2.5x faster than ITK's zlib here, for files ~16 % larger; level 2 is as small
    as ITK's level 1. Any gzip reader reads the result. The output depends only on the input
    and the level: no name or time in the gzip header, and the input goes in fixed-size
    chunks (zlib-ng's blocks can follow chunk boundaries), so the same image always gives
    the same bytes (DVC hashes, byte comparisons).
    """
    with atomic_path(path) as tmp:
        raw = tmp.with_name(tmp.name.removesuffix(".gz"))
        try:
            sitk.WriteImage(image, str(raw), useCompression=False)
            with open(raw, "rb") as source, open(tmp, "wb") as target, gzip_ng.GzipFile(
                filename="", mode="wb", fileobj=target, compresslevel=compression_level, mtime=0
            ) as gz:
                shutil.copyfileobj(source, gz, _COPY_CHUNK)
        finally:
            raw.unlink(missing_ok=True)
    return path


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_path(path: str | os.PathLike[str]) -> str:
    """Content hash of a file, or of every file in a folder (names and bytes, sorted)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def ras_affine(image: sitk.Image) -> np.ndarray:
    """Voxel ``(i, j, k)`` → RAS world ``(4, 4)`` of an axis-aligned image (a harmonized volume).

    SimpleITK's physical points are LPS; the direction is taken as the identity, which
    harmonization guarantees (its outputs are resampled to an axis-aligned grid).
    """
    affine = np.eye(4)
    affine[:3, :3] = np.diag(image.GetSpacing())
    affine[:3, 3] = np.array(image.GetOrigin()) * np.array([-1.0, -1.0, 1.0])  # LPS → RAS
    return affine

