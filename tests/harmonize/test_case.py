import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from meduet.config import HarmonizeConfig, IntensityConfig
from meduet.harmonize.case import CaseProblem, harmonize_case, harmonize_volume, present_values
from meduet.harmonize.datasets import CaseSpec
from meduet.stages.harmonize import case_settings
from tests.harmonize.synth import phantom


def settings(**overrides):
    cfg = HarmonizeConfig(target_spacing=(2.0, 2.0, 2.0), min_size=(8, 8, 8), divisible_by=8, foreground_margin=1)
    return case_settings(cfg.model_copy(update=overrides))


def test_crop_first_equals_resample_then_crop():
    """Cropping before resampling is an optimisation: results equal the naive order."""
    image, label = phantom()
    fast = harmonize_volume(image, label, settings())
    naive = harmonize_volume(image, label, settings(crop_foreground=False, min_size=(1, 1, 1), divisible_by=1))
    # Crop the naive full-grid result by hand (foreground > 0, margin 1) and pad like the stage.
    values = naive.image
    mask = values > 0
    zz, yy, xx = [np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1))]
    box = tuple(slice(max(h[0] - 1, 0), min(h[-1] + 2, n)) for h, n in zip((zz, yy, xx), values.shape))
    cropped, cropped_label = values[box], naive.label[box]
    # locate the hand-cropped block inside the padded fast result via world coordinates
    offset = np.round((naive.grid.origin_ras - fast.grid.origin_ras) / fast.grid.spacing).astype(int)[::-1]
    start = offset + np.array([b.start for b in box])
    inner = tuple(slice(s, s + n) for s, n in zip(start, cropped.shape))
    np.testing.assert_allclose(fast.image[inner], cropped, atol=1e-6)
    np.testing.assert_array_equal(fast.label[inner], cropped_label)
    assert fast.image.sum() == pytest.approx(cropped.sum(), rel=1e-6)  # nothing outside the block
    assert all(n % 8 == 0 for n in fast.image.shape)


def test_window_maps_hu_to_unit_range():
    image, _ = phantom()
    out = harmonize_volume(image, None, settings())
    assert out.image.dtype == np.float32
    assert out.image.min() == 0.0 and out.image.max() <= 1.0
    soft = out.image[out.image > 0.4]
    # 40 HU → (40 + 175) / 425 ≈ 0.506, liver 60 HU → 0.553
    assert np.median(soft) == pytest.approx(0.506, abs=0.03)


@pytest.mark.parametrize("b_range", [(-1.0, 1.0), (1.0, 0.0)])
def test_foreground_crop_does_not_depend_on_the_output_range(b_range):
    """A [-1, 1] (or reversed) window crops the same body as [0, 1]: the threshold is relative to the window.

    The body is fat (about -100 HU), below the window's middle: a threshold read as a scaled value (0 on
    [-1, 1] is 37.5 HU) would keep only the liver and cut the body away.
    """
    image, label = phantom()
    hu = sitk.GetArrayFromImage(image)
    hu[sitk.GetArrayFromImage(label) == 1] -= 140
    fat = sitk.GetImageFromArray(hu)
    fat.CopyInformation(image)
    unit = harmonize_volume(fat, label, settings())
    low, high = b_range
    other = harmonize_volume(fat, label, settings(intensity=IntensityConfig(b_min=low, b_max=high)))
    for field in ("origin_ras", "spacing", "size"):
        np.testing.assert_array_equal(getattr(other.grid, field), getattr(unit.grid, field))
    np.testing.assert_array_equal(other.label, unit.label)
    np.testing.assert_allclose(other.image, low + (high - low) * unit.image, atol=1e-6)
    uncropped = harmonize_volume(fat, label, settings(crop_foreground=False))
    assert (unit.label == 1).sum() == (uncropped.label == 1).sum() > 0  # the whole body is kept


