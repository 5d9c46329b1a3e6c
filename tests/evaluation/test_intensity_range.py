"""Thresholds and image scores follow the harmonized intensity range, so [-1, 1] (or any b_min/b_max) measures
what [0, 1] measures: body crops, MS-SSIM (tests/evaluation/test_synthesis_metrics.py) and PSNR."""

import pytest
import torch

from meduet.config import TrainEvaluatorConfig
from meduet.evaluation.counterfactual import _psnr
from meduet.evaluation.scoring import VolumeReader
from meduet.harmonize.intensity import output_range, range_level, to_unit
from meduet.harmonize.manifest import harmonized_range
from meduet.models.architectures import EvaluatorArchitecture
from meduet.models.evaluator import EvaluatorNet
from meduet.stages import StageError

CT = (-175.0, 250.0)


def test_the_output_range_is_the_one_every_case_shares() -> None:
    assert output_range({"a": [*CT, -1.0, 1.0], "b": [*CT, -1.0, 1.0]}) == (-1.0, 1.0)
    with pytest.raises(ValueError, match=r"differ in their output range: a \(0.0, 1.0\), b \(-1.0, 1.0\)"):
        output_range({"a": [*CT, 0.0, 1.0], "b": [*CT, -1.0, 1.0]})
    with pytest.raises(ValueError, match="reversed"):
        output_range({"a": [*CT, 1.0, 0.0]})
    with pytest.raises(ValueError, match="no harmonized case"):
        output_range({})
    with pytest.raises(StageError, match="manifest.csv: harmonized cases differ"):  # stages name the manifest
        harmonized_range({"a": [*CT, 0.0, 1.0], "b": [*CT, 0.0, 2.0]}, "data/harmonized/manifest.csv")


def test_a_share_of_the_range_is_the_old_intensity_on_zero_to_one() -> None:
    assert range_level(0.05, (0.0, 1.0)) == 0.05  # the demo's thresholds stay bit for bit
    assert range_level(0.05, (-1.0, 1.0)) == pytest.approx(-0.9)
    x = torch.linspace(0, 1, 11)
    assert torch.equal(to_unit(x, (0.0, 1.0)), x)


def test_the_evaluator_reads_the_same_body_crops_on_either_range() -> None:
    model = EvaluatorNet(EvaluatorArchitecture(channels=(4, 8), num_sites=2, num_labels=2))
    cfg = TrainEvaluatorConfig(crop_size=[8, 8, 8])
    image = torch.zeros(1, 16, 16, 16)
    image[:, :8, :8, :8] = 0.5  # one corner block of body in air: one of the 8 crops
    image[:, 8:, 4:, :] = 0.03  # dim tissue below the 0.05 share: not body
    unit = VolumeReader.from_section(model, cfg, (0.0, 1.0))
    wide = VolumeReader.from_section(model, cfg, (-1.0, 1.0))
    assert torch.equal(unit.body(image), image[None, :, :8, :8, :8])
    assert torch.equal(wide.body(image * 2 - 1), image[None, :, :8, :8, :8] * 2 - 1)
    # read as a plain intensity, 0.05 on [-1, 1] would be mid-grey (above 40 HU): no crop would be body
    assert wide.threshold == pytest.approx(-0.9) and unit.threshold == 0.05


def test_psnr_does_not_depend_on_the_range() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(1, 8, 8, 8, generator=generator)
    prediction = (target + 0.1 * torch.randn(1, 8, 8, 8, generator=generator)).clamp(0, 1)
    assert _psnr(prediction * 2 - 1, target * 2 - 1, (-1.0, 1.0)) == pytest.approx(
        _psnr(prediction, target, (0.0, 1.0)), rel=1e-5)


def _mid_grey_share(png) -> float:
    """Share of a PNG's pixels that are mid grey (what 0 on [-1, 1] must look like)."""
    import matplotlib.image

    rgb = matplotlib.image.imread(png)[..., :3]
    grey = (abs(rgb[..., 0] - rgb[..., 1]) < 0.02) & (abs(rgb[..., 1] - rgb[..., 2]) < 0.02)
    return float((grey & (abs(rgb[..., 0] - 0.5) < 0.1)).mean())


def test_the_harmonize_montage_and_the_vae_figure_span_the_harmonized_range(tmp_path) -> None:
    import numpy as np
    import SimpleITK as sitk

    from meduet.harmonize import qa
    from meduet.harmonize.manifest import CaseRecord
    from meduet.stages.train_vae import _figure_reconstructions

    half = np.full((16, 16, 16), -1.0, dtype=np.float32)  # air at the floor of [-1, 1] ...
    half[:, :, 8:] = 0.0  # ... and tissue in the middle of it: mid grey, not black
    sitk.WriteImage(sitk.GetImageFromArray(half), str(tmp_path / "case.nii.gz"))
    record = CaseRecord(key="d__case", dataset="d", case_id="case", domain="a", body_part="x", split="train",
                        status="ok", image="case.nii.gz", window=[*CT, -1.0, 1.0])
    assert _mid_grey_share(qa.montage([record], tmp_path, tmp_path / "montage.png")) > 0.05
    rows = [{"case": "d__case", "psnr": 20.0, "_slices": (half[8], half[8]), "_range": (-1.0, 1.0)}]
    assert _mid_grey_share(_figure_reconstructions(rows, tmp_path / "reconstructions.png")) > 0.05
