"""The measurements of ``evaluate-synthesis`` that do not need the evaluator network itself.

- :func:`frechet_distance`: MONAI's Fréchet distance on feature sets (here: the synthesis
  evaluator's pooled features, so "evaluator-space Fréchet distance", not an FID);
- :func:`bootstrap_interval`: percentile intervals of any statistic of independently
  resampled sample sets;
- :func:`kernel_distance`: the kernel inception distance's unbiased estimator on feature sets; unlike the
  Fréchet distance it needs no full-rank covariance, so it holds for sets smaller than the feature count;
- :func:`fd_against_floor`: generated vs real next to real vs real at the same sample size
  (the Fréchet distance of two finite samples is biased upwards, more so the smaller they are), in both
  distances;
- :func:`pairwise_ms_ssim` and :func:`mean_off_diagonal`: 3-D MS-SSIM among samples (diversity);
- :func:`histogram_match`: the SimpleITK histogram-matching baseline;
- :func:`image_scores`: PSNR, SSIM (:func:`ssim_3d`) and MAE in HU of one image against another;
- :func:`organ_median_hu`: per-organ median HU (MAISI's check of generated intensities).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import MultiScaleSSIMMetric
from monai.metrics.fid import get_fid_score
from monai.networks.layers import separable_filtering
from sklearn.metrics.pairwise import polynomial_kernel

from meduet.engine.metrics import mae_raw, psnr
from meduet.harmonize.intensity import to_unit

# MONAI's (and Wang et al.'s) MS-SSIM scale weights, finest first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to feature sets ``a (n, F)`` and ``b (m, F)``."""
    return float(get_fid_score(torch.from_numpy(np.asarray(a, dtype=np.float64)),
                               torch.from_numpy(np.asarray(b, dtype=np.float64))))


def kernel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased squared MMD of feature sets ``a (n, F)`` and ``b (m, F)`` under the cubic polynomial kernel
    ``(x·y / F + 1)³``: the kernel inception distance's estimator (Bińkowski et al., 2018). Its expectation is
    0 for samples of one distribution at any sample size (so an estimate can be slightly negative)."""
    return _kernel_distance(*_kernels(a, b), np.ones(len(a)), np.ones(len(b)))


def _kernels(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three kernel matrices of ``kernel_distance``: within ``a``, within ``b`` and across."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    kernel = {"degree": 3, "gamma": 1.0 / a.shape[1], "coef0": 1.0}
    return polynomial_kernel(a, **kernel), polynomial_kernel(b, **kernel), polynomial_kernel(a, b, **kernel)


def _kernel_distance(k_aa: np.ndarray, k_bb: np.ndarray, k_ab: np.ndarray, ca: np.ndarray, cb: np.ndarray) -> float:
    """``kernel_distance`` of a resample given as counts: ``ca[i]`` copies of ``a[i]``, ``cb[j]`` of ``b[j]``."""
    def within(k: np.ndarray, c: np.ndarray) -> float:
        # pairs of distinct original samples only: a resample repeats some, and a sample scored
        # against itself adds k(x, x) and biases the estimate upwards
        same = c**2
        pairs = c.sum() ** 2 - same.sum()
        return float((c @ k @ c - same @ np.diag(k)) / pairs) if pairs else np.nan  # nan: one sample drawn n times
    return within(k_aa, ca) + within(k_bb, cb) - 2.0 * float(ca @ k_ab @ cb / (ca.sum() * cb.sum()))


def kernel_distance_and_interval(a: np.ndarray, b: np.ndarray, *, resamples: int,
                                 seed: int) -> tuple[float, list[float]]:
    """``kernel_distance(a, b)`` and its 95 % percentile bootstrap interval, both sets resampled with
    replacement (the kernels computed once; repeated samples never scored against themselves)."""
    kernels, rng = _kernels(a, b), np.random.default_rng(seed)
    values = [_kernel_distance(*kernels, np.bincount(rng.integers(len(a), size=len(a)), minlength=len(a)),
                               np.bincount(rng.integers(len(b), size=len(b)), minlength=len(b)))
              for _ in range(resamples)]
    return _kernel_distance(*kernels, np.ones(len(a)), np.ones(len(b))), _percentile_interval(values)


def _percentile_interval(values: Sequence[float]) -> list[float]:
    """The 2.5th and 97.5th percentiles of the finite ``values`` (NaN, NaN when none is)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if len(values) else [np.nan] * 2


def bootstrap_interval(statistic: Callable[..., float], samples: Sequence[np.ndarray], *, resamples: int,
                       seed: int) -> list[float]:
    """95 % percentile interval of ``statistic(*samples)``, each sample resampled with replacement along axis 0.

    For a Fréchet distance the interval can lie above the estimate: a resample repeats samples,
    which shrinks each covariance's rank and inflates the distance (more so for small sets).
    """
    rng = np.random.default_rng(seed)
    return _percentile_interval([statistic(*(s[rng.integers(len(s), size=len(s))] for s in samples))
                                 for _ in range(resamples)])


