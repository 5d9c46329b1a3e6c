"""Writing a CT volume as a DICOM series (one file per slice) with SimpleITK/GDCM.

Output is byte-identical for identical input: UIDs are derived from a caller's key
(``derived_uid``), every date and time is fixed, and GDCM writes nothing else that
varies. Pixels are stored as signed 16-bit values with ``RescaleIntercept = -1024`` and
``RescaleSlope = 1`` (stored = HU + 1024), as scanners do; ``sitk.ImageSeriesReader``
applies the rescale and returns HU. Reading lives in ``meduet.io.images``.
"""

from __future__ import annotations

import contextlib
import hashlib
import locale
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from meduet.io.atomic import atomic_path

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"  # SOP Class UID
FIXED_DATE, FIXED_TIME = "20000101", "000000"
RESCALE_INTERCEPT, RESCALE_SLOPE = -1024, 1
_DATE_TAGS = ("0008|0012", "0008|0020", "0008|0021", "0008|0022", "0008|0023")  # creation, study..content
_TIME_TAGS = ("0008|0013", "0008|0030", "0008|0031", "0008|0032", "0008|0033")


@contextlib.contextmanager
def preserved_locale() -> Iterator[None]:
    """Undo GDCM's process-wide ``setlocale(LC_ALL, "C")``.

    GDCM switches the C locale to format decimal strings; left that way, Python's
    preferred encoding in this process silently becomes ASCII (subprocess output with a
    non-ASCII character then fails to decode).
    """
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def derived_uid(*parts: object) -> str:
    """A deterministic DICOM UID: ``2.25.<128-bit integer>`` hashed from ``parts``.

    The ``2.25`` root takes a 128-bit integer (as UUIDs are written), so no registered
    organisation root is needed; the same parts always give the same UID.
    """
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters), without '-0' or trailing zeros."""
    text = f"{float(value) + 0.0:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{float(value):.9g}"


def series_tags(image: sitk.Image, *, uid_key: str) -> dict[str, str]:
    """Tags shared by every slice of ``image``'s series (geometry, UIDs, fixed dates)."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    orientation = [*direction[:, 0], *direction[:, 1]]  # row (i) then column (j) cosines, LPS
    tags = {
        "0008|0016": CT_IMAGE_STORAGE,
        "0008|0060": "CT",
        "0018|0050": _ds(image.GetSpacing()[2]),  # slice thickness (contiguous slices)
        "0018|0088": _ds(image.GetSpacing()[2]),  # spacing between slices
        "0020|000d": derived_uid(uid_key, "study"),
        "0020|000e": derived_uid(uid_key, "series"),
        "0020|0052": derived_uid(uid_key, "frame-of-reference"),
        "0020|0011": "1",
        "0020|0037": "\\".join(_ds(v) for v in orientation),
        "0028|1052": str(RESCALE_INTERCEPT),
        "0028|1053": str(RESCALE_SLOPE),
    }
    tags.update({tag: FIXED_DATE for tag in _DATE_TAGS})
    tags.update({tag: FIXED_TIME for tag in _TIME_TAGS})
    return tags


def write_dicom_series(image: sitk.Image, folder: str | os.PathLike[str], *, uid_key: str,
                       tags: dict[str, str] | None = None) -> list[Path]:
    """Write ``image`` as one DICOM file per slice along its third index axis.

    The series is written into a hidden staging folder (each file through
    ``atomic_path``) and then swapped in for ``folder`` whole, so a reader never sees a
    partial series, even if the writer is killed.

    Args:
        image: 3-D int16 image of HU values, any direction (slices along index axis k).
        folder: the series folder; replaced if it exists.
        uid_key: what the study/series/instance UIDs derive from (e.g. seed, site, case).
        tags: extra ``"gggg|eeee" -> value`` tags (patient, description, kernel, ...);
            they override the defaults.

    Returns:
        The slice files, in slice order.
    """
    if image.GetDimension() != 3 or image.GetPixelID() != sitk.sitkInt16:
        raise ValueError(f"expected a 3-D int16 image, got {image.GetDimension()}-D {image.GetPixelIDTypeAsString()}")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    common = {**series_tags(image, uid_key=uid_key), **(tags or {})}
    array = sitk.GetArrayViewFromImage(image)  # (D, H, W): slice k is array[k]
    normal = np.cross(*np.asarray(image.GetDirection()).reshape(3, 3).T[:2])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # else GDCM invents random UIDs
    staging = _fresh_dir(folder, "tmp")
    names = [f"slice_{k:04d}.dcm" for k in range(array.shape[0])]
    try:
        with preserved_locale():
            for k, name in enumerate(names):
                # A one-slice 3-D image with the volume's full spacing and direction: a 2-D
                # slice would make ITK derive SpacingBetweenSlices from a default (and GDCM
                # keeps state between writes, so the bytes would depend on earlier writes).
                position = image.TransformIndexToPhysicalPoint((0, 0, k))
                slice_image = sitk.GetImageFromArray(np.ascontiguousarray(array[k:k + 1]))
                slice_image.SetSpacing(image.GetSpacing())
                slice_image.SetDirection(image.GetDirection())
                slice_image.SetOrigin(position)
                for tag, value in common.items():
                    slice_image.SetMetaData(tag, value)
                slice_image.SetMetaData("0008|0018", derived_uid(uid_key, "instance", k))
                slice_image.SetMetaData("0020|0013", str(k + 1))
                slice_image.SetMetaData("0020|0032", "\\".join(_ds(v) for v in position))
                slice_image.SetMetaData("0020|1041", _ds(float(np.dot(normal, position))))
                with atomic_path(staging / name) as tmp:
                    writer.SetFileName(str(tmp))
                    writer.Execute(slice_image)
        _swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [folder / name for name in names]


def _fresh_dir(folder: Path, kind: str) -> Path:
    """A new hidden sibling of ``folder`` (plain ``mkdir``, so the umask sets its mode)."""
    path = folder.with_name(f".{folder.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}")
    path.mkdir()
    return path


def _swap_in(staging: Path, folder: Path) -> None:
    """Replace ``folder`` by ``staging`` (two renames; the old one is deleted afterwards)."""
    if not folder.exists():
        os.replace(staging, folder)
        return
    trash = _fresh_dir(folder, "old")
    try:
        os.replace(folder, trash / folder.name)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(trash, ignore_errors=True)