@pytest.mark.parametrize("code", ["LPS", "SLP", "AIL"])
def test_reoriented_copies_give_the_same_volume(code, tmp_path):
    """An LPS or axis-permuted copy of a case ends up with the RAS original's shape and affine."""
    image, label = phantom()
    copy, copy_label = sitk.DICOMOrient(image, code), sitk.DICOMOrient(label, code)
    assert copy.GetDirection() != image.GetDirection()
    s = settings()
    records = []
    for name, (img, lab) in {"ras": (image, label), code: (copy, copy_label)}.items():
        sitk.WriteImage(img, str(tmp_path / f"{name}.nrrd"))
        sitk.WriteImage(lab, str(tmp_path / f"{name}_seg.nrrd"))
        spec = CaseSpec("ds", name, "site", "abdomen", "train", tmp_path / f"{name}.nrrd", tmp_path / f"{name}_seg.nrrd")
        records.append(harmonize_case(spec, s, tmp_path / "out"))
    assert [r.status for r in records] == ["ok", "ok"]
    a, b = (nib.load(tmp_path / "out" / r.image) for r in records)
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    assert nib.aff2axcodes(a.affine) == ("R", "A", "S")
    np.testing.assert_allclose(a.get_fdata(), b.get_fdata(), atol=1e-4)  # interpolation error only
    la, lb = (nib.load(tmp_path / "out" / r.label) for r in records)
    np.testing.assert_array_equal(la.get_fdata(), lb.get_fdata())
    assert records[1].orig_orientation == code


# --------------------------------------------------------------------------- bad input
def _write(path: Path, image: sitk.Image) -> Path:
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def _bad_inputs(tmp: Path) -> dict[str, tuple[CaseSpec, str]]:
    image, label = phantom()
    good = _write(tmp / "good.nii.gz", image)
    good_label = _write(tmp / "good_seg.nii.gz", label)
    spec = lambda name, img, lab=None: CaseSpec("ds", name, "site", "abdomen", "train", img, lab)  # noqa: E731

    truncated = tmp / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    corrupt = tmp / "corrupt.nrrd"
    corrupt.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n\n" + b"\0" * 100)
    garbage = tmp / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not an image at all" * 50))
    zero = tmp / "zero.nii.gz"
    zero.touch()
    flat = _write(tmp / "flat.nii.gz", sitk.GetImageFromArray(np.zeros((20, 20), np.float32)))
    four_d = _write(tmp / "four_d.nii.gz", sitk.GetImageFromArray(np.zeros((3, 5, 6, 7), np.float32), isVector=False))
    nan = sitk.Cast(image, sitk.sitkFloat32)
    nan[3, 4, 5] = float("nan")
    nan_path = _write(tmp / "nan.mha", nan)
    nan_nifti = tmp / "nan.nii.gz"  # ITK would read NaN back as 0: written with nibabel
    nib.save(nib.Nifti1Image(sitk.GetArrayFromImage(nan), np.eye(4)), nan_nifti)
    shifted = sitk.Image(label)
    shifted.SetOrigin((0.0, 0.0, 0.0))
    shifted_path = _write(tmp / "shifted_seg.nii.gz", shifted)
    small_label = _write(tmp / "small_seg.nii.gz", label[:, :, :10])
    return {
        "truncated": (spec("truncated", truncated), "truncated"),
        "corrupt": (spec("corrupt", corrupt), "corrupt"),
        "garbage": (spec("garbage", garbage), "corrupt"),
        "zero_bytes": (spec("zero", zero), "empty file"),
        "2d": (spec("flat", flat), "2D image"),
        "4d": (spec("four_d", four_d), "4D image"),
        "nan": (spec("nan", nan_path), "non-finite"),
        "nan_nifti": (spec("nan_nifti", nan_nifti), "non-finite"),
        "label_origin": (spec("shifted", good, shifted_path), "label geometry does not match"),
        "label_size": (spec("small", good, small_label), "label geometry does not match"),
        "missing": (spec("missing", tmp / "nope.nii.gz"), "file not found"),
        "missing_label": (spec("missing_label", good, tmp / "nope_seg.nii.gz"), "file not found"),
        "good": (spec("good", good, good_label), ""),
    }


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "garbage", "zero_bytes", "2d", "4d", "nan",
                                  "nan_nifti", "label_origin", "label_size", "missing", "missing_label"])
