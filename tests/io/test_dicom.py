"""DICOM series writing: round trip through ImageSeriesReader, determinism, atomic replace."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from meduet.io.dicom import derived_uid, write_dicom_series


def volume(direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1), depth: int = 4) -> sitk.Image:
    """A small int16 HU volume with the full CT range (pad -3024 up to dense bone)."""
    values = np.random.default_rng(0).integers(-1100, 1500, size=(depth, 6, 5)).astype(np.int16)
    values[0, 0, 0], values[-1, -1, -1] = -3024, 3000
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-120.5, 33.25, -40.0))
    image.SetDirection(direction)
    return image


def read_series(folder: Path) -> tuple[sitk.Image, sitk.ImageSeriesReader]:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    reader.MetaDataDictionaryArrayUpdateOn()
    return reader.Execute(), reader


@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, 1, 0, 0, 0, 1),  # LPS, axial
    (-1, 0, 0, 0, -1, 0, 0, 0, 1),  # RAS, axial
    (0, 0, -1, 1, 0, 0, 0, -1, 0),  # sagittal slices (PIR)
])
def test_series_reads_back_with_values_and_geometry(tmp_path: Path, direction: tuple[float, ...]) -> None:
    image = volume(direction)
    files = write_dicom_series(image, tmp_path / "series", uid_key="case-1", tags={"0010|0020": "case-1"})
    assert [f.name for f in files] == sorted(p.name for p in (tmp_path / "series").iterdir())

    back, reader = read_series(tmp_path / "series")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(back.GetDirection(), direction, atol=1e-6)
    assert reader.GetMetaData(0, "0028|1052").strip() == "-1024" and reader.GetMetaData(0, "0028|1053").strip() == "1"
    assert reader.GetMetaData(0, "0028|0100").strip() == "16" and reader.GetMetaData(0, "0028|0103").strip() == "1"
    assert reader.GetMetaData(0, "0018|0050").strip() == "2.5"  # slice thickness
    assert reader.GetMetaData(0, "0010|0020").strip() == "case-1"  # a caller's tag


def test_series_is_byte_identical_and_uids_follow_the_key(tmp_path: Path) -> None:
    first = write_dicom_series(volume(), tmp_path / "a", uid_key="k")
    second = write_dicom_series(volume(), tmp_path / "b", uid_key="k")
    other = write_dicom_series(volume(), tmp_path / "c", uid_key="other")
    assert [f.read_bytes() for f in first] == [f.read_bytes() for f in second]

    def uids(folder: Path) -> tuple[str, str]:
        _, reader = read_series(folder)
        return reader.GetMetaData(0, "0020|000e").strip(), reader.GetMetaData(0, "0008|0018").strip()

    assert uids(tmp_path / "a") == uids(tmp_path / "b") and uids(tmp_path / "a") != uids(tmp_path / "c")
    assert len(other) == 4


def test_derived_uid_is_a_valid_dicom_uid() -> None:
    uid = derived_uid("seed", 3, "series")
    assert uid == derived_uid("seed", 3, "series") != derived_uid("seed", 4, "series")
    assert re.fullmatch(r"2\.25\.[1-9][0-9]*", uid) and len(uid) <= 64


def test_rewrite_replaces_the_whole_folder(tmp_path: Path) -> None:
    write_dicom_series(volume(depth=5), tmp_path / "series", uid_key="k")
    write_dicom_series(volume(depth=3), tmp_path / "series", uid_key="k")
    assert len(list((tmp_path / "series").iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]  # no staging or old folders left
    assert sitk.GetArrayFromImage(read_series(tmp_path / "series")[0]).shape[0] == 3


def test_rejects_anything_but_3d_int16(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int16"):
        write_dicom_series(sitk.Cast(volume(), sitk.sitkFloat32), tmp_path / "series", uid_key="k")
    assert not (tmp_path / "series").exists()


def test_dicom_io_leaves_the_process_locale_alone(tmp_path):
    """GDCM sets the C locale process-wide; left so, Python would decode subprocess output as ASCII."""
    import locale

    import numpy as np
    import SimpleITK as sitk

    from meduet.io.dicom import write_dicom_series
    from meduet.io.images import read_image

    before = locale.setlocale(locale.LC_ALL)
    write_dicom_series(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)), tmp_path / "s", uid_key="k")
    read_image(tmp_path / "s")
    assert locale.setlocale(locale.LC_ALL) == before