def fd_against_floor(generated: np.ndarray, reference: np.ndarray, real: np.ndarray, *, resamples: int,
                     seed: int) -> dict:
    """Fréchet distance of ``generated`` to ``reference`` and the floor: other ``real`` samples to ``reference``.

    Both compared sets are cut (seeded) to the same size, so the finite-sample bias is the same.

    Args:
        generated, reference, real: ``(n, F)`` features; ``reference`` is the train split's real crops,
            ``real`` held-out real crops.

    Returns:
        ``fd``, ``fd_ci95``, ``floor``, ``floor_ci95``, ``ratio`` (fd / floor) and ``ratio_ci95`` (``fd_ci95`` /
        floor: the floor's own uncertainty is ``floor_ci95``), the same in the kernel
        distance (``kid``, ``kid_ci95``, ``kid_floor``, ``kid_floor_ci95``: valid where the sets are
        smaller than the feature count and the Fréchet distance's covariances are singular), and the
        sample counts.
    """
    n = min(len(generated), len(real))
    if n < 2 or len(reference) < 2:
        return {"skipped": f"too few samples (generated {len(generated)}, held-out real {len(real)}, "
                           f"reference {len(reference)})"}
    rng = np.random.default_rng(seed)
    generated = generated[np.sort(rng.choice(len(generated), n, replace=False))]
    real = real[np.sort(rng.choice(len(real), n, replace=False))]
    fd, floor = frechet_distance(generated, reference), frechet_distance(real, reference)
    kid, kid_ci95 = kernel_distance_and_interval(generated, reference, resamples=resamples, seed=seed)
    kid_floor, kid_floor_ci95 = kernel_distance_and_interval(real, reference, resamples=resamples, seed=seed)
    fd_ci95 = bootstrap_interval(frechet_distance, [generated, reference], resamples=resamples, seed=seed)
    return {"fd": fd, "fd_ci95": fd_ci95,
            "floor": floor, "floor_ci95": bootstrap_interval(frechet_distance, [real, reference],
                                                             resamples=resamples, seed=seed),
            "ratio": fd / floor if floor > 0 else None,
            # the distance's interval over the floor's value (the floor's own spread: floor_ci95)
            "ratio_ci95": [bound / floor for bound in fd_ci95] if floor > 0 else None,
            "kid": kid, "kid_ci95": kid_ci95, "kid_floor": kid_floor, "kid_floor_ci95": kid_floor_ci95,
            "samples": n, "reference_samples": len(reference), "features": generated.shape[1]}


def pairwise_ms_ssim(crops: torch.Tensor, *, kernel_size: int, scales: int,
                     value_range: tuple[float, float]) -> np.ndarray:
    """3-D MS-SSIM of every pair of ``crops (n, 1, D, H, W)`` (harmonized intensities in ``value_range``, mapped
    to [0, 1] first, so the score does not depend on the range harmonization wrote): ``(n, n)``, NaN diagonal.

    Raises:
        ValueError: the kernel and scales do not fit the crop (MONAI's check).
    """
    weights = np.array(MS_SSIM_WEIGHTS[:scales]) / np.sum(MS_SSIM_WEIGHTS[:scales])
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=kernel_size, weights=tuple(weights))
    i, j = np.triu_indices(len(crops), k=1)
    matrix = np.full((len(crops), len(crops)), np.nan)
    if len(i):
        unit = to_unit(crops.float(), value_range).clamp(0, 1)
        values = metric(unit[i], unit[j]).flatten().double().numpy()
        matrix[i, j] = matrix[j, i] = values
    return matrix


def mean_off_diagonal(matrix: np.ndarray, index: np.ndarray | None = None) -> float:
    """Mean of ``matrix[a, b]`` over pairs of distinct draws ``a != b`` of ``index`` (all rows by default).

    A bootstrap draw repeats samples; pairs of a sample with itself are left out.
    """
    index = np.arange(len(matrix)) if index is None else np.asarray(index)
    sub = matrix[np.ix_(index, index)]
    distinct = index[:, None] != index[None, :]
    return float(np.nanmean(sub[distinct])) if distinct.any() else float("nan")


def diversity(crops: torch.Tensor, *, kernel_size: int, scales: int, resamples: int, seed: int,
              value_range: tuple[float, float]) -> dict:
    """Mean pairwise MS-SSIM among ``crops`` (lower: more diverse) with a bootstrap interval over samples."""
    if len(crops) < 2:
        return {"skipped": f"{len(crops)} sample(s): no pair"}
    matrix = pairwise_ms_ssim(crops, kernel_size=kernel_size, scales=scales, value_range=value_range)
    index = np.arange(len(crops))
    return {"ms_ssim": mean_off_diagonal(matrix),
            "ms_ssim_ci95": bootstrap_interval(lambda idx: mean_off_diagonal(matrix, idx), [index],
                                               resamples=resamples, seed=seed),
            "samples": len(crops)}