def test_bad_input_is_quarantined_with_a_reason_naming_the_file(kind, tmp_path):
    spec, expected = _bad_inputs(tmp_path)[kind]
    record = harmonize_case(spec, settings(), tmp_path / "out")
    assert record.status == "quarantined"
    assert expected in record.reason
    named = spec.label if "label" in kind else spec.image
    assert str(named) in record.reason
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.nii.gz"))


def test_good_case_beside_bad_ones_is_harmonized(tmp_path):
    spec, _ = _bad_inputs(tmp_path)["good"]
    record = harmonize_case(spec, settings(), tmp_path / "out")
    assert record.status == "ok", record.reason
    assert record.labels_present == [0, 1, 2]
    assert (tmp_path / "out" / record.image).is_file()


def test_empty_foreground_is_a_problem():
    air = sitk.GetImageFromArray(np.full((10, 12, 14), -1000, np.int16))
    with pytest.raises(CaseProblem, match="no foreground"):
        harmonize_volume(air, None, settings())


def test_settings_hash_ignores_workers_and_dataset_list():
    base = HarmonizeConfig()
    assert case_settings(base).settings_hash == case_settings(base.model_copy(update={"workers": 7})).settings_hash
    assert case_settings(base).settings_hash != case_settings(
        base.model_copy(update={"target_spacing": (1.0, 1.0, 1.0)})).settings_hash
    # every output-affecting setting is in the hash (a changed margin must redo the cases)
    for update in ({"foreground_margin": 3}, {"foreground_threshold": 0.1}, {"interpolation": "bspline"},
                   {"crop_foreground": False}, {"divisible_by": 8}, {"min_size": (32, 32, 32)},
                   {"intensity": base.intensity.model_copy(update={"a_max": 300.0})}):
        assert case_settings(base.model_copy(update=update)).settings_hash != case_settings(base).settings_hash, update


@pytest.mark.parametrize("values,expected", [
    (np.array([[0, 3], [3, 7]], dtype=np.uint8), [0, 3, 7]),
    (np.array([5, 2, 2], dtype=np.int16), [2, 5]),
    (np.array([-1, 4], dtype=np.int32), [-1, 4]),  # negative: the np.unique path
    (np.array([1.0, 0.0, 1.0], dtype=np.float32), [0, 1]),
    (np.zeros((0,), dtype=np.uint8), []),
])
def test_present_values_lists_each_label_once_in_order(values, expected):
    assert present_values(values) == expected


def test_the_label_written_beside_the_image_matches_its_record(tmp_path):
    """Both files exist, hash as recorded, and the recorded labels are those of the written label file."""
    import hashlib

    image, label = phantom()
    sitk.WriteImage(image, str(tmp_path / "img.nii.gz"))
    sitk.WriteImage(label, str(tmp_path / "lab.nii.gz"))
    spec = CaseSpec(dataset="d", case_id="c0", domain="d", body_part="abdomen", split="train",
                    image=tmp_path / "img.nii.gz", label=tmp_path / "lab.nii.gz")
    record = harmonize_case(spec, settings(), tmp_path / "out")
    assert record.status == "ok", record.reason
    for rel, digest in ((record.image, record.image_sha256), (record.label, record.label_sha256)):
        assert hashlib.sha256((tmp_path / "out" / rel).read_bytes()).hexdigest() == digest
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / record.label)))
    assert record.labels_present == sorted(int(v) for v in np.unique(written)) and len(record.labels_present) > 1
