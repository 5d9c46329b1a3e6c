"""The measurements of evaluate-synthesis on inputs with known answers."""

import math

import numpy as np
import pytest
import torch
from monai.metrics import SSIMMetric

from meduet.data.labelled import label_classes
from meduet.evaluation.scoring import body_crops, organ_dice, segment
from meduet.evaluation.synthesis import (
    bootstrap_interval,
    diversity,
    fd_against_floor,
    frechet_distance,
    histogram_match,
    image_scores,
    kernel_distance,
    kernel_distance_and_interval,
    mean_off_diagonal,
    organ_median_hu,
    pairwise_ms_ssim,
    ssim_3d,
)
from meduet.models.architectures import EvaluatorArchitecture
from meduet.models.evaluator import EvaluatorNet

WINDOW = (-175.0, 250.0, 0.0, 1.0)


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_a_shift() -> None:
    x = np.random.default_rng(0).normal(size=(64, 6))
    assert abs(frechet_distance(x, x)) < 1e-6
    distances = [frechet_distance(x + shift, x) for shift in (0.5, 1.0, 2.0)]
    assert distances == sorted(distances) and distances[0] > 1.0
    np.testing.assert_allclose(distances[2], 6 * 2.0**2, rtol=1e-6)  # a pure shift adds |Δμ|²


def test_fd_against_floor_separates_a_shifted_set_from_real_samples() -> None:
    rng = np.random.default_rng(1)
    reference, real = rng.normal(size=(80, 4)), rng.normal(size=(20, 4))
    same = fd_against_floor(rng.normal(size=(20, 4)), reference, real, resamples=50, seed=0)
    shifted = fd_against_floor(rng.normal(size=(20, 4)) + 2.0, reference, real, resamples=50, seed=0)
    assert same["samples"] == 20 and same["reference_samples"] == 80
    assert same["ratio"] < 3 < shifted["ratio"]
    assert shifted["ratio_ci95"] == [bound / shifted["floor"] for bound in shifted["fd_ci95"]]
    assert shifted["fd_ci95"][0] > shifted["floor_ci95"][1]  # the intervals do not overlap
    assert shifted["kid_ci95"][0] > shifted["kid_floor_ci95"][1] and same["kid_ci95"][0] < 0 < same["kid_ci95"][1]
    assert same["features"] == 4
    assert "skipped" in fd_against_floor(reference[:1], reference, real, resamples=10, seed=0)


def test_kernel_distance_is_the_unbiased_mmd_and_needs_no_more_samples_than_features() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(12, 20)), rng.normal(size=(30, 20)) + 0.2
    kernel = lambda x, y: (x @ y.T / 20 + 1) ** 3  # noqa: E731 -- the cubic kernel, written out
    k_aa, k_bb = kernel(a, a), kernel(b, b)
    written_out = ((k_aa.sum() - np.trace(k_aa)) / (12 * 11) + (k_bb.sum() - np.trace(k_bb)) / (30 * 29)
                   - 2 * kernel(a, b).mean())
    assert kernel_distance(a, b) == pytest.approx(written_out, rel=1e-10)
    # 16 samples of 56 features (a site's crops against the evaluator's features): the Fréchet distance of
    # two samples of one distribution sits far above 0, the kernel distance averages 0; a shift stands out.
    same = [kernel_distance(rng.normal(size=(16, 56)), rng.normal(size=(64, 56))) for _ in range(100)]
    assert abs(np.mean(same)) < 3 * np.std(same) / 10
    assert frechet_distance(rng.normal(size=(16, 56)), rng.normal(size=(64, 56))) > 20
    shifted = [kernel_distance(rng.normal(size=(16, 56)) + 0.5, rng.normal(size=(64, 56))) for _ in range(20)]
    assert min(shifted) > max(same)


def test_kernel_distance_interval_never_scores_a_repeated_sample_against_itself() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(60, 8))
    _, (low, high) = kernel_distance_and_interval(a, b, resamples=400, seed=0)
    assert low < kernel_distance(a, b) < high
    # Resamples of one distribution stay centred on 0: with self-pairs counted, every resample's
    # within-set terms would gain k(x, x) and the whole interval would sit above 0.
    assert low < 0 < high and abs(low) / high == pytest.approx(1, abs=0.6)


def test_bootstrap_interval_brackets_the_statistic() -> None:
    values = np.random.default_rng(2).normal(5.0, 1.0, size=200)
    low, high = bootstrap_interval(np.mean, [values], resamples=200, seed=0)
    assert low < values.mean() < high and high - low < 0.5
    assert bootstrap_interval(np.mean, [np.full(10, 3.0)], resamples=20, seed=0) == [3.0, 3.0]


UNIT = (0.0, 1.0)  # the harmonized intensity range of these crops


def test_ms_ssim_is_one_for_copies_and_lower_for_different_crops() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 32, 32, 32, generator=generator), 3, 1, 1)
    copies = base.repeat(3, 1, 1, 1, 1)
    np.testing.assert_allclose(
        diversity(copies, kernel_size=5, scales=3, resamples=20, seed=0, value_range=UNIT)["ms_ssim"], 1.0, atol=1e-4)
    others = torch.nn.functional.avg_pool3d(torch.rand(3, 1, 32, 32, 32, generator=generator), 3, 1, 1)
    assert diversity(others, kernel_size=5, scales=3, resamples=20, seed=0, value_range=UNIT)["ms_ssim"] < 0.9
    matrix = pairwise_ms_ssim(torch.cat([base, others]), kernel_size=5, scales=3, value_range=UNIT)
    assert np.isnan(np.diag(matrix)).all() and np.allclose(matrix, matrix.T, equal_nan=True)
    # a bootstrap draw that repeats a sample never pairs it with itself
    assert mean_off_diagonal(matrix, np.array([0, 0, 1])) == pytest.approx(matrix[0, 1])
    with pytest.raises(ValueError, match="kernel size"):
        pairwise_ms_ssim(copies, kernel_size=11, scales=3, value_range=UNIT)
    assert "skipped" in diversity(base, kernel_size=5, scales=3, resamples=20, seed=0, value_range=UNIT)
    # the same crops harmonized to [-1, 1] score the same: the range is mapped back to [0, 1] first
    np.testing.assert_allclose(pairwise_ms_ssim(torch.cat([base, others]) * 2 - 1, kernel_size=5, scales=3,
                                                value_range=(-1.0, 1.0)), matrix, atol=1e-6)