def histogram_match(image: np.ndarray, reference: np.ndarray, *, levels: int, points: int) -> np.ndarray:
    """``image``'s intensities mapped so that their histogram matches ``reference``'s (SimpleITK).

    Voxels below each image's mean (air) are left out of the match, as CT histogram matching
    needs (``ThresholdAtMeanIntensity``).
    """
    matcher = sitk.HistogramMatchingImageFilter()
    matcher.SetNumberOfHistogramLevels(levels)
    matcher.SetNumberOfMatchPoints(points)
    matcher.ThresholdAtMeanIntensityOn()
    matched = matcher.Execute(sitk.GetImageFromArray(np.asarray(image, dtype=np.float32)),
                              sitk.GetImageFromArray(np.asarray(reference, dtype=np.float32)))
    return sitk.GetArrayFromImage(matched)


def ssim_3d(estimate: torch.Tensor, target: torch.Tensor, *, data_range: float, win_size: int,
            sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean 3-D SSIM of ``estimate`` against ``target`` (``(1, 1, D, H, W)``): ``monai.metrics.SSIMMetric``'s value.

    The same Gaussian window (``win_size``, ``sigma``), constants and valid region as MONAI, but the
    window applied as three 1-D filters (``monai.networks.layers.separable_filtering``) to the five
    local statistics at once: MONAI convolves each with the full ``win_size``-cubed kernel, which took
    ~45 % of ``evaluate-synthesis`` on whole volumes (tests/evaluation: equal to MONAI's within float
    rounding; ``benchmarks/ssim.py``: the time).
    """
    if win_size % 2 == 0 or min(target.shape[2:]) < win_size:
        raise ValueError(f"SSIM window {win_size} must be odd and fit the image {tuple(target.shape[2:])}")
    offsets = torch.arange((1 - win_size) / 2, (1 + win_size) / 2)
    gaussian = torch.exp(-((offsets / sigma) ** 2) / 2)
    x, y = estimate.float(), target.float()
    local = separable_filtering(torch.cat([x, y, x * x, y * y, x * y], dim=1), gaussian / gaussian.sum())
    half = win_size // 2  # zero-padded borders dropped: MONAI's unpadded ("valid") convolution
    mu_x, mu_y, mu_xx, mu_yy, mu_xy = local[(0, slice(None), *(slice(half, n - half) for n in x.shape[2:]))]
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    var_x, var_y, cov = mu_xx - mu_x * mu_x, mu_yy - mu_y * mu_y, mu_xy - mu_x * mu_y
    contrast = (2 * cov + c2) / (var_x + var_y + c2)
    return float((((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * contrast).mean())


def image_scores(estimate: torch.Tensor, target: torch.Tensor, window: Sequence[float], *,
                 ssim_window: int) -> dict[str, float | None]:
    """PSNR (dB), 3-D SSIM (MONAI, Gaussian window ``ssim_window``) and MAE in raw units (HU) of ``estimate``
    against ``target`` (``(1, D, H, W)`` harmonized intensities).

    ``estimate`` is clamped to the harmonized range; SSIM is None for a region thinner than its window.
    """
    a_min, a_max, b_min, b_max = window
    estimate, target = estimate.float().clamp(b_min, b_max)[None], target.float()[None]  # (1, 1, D, H, W)
    thin = min(target.shape[2:]) < ssim_window
    return {"psnr": psnr(target, estimate, b_max - b_min),
            "ssim": None if thin else ssim_3d(estimate, target, data_range=b_max - b_min, win_size=ssim_window),
            "mae_hu": mae_raw(target, estimate, (a_min, a_max, b_min, b_max))}


def organ_median_hu(image: torch.Tensor, classes: torch.Tensor, label_ids: Sequence[int],
                    window: Sequence[float]) -> dict[int, float]:
    """Median raw intensity (HU) of each label present in ``classes``.

    Args:
        image: ``(D, H, W)`` harmonized intensities.
        classes: ``(D, H, W)`` head classes (``label_ids[i]`` is class ``i``); background left out.
        window: ``(a_min, a_max, b_min, b_max)``, the harmonization's linear map.
    """
    a_min, a_max, b_min, b_max = window
    raw = a_min + (image.float() - b_min) * (a_max - a_min) / (b_max - b_min)
    return {int(label): float(raw[classes == i].median()) for i, label in enumerate(label_ids)
            if i > 0 and bool((classes == i).any())}
