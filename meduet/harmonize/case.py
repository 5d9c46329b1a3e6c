"""Harmonizing one case: checks, RAS resampling, intensity window, foreground crop, padding.

``harmonize_volume`` is the in-memory algorithm; ``harmonize_case`` adds reading, writing
and the manifest record, and turns every input problem into a quarantined record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from meduet.harmonize.datasets import CaseSpec
from meduet.harmonize.geometry import (
    RAS_DIRECTION,
    Grid,
    foreground_box,
    index_box_to_grid,
    padded_box,
    ras_grid,
    resample,
)
from meduet.harmonize.intensity import Normalizer, Window
from meduet.harmonize.manifest import CaseRecord
from meduet.io.images import ImageReadError, read_image, sha256_path, write_image

_INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}
# Native voxels an interpolated value can reach back to: the foreground search on the
# native grid is widened by this much so cropping first never loses a foreground voxel.
_SUPPORT = {"linear": 1, "bspline": 3}


class CaseProblem(Exception):
    """A case that cannot be harmonized; the message names the file and the problem."""


@dataclass(frozen=True)
class CaseSettings:
    """Plain values the per-case work needs (built once from ``HarmonizeConfig``).

    ``spacing`` and ``min_size`` are (x, y, z).
    """

    spacing: tuple[float, float, float]
    interpolation: str
    normalizer: Normalizer
    crop_foreground: bool
    foreground_threshold: float
    margin: int
    min_size: tuple[int, int, int]
    divisible_by: int
    compression_level: int
    settings_hash: str


@dataclass
class HarmonizedVolume:
    image: np.ndarray  # (D, H, W) float32, RAS array order (z, y, x)
    label: np.ndarray | None  # (D, H, W) uint8/uint16
    grid: Grid
    window: Window
    foreground_stats: dict[str, float]


# --------------------------------------------------------------------------- checks
def check_image(image: sitk.Image, path: Path | str) -> None:
    """Raise :class:`CaseProblem` for images that are not a usable 3-D scalar volume."""
    dim = image.GetDimension()
    if dim != 3:
        raise CaseProblem(f"{path}: {dim}D image of size {image.GetSize()}; expected a 3D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseProblem(f"{path}: {image.GetNumberOfComponentsPerPixel()}-component pixels; expected scalar")
    if min(image.GetSize()) < 2:
        raise CaseProblem(f"{path}: size {image.GetSize()} is a single slice (effectively 2D)")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if not np.allclose(direction @ direction.T, np.eye(3), atol=1e-3):
        raise CaseProblem(f"{path}: direction matrix is not orthonormal: {direction.round(4).tolist()}")
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        values = sitk.GetArrayViewFromImage(image)
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            raise CaseProblem(f"{path}: {bad} non-finite (NaN/inf) voxels")


def check_label(label: sitk.Image, image: sitk.Image, path: Path | str) -> None:
    """Raise :class:`CaseProblem` unless ``label`` is an integer map on ``image``'s grid."""
    check_image(label, path)
    problems = []
    if label.GetSize() != image.GetSize():
        problems.append(f"size {label.GetSize()} vs image {image.GetSize()}")
    spacing = np.array(image.GetSpacing())
    if not np.allclose(label.GetSpacing(), spacing, rtol=1e-4):
        problems.append(f"spacing {tuple(round(s, 4) for s in label.GetSpacing())} vs image {tuple(spacing.round(4))}")
    if not np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-2 * spacing.min()):
        problems.append(f"origin {tuple(round(o, 3) for o in label.GetOrigin())} vs image "
                        f"{tuple(round(o, 3) for o in image.GetOrigin())}")
    if not np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-4):
        problems.append("direction differs from the image's")
    if problems:
        raise CaseProblem(f"{path}: label geometry does not match its image: " + "; ".join(problems))
    values = sitk.GetArrayViewFromImage(label)
    if values.min() < 0:
        raise CaseProblem(f"{path}: negative label values")
    if label.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64) and not np.array_equal(values, np.round(values)):
        raise CaseProblem(f"{path}: label holds non-integer values")