def test_histogram_matching_moves_the_intensity_distribution_to_the_reference() -> None:
    rng = np.random.default_rng(3)
    body = np.zeros((16, 32, 32), np.float32)
    body[:, 8:24, 8:24] = 1
    image = body * rng.normal(0.4, 0.05, body.shape).astype(np.float32)
    reference = body * rng.normal(0.6, 0.10, body.shape).astype(np.float32)
    matched = histogram_match(image, reference, levels=128, points=7)
    inside = body > 0
    assert abs(matched[inside].mean() - 0.6) < 0.02 and abs(matched[inside].std() - 0.10) < 0.02
    assert abs(image[inside].mean() - 0.4) < 0.01  # the input is left as it was


def test_image_scores_in_harmonized_units_and_hu() -> None:
    target = torch.rand(1, 16, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8
    same = image_scores(target, target, WINDOW, ssim_window=7)
    assert same["mae_hu"] == 0 and same["psnr"] == math.inf and same["ssim"] == pytest.approx(1.0)
    shifted = image_scores(target + 0.1, target, WINDOW, ssim_window=7)
    assert shifted["mae_hu"] == pytest.approx(0.1 * 425, rel=1e-4)  # 0.1 of a 425 HU window
    assert shifted["psnr"] == pytest.approx(20.0, rel=1e-3) and shifted["ssim"] < 1
    assert image_scores(target[:, :4], target[:, :4], WINDOW, ssim_window=7)["ssim"] is None  # too thin


@pytest.mark.parametrize(("shape", "window", "data_range"), [((20, 17, 23), 7, 1.0), ((11, 30, 14), 11, 425.0),
                                                             ((9, 9, 9), 3, 2.0)])
def test_separable_ssim_is_monais_ssim(shape: tuple[int, ...], window: int, data_range: float) -> None:
    generator = torch.Generator().manual_seed(window)
    target = torch.rand(1, 1, *shape, generator=generator) * data_range
    estimate = (target + 0.2 * data_range * torch.randn(1, 1, *shape, generator=generator)).clamp(0, data_range)
    for a, b in ((estimate, target), (target, estimate), (target, target)):
        want = float(SSIMMetric(spatial_dims=3, data_range=data_range, win_size=window)(a, b).mean())
        assert ssim_3d(a, b, data_range=data_range, win_size=window) == pytest.approx(want, abs=2e-6)
    with pytest.raises(ValueError, match="must be odd and fit"):
        ssim_3d(estimate, target, data_range=data_range, win_size=window + 1)


def test_organ_median_hu_and_label_classes() -> None:
    labels = torch.tensor([[[0, 3, 3], [7, 7, 7]]])
    classes = label_classes(labels, [0, 3, 7])
    assert classes.tolist() == [[[0, 1, 1], [2, 2, 2]]]
    image = torch.tensor([[[0.0, 0.4, 0.6], [0.5, 0.5, 1.0]]])
    medians = organ_median_hu(image, classes, [0, 3, 7], WINDOW)
    # torch's median of an even count is the lower middle value: 0.4 -> -175 + 0.4 * 425
    assert medians == {3: pytest.approx(-5.0), 7: pytest.approx(37.5)}


def test_dice_of_a_perfect_an_empty_and_an_absent_organ() -> None:
    truth = torch.zeros(8, 8, 8, dtype=torch.long)
    truth[2:6, 2:6, 2:6] = 1  # organ 1 present, organ 2 absent
    np.testing.assert_allclose(organ_dice(truth, truth, 3)[0], 1.0)
    dice = organ_dice(torch.zeros_like(truth), truth, 3)
    assert dice[0] == 0 and np.isnan(dice[1])


def test_body_crops_keep_crops_that_are_mostly_body() -> None:
    image = torch.zeros(1, 16, 16, 32)
    image[:, :, :, :16] = 0.5  # left half body, right half air
    crops = body_crops(image, (16, 16, 16), threshold=0.05, min_fraction=0.5)
    assert crops.shape == (1, 1, 16, 16, 16) and bool((crops > 0.05).all())
    air = body_crops(torch.zeros(1, 16, 16, 32), (16, 16, 16), threshold=0.05, min_fraction=0.5)
    assert air.shape == (1, 1, 16, 16, 16)  # none qualifies: the one with the most body


def test_segmentation_in_one_pass_or_in_windows_covers_odd_shapes() -> None:
    torch.manual_seed(0)
    model = EvaluatorNet(EvaluatorArchitecture(channels=(4, 8), num_sites=2, num_labels=3)).eval()
    image = torch.rand(1, 18, 21, 16)  # not divisible by the network's 4: padded, then cut back
    whole = segment(model, image, window=(16, 16, 16), overlap=0.25, batch_size=2, max_voxels=10**6)
    windows = segment(model, image, window=(16, 16, 16), overlap=0.25, batch_size=2, max_voxels=10)
    assert whole.shape == windows.shape == (18, 21, 16)
    assert set(whole.unique().tolist()) <= {0, 1, 2}
