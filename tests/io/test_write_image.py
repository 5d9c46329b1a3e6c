"""write_image's .nii.gz path (ITK writes the NIfTI, zlib-ng gzips it): same image, same bytes."""

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from meduet.io.images import read_image, write_image


@pytest.fixture
def image() -> sitk.Image:
    return _ct_like((20, 24, 28))


def _ct_like(shape: tuple[int, int, int]) -> sitk.Image:
    rng = np.random.default_rng(0)
    # smooth structure plus noise on integer HU steps, like a windowed CT: compressible, not trivially
    z, y, x = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    hu = np.round(400 * (np.sin(6 * x) * np.cos(4 * y) + z) + 20 * rng.standard_normal(x.shape))
    volume = (hu / 1000).astype(np.float32)
    img = sitk.GetImageFromArray(volume)
    img.SetSpacing((0.8, 1.25, 2.5))
    img.SetOrigin((-10.0, 4.5, 30.0))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # not the identity: a rotated scan
    return img


def test_nifti_gz_round_trips_through_itk_and_nibabel(image: sitk.Image, tmp_path) -> None:
    path = write_image(image, tmp_path / "case.nii.gz")
    back = read_image(path)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    assert back.GetSpacing() == pytest.approx(image.GetSpacing())
    assert back.GetOrigin() == pytest.approx(image.GetOrigin())
    assert back.GetDirection() == pytest.approx(image.GetDirection())
    # another reader, through Python's own gzip: the same voxels (nibabel's array is x, y, z)
    assert np.array_equal(np.asarray(nib.load(path).dataobj).T, sitk.GetArrayViewFromImage(image))
    # the same header as ITK's own .nii writer, so nothing but the compression changed
    write_image(image, tmp_path / "plain.nii", compression_level=0)
    assert gzip.decompress(path.read_bytes()) == (tmp_path / "plain.nii").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz", "plain.nii"]  # no temporary left


def test_nifti_gz_bytes_carry_no_name_or_time(image: sitk.Image, tmp_path) -> None:
    first = write_image(image, tmp_path / "a" / "case.nii.gz").read_bytes()
    second = write_image(image, tmp_path / "b" / "other.nii.gz").read_bytes()
    assert first == second  # DVC hashes and byte-for-byte checks depend on it
    flags, mtime = struct.unpack("<BI", first[3:8])
    assert flags & 0x08 == 0 and mtime == 0  # no FNAME field, no timestamp
    assert len(first) < 0.7 * 20 * 24 * 28 * 4  # it is compressed


_WRITE_IN_A_NEW_PROCESS = """
import sys
from meduet.io.images import write_image
from tests.io.test_write_image import _ct_like
write_image(_ct_like((96, 128, 128)), sys.argv[1])
"""


def test_a_volume_larger_than_one_chunk_gets_the_same_bytes_in_another_process(tmp_path) -> None:
    # ~6 MB of voxels: the compressor is fed more than one chunk, in another interpreter
    image = _ct_like((96, 128, 128))
    here = write_image(image, tmp_path / "here.nii.gz")
    subprocess.run([sys.executable, "-c", _WRITE_IN_A_NEW_PROCESS, str(tmp_path / "there.nii.gz")],
                   cwd=Path(__file__).parents[2], check=True)
    assert (tmp_path / "there.nii.gz").read_bytes() == here.read_bytes()


def test_compression_levels_are_zlibs_and_zero_stays_readable(image: sitk.Image, tmp_path) -> None:
    paths = {level: write_image(image, tmp_path / f"l{level}.nii.gz", level) for level in (0, 1, 5, 9)}
    sizes = {level: path.stat().st_size for level, path in paths.items()}
    assert max(sizes[5], sizes[9]) < sizes[1]  # (0 leaves .nii.gz to ITK, which gzips it anyway)
    for path in paths.values():
        assert np.array_equal(sitk.GetArrayViewFromImage(read_image(path)), sitk.GetArrayViewFromImage(image))
