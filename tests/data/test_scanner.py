"""Site styles: storage orientation, slice profile, noise, kernels, calibration, FOV."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from meduet.config import SiteStyle
from meduet.data.phantom import Label, sample_subject
from meduet.data.scanner import (
    SiteGrid,
    acquire,
    apply_cupping,
    apply_kernel,
    calibrate,
    correlated_noise,
    sub_slice_offsets,
    to_storage,
)

GRID = SiteGrid.create(spacing=(2.0, 3.0, 4.0), fov_mm=(14.0, 12.0), length_mm=20.0)  # (D, H, W) = (5, 4, 7)


def test_grid_is_centred_on_the_isocentre() -> None:
    assert GRID.shape == (5, 4, 7)
    for axis, step in zip(GRID.axes, GRID.spacing):
        np.testing.assert_allclose(axis, axis[::-1] * -1)
        np.testing.assert_allclose(np.diff(axis), step)


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "permuted", "ILA"])
def test_storage_keeps_every_voxel_in_its_world_place(orientation: str) -> None:
    canonical = np.arange(np.prod(GRID.shape), dtype=np.int16).reshape(GRID.shape)
    image = to_storage(canonical, GRID, orientation)
    # Back to RAS order without resampling: exactly the canonical array and grid.
    ras = sitk.DICOMOrient(image, "RAS")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ras), canonical)
    np.testing.assert_allclose(ras.GetSpacing(), GRID.spacing)
    np.testing.assert_allclose(ras.GetOrigin(), (-GRID.x[0], -GRID.y[0], GRID.z[0]))  # ITK points are LPS
    np.testing.assert_allclose(ras.GetDirection(), (-1, 0, 0, 0, -1, 0, 0, 0, 1), atol=1e-12)
    # And in the stored order, a voxel's physical point is its RAS centre mirrored to LPS.
    flat = int(np.argmax(sitk.GetArrayViewFromImage(image) == canonical[3, 2, 5]))
    index = np.unravel_index(flat, sitk.GetArrayViewFromImage(image).shape)[::-1]  # (i, j, k)
    point = image.TransformIndexToPhysicalPoint(tuple(int(i) for i in index))
    np.testing.assert_allclose(point, (-GRID.x[5], -GRID.y[2], GRID.z[3]), atol=1e-9)


def test_permuted_storage_is_sagittal() -> None:
    image = to_storage(np.zeros(GRID.shape, np.uint8), GRID, "permuted")
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()) == "PIR"
    assert image.GetSize() == (len(GRID.y), len(GRID.z), len(GRID.x))


@pytest.mark.parametrize(("thickness", "count"), [(0.8, 1), (2.5, 3), (3.0, 3), (5.0, 5)])
def test_sub_slices_span_the_thickness_symmetrically(thickness: float, count: int) -> None:
    offsets = sub_slice_offsets(thickness)
    assert len(offsets) == count and offsets[count // 2] == 0
    np.testing.assert_allclose(offsets, -offsets[::-1])
    assert offsets.max() < thickness / 2


def test_noise_has_the_site_std_and_correlation() -> None:
    shape, spacing = (4, 64, 64), (1.0, 1.0, 2.0)
    white = correlated_noise(shape, spacing=spacing, std=20.0, corr_mm=0.0, rng=np.random.default_rng(0))
    textured = correlated_noise(shape, spacing=spacing, std=20.0, corr_mm=2.0, rng=np.random.default_rng(0))

    def neighbour_correlation(noise: np.ndarray) -> float:
        return float(np.corrcoef(noise[:, :, :-1].ravel(), noise[:, :, 1:].ravel())[0, 1])

    assert white.std() == pytest.approx(20.0, rel=0.05) and textured.std() == pytest.approx(20.0, rel=0.05)
    assert abs(neighbour_correlation(white)) < 0.05 < 0.6 < neighbour_correlation(textured)
    assert not np.any(correlated_noise(shape, spacing=spacing, std=0.0, corr_mm=1.0, rng=np.random.default_rng(0)))


def test_kernels_blur_or_enhance_an_edge() -> None:
    step = np.zeros((1, 8, 32), np.float32)
    step[..., 16:] = 100.0
    spacing = (1.0, 1.0, 1.0)
    smooth = apply_kernel(step, spacing=spacing, kernel="smooth")
    sharp = apply_kernel(step, spacing=spacing, kernel="sharp")
    assert 0 < smooth[0, 4, 15] < smooth[0, 4, 16] < 100  # a ramp
    assert sharp[0, 4, 16] > 100 and sharp[0, 4, 15] < 0  # overshoot both sides
    np.testing.assert_allclose(sharp[0, 4, [0, 31]], [0, 100], atol=1e-3)  # flat far away


def test_calibration_keeps_air_and_water_under_gamma() -> None:
    hu = np.array([-1000.0, 0.0, 1000.0, -1010.0, -990.0], np.float32)
    curved = calibrate(hu.copy(), offset=0.0, gain=1.0, gamma=1.1)
    np.testing.assert_allclose(curved[:2], [-1000, 0], atol=1e-3)
    assert curved[2] > 1000
    np.testing.assert_allclose(curved[3] + curved[4], -2000, atol=1e-3)  # air noise stays symmetric
    np.testing.assert_allclose(calibrate(hu[:3].copy(), offset=10.0, gain=2.0, gamma=1.0), [-1990, 10, 2010])


def test_cupping_darkens_the_body_centre_only() -> None:
    body = sample_subject(seed=0, index=0, chest_fraction=0, lesion_probability=0, body_length_mm=20).body
    grid = SiteGrid.create(spacing=(10.0, 10.0, 10.0), fov_mm=(400, 400), length_mm=20)
    hu = np.zeros(grid.shape, np.float32)
    cupped = apply_cupping(hu.copy(), grid=grid, body=body, depth=0.1)
    centre = cupped[0, np.argmin(np.abs(grid.y - body.centre_y)), len(grid.x) // 2]
    assert centre == pytest.approx(-100, abs=3)  # 10 % of water's attenuation
    assert cupped[0, 0, 0] == 0  # outside the body


def test_acquire_pads_outside_the_reconstruction_circle() -> None:
    style = SiteStyle(name="s", spacing=(6.0, 6.0, 10.0), fov_mm=(300, 300), noise_std=10, pad_value=-3024)
    grid = SiteGrid.create(spacing=style.spacing, fov_mm=style.fov_mm, length_mm=40)
    subject = sample_subject(seed=0, index=0, chest_fraction=0, lesion_probability=0, body_length_mm=40)
    image, labels = acquire(subject, style, grid, np.random.default_rng(0))
    assert image.dtype == np.int16 and labels.dtype == np.uint8 and image.shape == labels.shape == grid.shape
    assert np.all(image[:, 0, 0] == -3024) and np.all(labels[:, 0, 0] == 0)
    # Inside the circle, air stays near -1000 and the liver near its true HU.
    circle_air = (labels == Label.BACKGROUND) & (image != -3024)
    assert abs(float(np.median(image[circle_air])) + 1000) < 5
    assert abs(float(np.median(image[labels == Label.LIVER])) - 105) < 15
