"""organ_metrics' HD95 and surface Dice equal MONAI's compute_hausdorff_distance / compute_surface_dice."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from meduet.engine.segmentation import organ_metrics, surface_scores


def _blob(shape: tuple[int, int, int], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return (((grid - centre) / radii) ** 2).sum(-1) <= 1.0


# The reference values come from MONAI's one-call functions, which pass MONAI's own deprecated argument (the
# project's scoring no longer does: test_scoring_warns_about_nothing); their FutureWarning is no news here.
@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy.*:FutureWarning")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_monais_own_functions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (24, 28, 20)
    truth = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for c in (1, 2):
        centre, radii = rng.uniform(6, 14, 3), rng.uniform(3, 6, 3)
        truth[_blob(shape, centre, radii)] = c
        pred[_blob(shape, centre + rng.normal(0, 1.5, 3), radii * rng.uniform(0.7, 1.3, 3))] = c
    pred[rng.random(shape) < 0.002] = 1  # scattered false positives: a long distance tail
    spacing = (2.5, 0.9, 1.1)
    scores = organ_metrics(pred, truth, [1, 2, 3], spacing, tolerance_mm=2.0, workers=2)
    assert scores == organ_metrics(pred, truth, [1, 2, 3], spacing, tolerance_mm=2.0, workers=1)  # threads: same
    assert list(scores) == [1, 2]  # classes absent from the truth are skipped, the order kept
    for c, values in scores.items():
        p = torch.from_numpy(pred == c)[None, None]
        y = torch.from_numpy(truth == c)[None, None]
        hd95 = float(compute_hausdorff_distance(p, y, include_background=True, percentile=95, spacing=spacing)[0, 0])
        nsd = float(compute_surface_dice(p, y, [2.0], include_background=True, spacing=spacing)[0, 0])
        assert values["hd95"] == pytest.approx(hd95, rel=1e-5)
        assert values["surface_dice"] == pytest.approx(nsd, rel=1e-5)
        assert 0.0 < values["dice"] < 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_the_distance_transform_and_the_kd_tree_give_the_same_scores(seed: int) -> None:
    """Both ways of finding each edge voxel's nearest edge (``edge_distances``) score alike, sparse or fragmented."""
    rng = np.random.default_rng(seed)
    shape = (20, 26, 22)
    truth = _blob(shape, rng.uniform(8, 12, 3), rng.uniform(4, 7, 3))
    compact = _blob(shape, rng.uniform(8, 12, 3), rng.uniform(4, 7, 3))
    fragmented = compact | (rng.random(shape) < 0.05)  # many edge voxels for its box: the transform's case
    spacing = (2.0, 0.8, 1.3)
    for pred in (compact, fragmented):
        p, y = torch.from_numpy(pred), torch.from_numpy(truth)
        by_tree = surface_scores(p, y, spacing, 2.0, dense=False)
        by_transform = surface_scores(p, y, spacing, 2.0, dense=True)
        assert by_transform == pytest.approx(by_tree, rel=1e-6)
        assert surface_scores(p, y, spacing, 2.0) == pytest.approx(by_tree, rel=1e-6)  # whichever the rule picks
        assert by_tree[0] > 0 and 0.0 < by_tree[1] < 1.0


def test_a_class_never_predicted_has_infinite_hd95_and_zero_surface_dice() -> None:
    truth = np.zeros((12, 12, 12), np.uint8)
    truth[3:8, 3:8, 3:8] = 4
    scores = organ_metrics(np.zeros_like(truth), truth, [4], (1.0, 1.0, 1.0))
    assert scores == {4: {"dice": 0.0, "hd95": float("inf"), "surface_dice": 0.0}}


def test_scoring_warns_about_nothing() -> None:
    """A stage that scores masks prints only its own messages (MONAI's one-call edge distances warned about
    an argument MONAI itself passes)."""
    truth = np.zeros((16, 16, 16), np.uint8)
    truth[3:10, 4:12, 2:9] = 1
    pred = np.roll(truth, 2, axis=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, each time: none hidden by an earlier identical one
        scores = organ_metrics(pred, truth, [1], (1.0, 1.0, 1.0), workers=1)
    assert 0.0 < scores[1]["dice"] < 1.0 and scores[1]["hd95"] > 0
    assert [str(w.message) for w in caught] == []
