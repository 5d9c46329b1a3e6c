"""The pieces of evaluate-disentanglement on inputs with known answers."""

import numpy as np
import pytest
import torch

from meduet.data.windows import box_fractions, sliding_windows, window_origins, world_boxes
from meduet.evaluation.counterfactual import Scan, assemble, resample_onto, same_subject_pairs
from meduet.evaluation.identifiability import covered_region, inside, sample_windows, volume_box, volume_means
from meduet.evaluation.retrieval import cross_site_retrieval, subject_ids


def _affine(spacing: tuple[float, float, float], origin: tuple[float, float, float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def test_window_origins_follow_sliding_windows_including_padding() -> None:
    latent = torch.arange(5 * 12 * 20, dtype=torch.float32).reshape(1, 5, 12, 20)
    origins = window_origins((5, 12, 20), (8, 8, 8))
    windows = sliding_windows(latent, (8, 8, 8))
    assert len(origins) == len(windows) == 1 * 2 * 3
    assert origins[:, 0].tolist() == [-1] * 6  # d = 5 < 8: padded 1 before (centred), window starts at -1
    for window, (d, h, w) in zip(windows, origins):
        np.testing.assert_array_equal(window[0, 1:6].numpy(), latent[0, :, h:h + 8, w:w + 8].numpy())


def test_box_fractions_count_each_windows_mask_with_padding_as_outside() -> None:
    mask = np.random.default_rng(0).random((5, 12, 20)) > 0.6
    origins = window_origins(mask.shape, (8, 8, 8))  # the first axis is padded: boxes start at -1
    windows = sliding_windows(torch.from_numpy(mask[None].astype(np.float32)), (8, 8, 8))  # zero-padded
    np.testing.assert_allclose(box_fractions(mask, origins, (8, 8, 8)), windows.mean(dim=(1, 2, 3, 4)).numpy())
    np.testing.assert_allclose(box_fractions(mask, np.array([[10, 20, 30]]), (2, 2, 2)), [0.0])  # all outside


def test_world_boxes_map_array_axes_to_affine_columns() -> None:
    # spacing (x, y, z) = (2, 3, 4) mm; array axis d is z, w is x
    boxes = world_boxes(np.array([[1, 2, 3]]), (8, 8, 8), _affine((2.0, 3.0, 4.0), (10.0, 20.0, 30.0)))
    lo_voxel = np.array([3, 2, 1]) - 0.5  # (i, j, k) = (w, h, d)
    np.testing.assert_allclose(boxes[0, 0], [10 + 2 * lo_voxel[0], 20 + 3 * lo_voxel[1], 30 + 4 * lo_voxel[2]])
    np.testing.assert_allclose(boxes[0, 1] - boxes[0, 0], [16.0, 24.0, 32.0])


def test_region_every_volume_covers_and_windows_inside_it() -> None:
    a = volume_box((4, 10, 10, 10), _affine((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))  # [-0.5, 9.5]^3
    b = volume_box((4, 10, 10, 10), _affine((1.0, 1.0, 1.0), (3.0, 0.0, -2.0)))  # shifted in x and z
    region = covered_region([a, b])
    np.testing.assert_allclose(region, [[2.5, -0.5, -0.5], [9.5, 9.5, 7.5]])
    windows = np.array([[[3, 0, 0], [9, 9, 7]], [[0, 0, 0], [9, 9, 7]], [[3, 0, 0], [9, 9, 8]]], dtype=float)
    assert inside(windows, region, tolerance_mm=0.0).tolist() == [True, False, False]
    assert inside(windows, region, tolerance_mm=0.6).tolist() == [True, False, True]


def test_volume_means_average_only_kept_windows() -> None:
    x = np.arange(6, dtype=float)[:, None]  # window features 0..5
    volume = np.array([0, 0, 0, 1, 1, 1])
    means, counts = volume_means(x, volume, 2, keep=np.array([True, True, False, False, False, True]))
    assert means[:, 0].tolist() == [0.5, 5.0] and counts.tolist() == [2, 1]
    keep = sample_windows(volume, 2, 2, np.random.default_rng(0))
    assert np.bincount(volume[keep]).tolist() == [2, 2]


def test_subject_ids_and_retrieval_known_answers() -> None:
    assert subject_ids(["site_a_003", "site_b_003", "odd"], r"_(\d+)$") == ["003", "003", None]
    sites = np.repeat([0, 1, 2], 4)
    subjects = [str(s) for s in np.tile(np.arange(4), 3)]
    rng = np.random.default_rng(0)
    anatomy = rng.normal(size=(4, 16))
    site_code = rng.normal(size=(3, 16))
    content = anatomy[np.tile(np.arange(4), 3)] + 0.05 * rng.normal(size=(12, 16))  # the subject, not the site
    style = 3 * site_code[sites] + 0.05 * rng.normal(size=(12, 16))  # the site, not the subject
    hit = cross_site_retrieval(content, sites, subjects)
    assert hit["top1"] == 1.0 and hit["queries"] == 12 and hit["chance"] == pytest.approx(0.25)
    miss = cross_site_retrieval(style, sites, subjects)
    assert miss["top1"] <= 0.5  # style picks any subject of the nearest site
    assert "skipped" in cross_site_retrieval(content, sites, [str(i) for i in range(12)])  # no repeated subject


def test_resample_onto_a_shifted_grid_and_assemble_round_trip() -> None:
    src = torch.randn(2, 6, 7, 8)
    # destination shifted by +1 voxel in x (array axis w) and by half a voxel in z (axis d)
    values, box = resample_onto(src, _affine((2.0, 2.0, 2.0), (0.0, 0.0, 0.0)), (6, 7, 8),
                                _affine((2.0, 2.0, 2.0), (2.0, 0.0, 1.0)))
    assert box == (slice(0, 5), slice(0, 7), slice(0, 7))
    expected = 0.5 * (src[:, :-1, :, 1:] + src[:, 1:, :, 1:])
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-5)
    assert resample_onto(src, _affine((1.0, 1.0, 1.0), (0, 0, 0)), (4, 4, 4),
                         _affine((1.0, 1.0, 1.0), (100.0, 0, 0))) is None

    latent = torch.randn(4, 5, 12, 20)
    windows = sliding_windows(latent, (8, 8, 8))
    torch.testing.assert_close(assemble(windows, window_origins((5, 12, 20), (8, 8, 8)), (5, 12, 20)), latent)


def test_same_subject_pairs_take_style_from_another_subject_at_the_target_site() -> None:
    scans = [Scan(key=f"{site}_{subject}", site=site, subject=str(subject), latent=torch.zeros(1), affine=np.eye(4))
             for site in range(3) for subject in range(2)]
    triples = same_subject_pairs(scans, limit=100, seed=0)
    assert len(triples) == 2 * 3 * 2  # 2 subjects, 3 x 2 ordered site pairs
    for a, b, donor in triples:
        assert scans[a].subject == scans[b].subject and scans[a].site != scans[b].site
        assert scans[donor].site == scans[b].site and scans[donor].subject != scans[a].subject
    assert len(same_subject_pairs(scans, limit=5, seed=0)) == 5
