"""Scanner sites ("style"): how one site turns a phantom into a stored CT volume.

The content (``meduet.data.phantom``) is the same for every site; a site only decides how
it is seen. ``acquire`` works on the site's *canonical* grid: voxel centres on ascending
RAS axes, arrays (D, H, W) = (z, y, x), centred on world (0, 0, 0) with the site's spacing
and field of view. ``to_storage`` then reorders those very voxels into the site's storage
orientation (a permutation and flips of array axes with the matching direction matrix),
so orientation never resamples anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from meduet.config import SiteStyle
from meduet.data.phantom import Body, Subject, render

# Storage orientation of each ``SiteStyle.orientation``, as DICOM-style letters: where
# ITK index axes i, j, k point (the convention of ``sitk.DICOMOrient``). ``permuted``
# stores sagittal slices: i toward Posterior, j toward Inferior, k toward Right.
ORIENTATION_CODES: dict[str, str] = {"RAS": "RAS", "LPS": "LPS", "permuted": "PIR"}
_LETTERS: dict[str, tuple[int, int]] = {  # letter -> (RAS axis, sign)
    "R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1),
}

SUB_SLICE_MM = 1.25  # content sampling step across the slice thickness
# In-plane Gaussian sigma (mm) of each reconstruction kernel. "standard" is the scanner's
# point spread, "smooth" a soft-tissue kernel; "sharp" (bone kernel) enhances edges.
KERNEL_SIGMA_MM: dict[str, float] = {"smooth": 1.2, "standard": 0.6}
SHARP_SIGMA_MM, SHARP_AMOUNT = 1.2, 1.0
QUANTISED_RANGE = (-32768, 32767)  # int16


@dataclass(frozen=True)
class SiteGrid:
    """Voxel centres of one site's scan on ascending RAS axes (mm).

    Attributes:
        x: (W,) RAS x of the voxel centres.
        y: (H,) RAS y.
        z: (D,) RAS z.
        spacing: (x, y, z) voxel spacing; z is also the slice thickness (contiguous slices).
    """

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    spacing: tuple[float, float, float]

    @classmethod
    def create(cls, *, spacing: tuple[float, float, float], fov_mm: tuple[float, float],
               length_mm: float) -> SiteGrid:
        """The grid covering ``fov_mm`` (x, y) in-plane and ``length_mm`` along z, centred on 0."""
        sizes = (round(fov_mm[0] / spacing[0]), round(fov_mm[1] / spacing[1]), round(length_mm / spacing[2]))
        x, y, z = ((np.arange(max(n, 1)) - (max(n, 1) - 1) / 2) * step for n, step in zip(sizes, spacing))
        return cls(x=x, y=y, z=z, spacing=tuple(float(s) for s in spacing))  # type: ignore[arg-type]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(D, H, W)."""
        return len(self.z), len(self.y), len(self.x)

    @property
    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.x, self.y, self.z


