import numpy as np
import pytest
import SimpleITK as sitk

from meduet.harmonize.geometry import foreground_box, padded_box, ras_grid
from tests.harmonize.synth import phantom


@pytest.mark.parametrize("spacing", [(1.5, 1.5, 1.5), (2.0, 1.0, 3.0)])
def test_ras_grid_follows_monai_spacing_rule(spacing):
    image, _ = phantom(size_xyz=(31, 22, 9), spacing=(1.0, 1.2, 2.5))
    grid = ras_grid(image, spacing)
    extent = (np.array(image.GetSize()) - 1) * np.array(image.GetSpacing())
    np.testing.assert_array_equal(grid.size, np.round(extent / np.array(spacing)).astype(int) + 1)
    # The first voxel centre stays put for an image that is already RAS.
    np.testing.assert_allclose(grid.world_origin, image.GetOrigin())


def test_ras_grid_is_orientation_invariant():
    image, _ = phantom()
    grids = [ras_grid(sitk.DICOMOrient(image, code), (1.5, 1.5, 1.5)) for code in ("RAS", "LPS", "SLP", "AIR")]
    for grid in grids[1:]:
        np.testing.assert_array_equal(grid.size, grids[0].size)
        np.testing.assert_allclose(grid.origin_ras, grids[0].origin_ras, atol=1e-6)


def test_foreground_box_is_xyz_half_open():
    mask = np.zeros((5, 6, 7), bool)  # (z, y, x)
    mask[1:3, 2:5, 3:4] = True
    lo, hi = foreground_box(mask)
    assert lo.tolist() == [3, 2, 1] and hi.tolist() == [4, 5, 3]
    assert foreground_box(np.zeros((2, 2, 2), bool)) is None


@pytest.mark.parametrize("size,min_size,k,expected", [
    ((10, 70, 33), (16, 64, 1), 16, (16, 80, 48)),
    ((64, 64, 64), (64, 64, 64), 16, (64, 64, 64)),
    ((5, 5, 5), (1, 1, 1), 1, (5, 5, 5)),
])
def test_padded_box_reaches_min_size_and_multiple(size, min_size, k, expected):
    lo = np.array([3, 4, 5])
    plo, phi = padded_box(lo, lo + np.array(size), min_size, k)
    assert tuple(phi - plo) == expected
    assert np.all(plo <= lo) and np.all(phi >= lo + np.array(size))

    # the same placement as MONAI's SpatialPad then DivisiblePad
    from monai.transforms import DivisiblePad, SpatialPad

    marker = np.zeros((1, *size), np.float32)
    marker[0, 0, 0, 0] = 1
    padded = DivisiblePad(k)(SpatialPad(min_size)(marker))
    assert tuple(np.argwhere(np.asarray(padded)[0])[0]) == tuple(lo - plo)