# --------------------------------------------------------------------------- algorithm
def _crop_grid(image: sitk.Image, native: np.ndarray, full: Grid, raw_threshold: float,
               settings: CaseSettings) -> Grid | None:
    """The part of ``full`` worth resampling: the native foreground, widened; None if empty."""
    box = foreground_box(native > raw_threshold)
    if box is None:
        return None
    support = _SUPPORT[settings.interpolation]
    size = np.array(image.GetSize())
    lo = np.maximum(box[0] - support, 0)
    hi = np.minimum(box[1] - 1 + support, size - 1)
    glo, ghi = index_box_to_grid(image, lo, hi, full)
    glo = np.maximum(glo - settings.margin, 0)
    ghi = np.minimum(ghi + settings.margin, full.size)
    return full.sub(glo, ghi)


def _foreground_stats(native: np.ndarray, raw_threshold: float, max_samples: int = 200_000) -> dict[str, float]:
    flat = native.reshape(-1)
    sample = flat[:: max(1, flat.size // (4 * max_samples))]
    sample = sample[sample > raw_threshold].astype(np.float64)
    if sample.size == 0:
        return {}
    p01, p50, p99 = np.percentile(sample, [1, 50, 99])
    return {"intensity_mean": float(sample.mean()), "intensity_std": float(sample.std()),
            "intensity_p01": float(p01), "intensity_p50": float(p50), "intensity_p99": float(p99)}


def harmonize_volume(image: sitk.Image, label: sitk.Image | None, settings: CaseSettings,
                     name: str = "<image>") -> HarmonizedVolume:
    """Resample to the RAS target grid, window, crop to foreground and pad.

    Cropping is done before resampling where possible (only the foreground's neighbourhood
    is interpolated), then refined on the resampled volume, which gives exactly the result
    of resample → window → crop, at a fraction of the cost.

    Args:
        image: 3-D scalar volume with its true geometry.
        label: integer map on ``image``'s grid, or None.
        settings: target spacing, interpolation, normaliser, crop and pad rules.
        name: used in error messages.

    Returns:
        ``HarmonizedVolume`` with image ``(D, H, W)`` float32 in ``[b_min, b_max]`` (if
        clipping), label ``(D, H, W)`` and the output grid.
    """
    native = sitk.GetArrayViewFromImage(image)  # (D, H, W), no copy
    window = settings.normalizer.window(native)
    raw_threshold = window.raw_level(settings.foreground_threshold)
    full = ras_grid(image, settings.spacing)
    grid = full
    if settings.crop_foreground:
        grid = _crop_grid(image, native, full, raw_threshold, settings)
        if grid is None:
            raise CaseProblem(f"{name}: no foreground (no voxel above {raw_threshold:g})")
    fill = float(native.min())
    resampled = resample(image, grid, _INTERPOLATORS[settings.interpolation], fill, sitk.sitkFloat32)
    values = window.apply_(sitk.GetArrayFromImage(resampled))  # (D, H, W) float32
    lab = None
    if label is not None:
        pixel = sitk.sitkUInt8 if sitk.GetArrayViewFromImage(label).max() <= 255 else sitk.sitkUInt16
        lab = sitk.GetArrayFromImage(resample(label, grid, sitk.sitkNearestNeighbor, 0, pixel))

    lo, hi = np.zeros(3, int), grid.size.copy()
    if settings.crop_foreground:
        box = foreground_box(window.scaled_above(values, settings.foreground_threshold))
        if box is None:
            raise CaseProblem(f"{name}: no foreground after resampling")
        lo = np.maximum(box[0] - settings.margin, 0)
        hi = np.minimum(box[1] + settings.margin, grid.size)
    plo, phi = padded_box(lo, hi, settings.min_size, settings.divisible_by)
    values = _crop_pad(values, lo, hi, plo, phi, window.b_min)
    if lab is not None:
        lab = _crop_pad(lab, lo, hi, plo, phi, 0)
    return HarmonizedVolume(values, lab, grid.sub(plo, phi), window, _foreground_stats(native, raw_threshold))


def _crop_pad(array: np.ndarray, lo: np.ndarray, hi: np.ndarray, plo: np.ndarray, phi: np.ndarray,
              fill: float) -> np.ndarray:
    """Crop ``(z, y, x)`` array to box ``[lo, hi)`` then pad to ``[plo, phi)`` (boxes in x, y, z)."""
    cropped = array[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    before, after = (lo - plo)[::-1], (phi - hi)[::-1]
    if not before.any() and not after.any():
        return np.ascontiguousarray(cropped)
    return np.pad(cropped, list(zip(before, after)), mode="constant", constant_values=fill)


def to_image(array: np.ndarray, grid: Grid) -> sitk.Image:
    """A ``(D, H, W)`` array on ``grid`` as a SimpleITK image with its true geometry."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in grid.spacing))
    image.SetOrigin(grid.world_origin)
    image.SetDirection(tuple(RAS_DIRECTION.flatten()))
    return image


# --------------------------------------------------------------------------- one case, files in and out
def _base_record(spec: CaseSpec, settings: CaseSettings) -> CaseRecord:
    return CaseRecord(key=spec.key, dataset=spec.dataset, case_id=spec.case_id, domain=spec.domain,
                      body_part=spec.body_part, split=spec.split, status="quarantined",
                      source_image=str(spec.image or ""), source_label=str(spec.label or ""),
                      settings_hash=settings.settings_hash)


def present_values(label: np.ndarray) -> list[int]:
    """The label values present, ascending (a histogram for small non-negative integers, else ``np.unique``)."""
    if label.dtype.kind in "ui" and label.size and 0 <= int(label.min()) and int(label.max()) < 65536:
        return [int(v) for v in np.flatnonzero(np.bincount(label.ravel()))]
    return [int(v) for v in np.unique(label)]


def input_hash(spec: CaseSpec) -> str:
    parts = [sha256_path(p) for p in (spec.image, spec.label) if p is not None and Path(p).exists()]
    return "-".join(parts)


def harmonize_case(spec: CaseSpec, settings: CaseSettings, out_dir: Path, input_sha256: str = "") -> CaseRecord:
    """Harmonize one case into ``out_dir/<dataset>/{imagesTr,labelsTr}``; never raises for bad input."""
    start = time.perf_counter()
    record = _base_record(spec, settings)
    record.input_sha256 = input_sha256
    if spec.problem:
        record.reason = spec.problem
        return record
    try:
        image = read_image(spec.image)
        check_image(image, spec.image)
        label = None
        if spec.label is not None:
            label = read_image(spec.label)
            check_label(label, image, spec.label)
        volume = harmonize_volume(image, label, settings, name=str(spec.image))
    except (ImageReadError, CaseProblem) as problem:
        record.reason = str(problem)
        record.seconds = time.perf_counter() - start
        return record

    folder = "imagesTr" if spec.split == "train" else "imagesTs"
    image_rel = f"{spec.dataset}/{folder}/{spec.case_id}.nii.gz"
    write_image(to_image(volume.image, volume.grid), out_dir / image_rel, settings.compression_level)
    record.image, record.image_sha256 = image_rel, sha256_path(out_dir / image_rel)
    if volume.label is not None:
        label_rel = f"{spec.dataset}/labelsTr/{spec.case_id}.nii.gz"
        write_image(to_image(volume.label, volume.grid), out_dir / label_rel, settings.compression_level)
        record.label, record.label_sha256 = label_rel, sha256_path(out_dir / label_rel)
        record.labels_present = present_values(volume.label)

    record.status = "ok"
    record.orig_size = list(image.GetSize())
    record.orig_spacing = list(image.GetSpacing())
    record.orig_origin = list(image.GetOrigin())
    record.orig_direction = list(image.GetDirection())
    record.orig_orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    record.out_size = [int(n) for n in volume.grid.size]
    record.out_spacing = [float(s) for s in volume.grid.spacing]
    record.out_origin = list(volume.grid.world_origin)
    record.window = [volume.window.a_min, volume.window.a_max, volume.window.b_min, volume.window.b_max]
    for key, value in volume.foreground_stats.items():
        setattr(record, key, value)
    record.seconds = time.perf_counter() - start
    return record