# --------------------------------------------------------------------------- acquisition
def acquire(subject: Subject, style: SiteStyle, grid: SiteGrid,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Image and label map of ``subject`` as seen by the site ``style``, canonical order.

    1. Slice sensitivity: the content is averaged over sub-slices spanning the slice
       thickness (a box profile) - the blur along z of a thick slice.
    2. Beam hardening: attenuation drops toward the body centre (cupping).
    3. Reconstruction kernel: Gaussian point spread (smooth, standard) or edge
       enhancement (sharp), in-plane.
    4. Noise: white Gaussian noise correlated in-plane over ``noise_corr_mm``.
    5. Calibration: ``gain * curve(HU) + offset``, ``curve`` a power law on attenuation.
    6. Reconstruction circle: ``pad_value`` outside it (labels 0 there: no data).
    7. Quantisation to int16.

    Args:
        subject: the phantom (content).
        style: the site (appearance).
        grid: the site's canonical grid.
        rng: the site's noise stream for this subject.

    Returns:
        ``image`` (D, H, W) int16 and ``labels`` (D, H, W) uint8, canonical RAS order.
    """
    labels, hu = sample_content(subject, grid)
    hu = apply_cupping(hu, grid=grid, body=subject.body, depth=style.bias)
    hu = apply_kernel(hu, spacing=grid.spacing, kernel=style.kernel)
    hu += correlated_noise(hu.shape, spacing=grid.spacing, std=style.noise_std, corr_mm=style.noise_corr_mm, rng=rng)
    hu = calibrate(hu, offset=style.hu_offset, gain=style.hu_gain, gamma=style.hu_gamma)
    inside = reconstruction_circle(grid, diameter_mm=min(style.fov_mm))[None]  # (1, H, W)
    labels = np.where(inside, labels, 0).astype(np.uint8)
    image = np.where(inside, np.rint(hu), np.float32(style.pad_value))
    image = np.clip(image, *QUANTISED_RANGE).astype(np.int16)
    return image, labels


def sub_slice_offsets(thickness_mm: float, step_mm: float = SUB_SLICE_MM) -> np.ndarray:
    """Offsets (mm) of the sub-slices sampling one slice, an odd count so the middle one
    is the slice centre (where the label map is taken). Shape (n,)."""
    n = 2 * int(thickness_mm // (2 * step_mm)) + 1
    return (np.arange(n) - (n - 1) / 2) * (thickness_mm / n)


def sample_content(subject: Subject, grid: SiteGrid,
                   slab_voxels: int = 1_500_000) -> tuple[np.ndarray, np.ndarray]:
    """Labels at the voxel centres and HU averaged over each slice's thickness.

    Rendered in slabs of whole slices (about ``slab_voxels`` sub-voxels each) to bound
    memory and keep the element-wise work cache-friendly.

    Returns:
        ``labels`` (D, H, W) uint8 and ``hu`` (D, H, W) float32.
    """
    offsets = sub_slice_offsets(grid.spacing[2])
    n = len(offsets)
    depth, height, width = grid.shape
    z_sub = (grid.z[:, None] + offsets[None, :]).ravel()  # (D * n,) ascending
    labels = np.empty(grid.shape, dtype=np.uint8)
    hu = np.empty(grid.shape, dtype=np.float32)
    step = max(1, slab_voxels // (n * height * width))
    for start in range(0, depth, step):
        stop = min(start + step, depth)
        lab, val = render(subject, grid.x, grid.y, z_sub[start * n:stop * n])
        labels[start:stop] = lab[n // 2::n]  # the middle sub-slice is the voxel centre
        hu[start:stop] = val.reshape(stop - start, n, height, width).mean(axis=1)  # (slices, n, H, W) -> box SSP
    return labels, hu


def apply_cupping(hu: np.ndarray, *, grid: SiteGrid, body: Body, depth: float) -> np.ndarray:
    """Beam-hardening cupping: attenuation (HU + 1000) scaled by ``1 - depth * (1 - rho^2)``,
    ``rho`` the normalised radius in the body outline (0 at its centre, 1 at the skin).

    Args:
        hu: (D, H, W) float32 on ``grid``; modified in place.
        depth: fractional attenuation loss at the body centre.

    Returns:
        ``hu``.
    """
    if depth == 0:
        return hu
    # (D, 1, W) + (D, H, 1) tables: one full-size addition, then in-place arithmetic
    # (fresh full-size temporaries cost more than the arithmetic itself).
    loss = body.ellipse_metric(grid.x[None, None, :].astype(np.float32), grid.y[None, :, None].astype(np.float32),
                               grid.z[:, None, None])
    np.subtract(1, loss, out=loss)
    np.maximum(loss, 0, out=loss)
    loss *= np.float32(depth)
    attenuation = hu + np.float32(1000)
    attenuation *= loss
    hu -= attenuation
    return hu


def apply_kernel(hu: np.ndarray, *, spacing: tuple[float, float, float], kernel: str) -> np.ndarray:
    """Reconstruction kernel, in-plane. Sharp = unsharp masking (overshoot at edges).

    Args:
        hu: (D, H, W) float32.
        spacing: (x, y, z) mm.
        kernel: ``smooth``, ``standard`` or ``sharp``.
    """
    if kernel == "sharp":
        return hu + np.float32(SHARP_AMOUNT) * (hu - blur_in_plane(hu, spacing=spacing, sigma_mm=SHARP_SIGMA_MM))
    return blur_in_plane(hu, spacing=spacing, sigma_mm=KERNEL_SIGMA_MM[kernel])


def correlated_noise(shape: tuple[int, int, int], *, spacing: tuple[float, float, float], std: float,
                     corr_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of standard deviation ``std`` with in-plane correlation ``corr_mm``.

    Returns:
        (D, H, W) float32.
    """
    if std == 0:
        return np.zeros(shape, dtype=np.float32)
    noise = rng.standard_normal(shape, dtype=np.float32)
    if corr_mm > 0:
        noise = blur_in_plane(noise, spacing=spacing, sigma_mm=corr_mm)
    # Blurring lowers the variance; rescale so the site's noise_std is what is measured
    # (estimated on a few slices: the noise is stationary).
    sample = noise[:: max(1, shape[0] // 8)]
    noise *= np.float32(std / max(float(sample.std()), 1e-12))
    return noise


def calibrate(hu: np.ndarray, *, offset: float, gain: float, gamma: float) -> np.ndarray:
    """Site calibration: ``gain * (1000 * (mu / mu_water)^gamma - 1000) + offset``.

    The power law acts on attenuation relative to water (``(HU + 1000) / 1000``), so
    water and air stay fixed under ``gamma`` while bone and lung drift, as with a
    miscalibrated beam-hardening correction.

    Args:
        hu: (D, H, W) float32; modified in place.

    Returns:
        ``hu``.
    """
    if gamma != 1:
        hu += np.float32(1000)
        hu *= np.float32(1 / 1000)
        # Odd extension below zero: noise in air stays symmetric around -1000 HU.
        curved = np.power(np.abs(hu), np.float32(gamma))
        np.copysign(curved, hu, out=hu)
        hu *= np.float32(1000)
        hu -= np.float32(1000)
    hu *= np.float32(gain)
    hu += np.float32(offset)
    return hu


def reconstruction_circle(grid: SiteGrid, *, diameter_mm: float) -> np.ndarray:
    """In-plane mask (H, W) of the reconstructed circle, centred on the isocentre."""
    r2 = grid.x[None, :] ** 2 + grid.y[:, None] ** 2
    return r2 <= (diameter_mm / 2) ** 2


def blur_in_plane(volume: np.ndarray, *, spacing: tuple[float, float, float], sigma_mm: float) -> np.ndarray:
    """Gaussian blur along x and y only (each slice on its own), SimpleITK's C++ filter.

    Args:
        volume: (D, H, W) float32.
        spacing: (x, y, z) mm.
        sigma_mm: standard deviation in mm.

    Returns:
        (D, H, W) float32.
    """
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(spacing)
    variance = (sigma_mm ** 2, sigma_mm ** 2, 0.0)
    return sitk.GetArrayFromImage(sitk.DiscreteGaussian(image, variance=variance, useImageSpacing=True))


# --------------------------------------------------------------------------- storage
def to_storage(volume: np.ndarray, grid: SiteGrid, orientation: str) -> sitk.Image:
    """The canonical volume as an image stored in ``orientation``.

    Args:
        volume: (D, H, W) canonical RAS-ordered array on ``grid``.
        grid: its grid.
        orientation: a ``SiteStyle.orientation`` or a 3-letter code (``ORIENTATION_CODES``).

    Returns:
        The same voxels, array axes permuted and flipped, with spacing, origin and
        direction (ITK LPS) such that every voxel keeps its world position.
    """
    code = ORIENTATION_CODES.get(orientation, orientation)
    axes = [_LETTERS[letter] for letter in code]  # ITK axes i, j, k -> (RAS axis, sign)
    if sorted(a for a, _ in axes) != [0, 1, 2]:
        raise ValueError(f"orientation {code!r} must name each of R/L, A/P, S/I once")
    # Numpy axis m holds ITK axis 2 - m; the canonical array holds RAS axis r on numpy axis 2 - r.
    array = np.transpose(volume, [2 - axes[2 - m][0] for m in range(3)])
    array = np.flip(array, axis=[m for m in range(3) if axes[2 - m][1] < 0])
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([grid.spacing[ras] for ras, _ in axes])
    # First stored voxel: the low end of each RAS axis stored ascending, else the high end.
    first = [0.0, 0.0, 0.0]
    direction = np.zeros((3, 3))
    for itk_axis, (ras, sign) in enumerate(axes):
        coords = grid.axes[ras]
        first[ras] = float(coords[0] if sign > 0 else coords[-1])
        direction[ras, itk_axis] = sign
    ras_to_lps = np.array([-1.0, -1.0, 1.0])
    image.SetOrigin(tuple(float(v) for v in ras_to_lps * np.asarray(first)))
    image.SetDirection(tuple(float(v) for v in (ras_to_lps[:, None] * direction).ravel()))
    return image
