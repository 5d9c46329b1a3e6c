"""extract-factors and evaluate-disentanglement on a tiny saved model and a synthetic latent cache."""

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from meduet.config import MeduetConfig, Paths
from meduet.data.latents import read_manifest, read_scale
from meduet.models.meduet import PRESETS, MeduetModel
from meduet.stages import StageError, evaluate_disentanglement, extract_factors
from meduet.artifacts.factors import load_factors
from meduet.artifacts.pretrained import load_meduet, save_meduet
from meduet.data.windows import sliding_windows, window_starts
from meduet.engine.probes import fit_probe, proportion_ci, site_probe
from meduet.evaluation.swap import swap_test, swapped_factors
from tests.stages.test_pretrain import _write_cache


def _save_tiny_model(paths: Paths, domains: list[str], scale: float) -> MeduetModel:
    """A randomly initialised tiny model saved in the pretrain stage's checkpoint format."""
    torch.manual_seed(0)
    config = dataclasses.replace(PRESETS["tiny"], num_domains=len(domains))
    student, teacher = MeduetModel(config), MeduetModel(config)
    save_meduet(paths.models / "pretrain" / "meduet.pt", student=student.state_dict(), teacher=teacher.state_dict(),
                architecture=config, config={}, domains=domains, scale_factor=scale, train_latents=[], steps=0)
    return teacher.eval()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    cfg = MeduetConfig.model_validate({"extract_factors": {"batch_size": 5},
                                       "evaluate_disentanglement": {"folds": 3, "swap_pairs": 2, "permutations": 20,
                                                                    "curve_permutations": 5, "curve_draws": 2,
                                                                    "window_counts": [1, 4],
                                                                    "subject_pattern": r"case(\d+)$",
                                                                    "counterfactual_pairs": 3}})
    paths = Paths.resolve(cfg, tmp_path_factory.mktemp("factors_project"))
    _write_cache(paths.latents, per_domain=3)  # six (4, 12, 12, 12) latents of two sites
    model = _save_tiny_model(paths, ["site_a", "site_b"], read_scale(paths.latents))
    return cfg, paths, model


# --------------------------------------------------------------------------- probe
def _blobs(separable: bool, n_per_class: int = 30, classes: int = 3, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(classes), n_per_class)
    x = rng.normal(size=(len(y), dim))
    if separable:
        x[:, :classes] += 4.0 * np.eye(classes)[y]  # class k shifted along axis k
    return x, y


@pytest.mark.parametrize("separable", [True, False])
def test_probe_beats_its_null_only_where_there_is_signal(separable: bool) -> None:
    x, y = _blobs(separable)
    result = site_probe(x, y, folds=5, permutations=50, seed=0)
    assert result["folds"] == 5 and len(result["fold_accuracies"]) == 5 and result["permutations"] == 50
    assert 0.2 < result["null_mean"] < 0.45 and result["null_mean"] <= result["null_p95"]  # chance is 1/3
    if separable:
        assert result["accuracy_mean"] >= 0.95 and result["above_null_p95"] and result["p_value"] < 0.05
    else:
        assert result["accuracy_mean"] <= 0.6 and not result["above_null_p95"] and result["p_value"] > 0.05, result


def test_probe_folds_never_exceed_the_rarest_class_and_need_two_samples_each() -> None:
    x, y = _blobs(True, n_per_class=3)
    assert site_probe(x, y, folds=5, permutations=0)["folds"] == 3
    with pytest.raises(ValueError, match="at least 2 samples"):
        site_probe(x[:7], y[:7], folds=5, permutations=0)  # class 2 has one sample


def test_wilson_interval_known_answers() -> None:
    assert proportion_ci(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)
    assert proportion_ci(0, 16)[0] == 0.0 and proportion_ci(16, 16)[1] == 1.0
    assert proportion_ci(0, 0) == [0.0, 1.0]


def test_probe_is_scale_invariant_and_predicts_labels() -> None:
    x, y = _blobs(True)
    probe = fit_probe(1000.0 * x + 50.0, y)  # standardised inside: the raw scale does not matter
    assert probe.predict(1000.0 * x[:5] + 50.0).shape == (5,)
    assert (probe.predict(1000.0 * x + 50.0) == y).mean() > 0.95


# --------------------------------------------------------------------------- windows
@pytest.mark.parametrize(("size", "window", "starts"), [(8, 8, [0]), (12, 8, [0, 4]), (16, 8, [0, 8]),
                                                        (20, 8, [0, 8, 12])])
def test_window_starts_tile_and_align_the_last_to_the_end(size: int, window: int, starts: list[int]) -> None:
    assert window_starts(size, window) == starts


def test_small_latents_are_zero_padded_to_one_window() -> None:
    latent = torch.ones(2, 5, 8, 12)
    windows = sliding_windows(latent, (8, 8, 8))
    assert windows.shape == (2, 2, 8, 8, 8)  # d padded to 8 (one window), w gives two windows
    assert windows[0, :, :1].abs().sum() == 0 and windows[0, :, 1:6].min() == 1  # centred: 1 before, 2 after


# --------------------------------------------------------------------------- stages
def test_extract_factors_averages_window_factors(project) -> None:
    cfg, paths, model = project
    result = extract_factors.run(cfg.extract_factors, paths, ray=cfg.ray)
    arrays, records, _ = load_factors(paths.factors)
    assert arrays["content"].shape == (6, 32) and arrays["style"].shape == (6, 8)  # E = 32, S = 0.25 E
    assert list(arrays["domain_index"]) == [0, 0, 0, 1, 1, 1]
    assert [r.key for r in records] == list(arrays["keys"]) and {r.windows for r in records} == {8}  # 2x2x2
    assert set(arrays["split"]) == {"train", "held_out"}
    assert result.metrics["volumes"] == 6 and result.metrics["per_site"] == {"site_a": 3, "site_b": 3}

    # By hand: the teacher on the 8 windows of the first latent, token mean then window mean.
    record = next(r for r in read_manifest(paths.latents) if r.key == records[0].key)
    latent = torch.from_numpy(np.load(paths.latents / record.latent)) * read_scale(paths.latents)
    windows = torch.stack([latent[:, i:i + 8, j:j + 8, k:k + 8] for i in (0, 4) for j in (0, 4) for k in (0, 4)])
    with torch.no_grad():
        content, style, _ = model.encode_full(windows)
    np.testing.assert_allclose(arrays["content"][0], content.mean((0, 1)).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(arrays["style"][0], style.mean((0, 1)).numpy(), rtol=1e-4, atol=1e-5)
    meta = json.loads((paths.factors / "manifest.json").read_text())
    assert meta["weights"] == "teacher" and meta["all_weights"] == ["teacher", "student"]
    assert meta["domains"] == ["site_a", "site_b"]

    # Per-window factors of both weights; the volume factors are their means.
    assert arrays["teacher_window_content"].shape == (48, 32) and arrays["student_window_style"].shape == (48, 8)
    np.testing.assert_allclose(arrays["teacher_window_content"][:8], content.mean(1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(arrays["content"], arrays["teacher_content"])
    assert not np.allclose(arrays["teacher_content"], arrays["student_content"])  # two different networks
    np.testing.assert_array_equal(arrays["window_volume"], np.repeat(np.arange(6), 8))
    # identity affine: window (0, 4, 0) in (d, h, w) covers x in [-0.5, 7.5], y in [3.5, 11.5], z in [-0.5, 7.5]
    np.testing.assert_allclose(arrays["window_box_mm"][2], [[-0.5, 3.5, -0.5], [7.5, 11.5, 7.5]])


def test_ray_tasks_give_the_factors_of_one_process(project) -> None:
    """Chunks of volumes encoded as Ray tasks on a local Ray (2 in flight) equal the in-process run."""
    cfg, paths, _ = project
    extract_factors.run(cfg.extract_factors, paths, ray=cfg.ray)
    one, records_one, _ = load_factors(paths.factors)
    parallel = cfg.extract_factors.model_copy(update={"workers": 2})
    result = extract_factors.run(parallel, paths, ray=cfg.ray.model_copy(update={"cpus_per_task": 1}))
    two, records_two, _ = load_factors(paths.factors)
    assert result.metrics["volumes"] == 6 and [r.key for r in records_two] == [r.key for r in records_one]
    for name in ("teacher_window_content", "student_window_style", "content", "style", "window_box_mm"):
        np.testing.assert_allclose(two[name], one[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(two["window_volume"], one["window_volume"])


def test_evaluate_writes_metrics_and_figure(project, caplog) -> None:
    cfg, paths, _ = project
    if not (paths.factors / "factors.npz").is_file():
        extract_factors.run(cfg.extract_factors, paths, ray=cfg.ray)
    with caplog.at_level(logging.INFO, logger="meduet.progress"):
        result = evaluate_disentanglement.run(cfg.evaluate_disentanglement, paths)
    # two weights' probes, the input baseline, two window curves, the swap and counterfactual tests
    progress = [r.getMessage().split(",")[0] for r in caplog.records if r.name == "meduet.progress"]
    assert progress == [f"evaluate-disentanglement: {i}/7 parts ({100 * i / 7:.0f}%)" for i in range(1, 8)]
    reports = paths.reports / "evaluate_disentanglement"
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["chance"] == 0.5 and metrics["volumes"] == 6
    for weights in ("teacher", "student"):
        for name in ("content", "style", "region_content", "region_style"):
            probe = metrics["by_weights"][weights][name]
            assert 0.0 <= probe["accuracy_mean"] <= 1.0 and probe["folds"] == 3 and probe["permutations"] == 20
            assert 0.0 < probe["p_value"] <= 1.0 and probe["null_mean"] <= probe["null_p95"]
            low, high = probe["ci95"]
            assert low <= probe["correct"] / probe["samples"] <= high and probe["samples"] == 6
    # Identity affines and equal shapes: every window is inside the region every volume covers.
    assert metrics["region"]["windows_kept"] == metrics["region"]["windows_total"] == 48
    # Cases case0..case2 at both sites: each volume's subject is one of the 3 at the other site.
    retrieval = metrics["probes"]["retrieval_content"]
    assert retrieval["queries"] == 6 and retrieval["chance"] == pytest.approx(1 / 3)
    assert metrics["subjects_at_several_sites"] == 3
    curve = metrics["windows_curve"]["content"]
    assert [p["windows"] for p in curve] == [1, 4, 8] and curve[-1]["all"] and curve[0]["draws"] == 2
    counterfactual = metrics["counterfactual"]
    assert counterfactual["pairs"] == 3 and "psnr_swap" not in counterfactual  # no VAE in this project
    assert counterfactual["latent_mse_a"] > 0 and 0.0 <= counterfactual["swap_closer_than_a"] <= 1.0
    assert set(metrics["goals"]) >= {"style_accuracy_at_least_0.95", "retrieval_content_top1_at_least_0.90"}
    # The synthetic sites differ by a latent offset and gain: the input statistics name the site.
    assert metrics["latent_statistics_accuracy"] == 1.0
    swap = metrics["swap"]
    assert swap["pairs"] == 2 and metrics["swap_accuracy"] == swap["style_closer_to_b_roundtrip"]
    for key in ("style_closer_to_b_roundtrip", "content_closer_to_a_roundtrip", "style_predicted_as_b",
                "self_style_predicted_as_a"):
        assert swap[key] in (0.0, 0.5, 1.0)  # 2 pairs
    assert "content_predicted_as_a" not in swap  # scores well only when content leaks the site
    assert -1.0 <= swap["content_cosine_to_a"] <= 1.0
    for figure in ("factors.png", "windows_curve.png", "retrieval.png"):
        assert (reports / figure).stat().st_size > 2000
    assert result.outputs["plot"] == reports / "factors.png"


def test_swapped_factors_reuse_the_decoder_halves_of_a_seed(project) -> None:
    cfg, paths, _ = project
    model, _ = load_meduet(paths.models / "pretrain" / "meduet.pt")
    windows = torch.randn(3, model.config.in_channels, *model.config.input_size)  # (3, C, d, h, w)
    with torch.no_grad():
        first = swapped_factors(model, windows, windows.flip(0), 2, seed=0)
        again = swapped_factors(model, windows, windows.flip(0), 2, seed=0)
        other = swapped_factors(model, windows, windows.flip(0), 2, seed=1)
    for a, b, c in zip(first, again, other, strict=True):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)  # other hidden halves, another prediction


def test_missing_inputs_are_clear_errors(tmp_path: Path) -> None:
    cfg = MeduetConfig()
    paths = Paths.resolve(cfg, tmp_path)
    with pytest.raises(StageError, match="encode-latents"):
        extract_factors.run(cfg.extract_factors, paths, ray=cfg.ray)
    with pytest.raises(StageError, match="extract-factors"):
        evaluate_disentanglement.run(cfg.evaluate_disentanglement, paths)


def _factors(windows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """An exactly disentangled encoder: content = channel 0's mean (anatomy), style = channel 1's (site)."""
    return windows[:, :1].mean((0, 2, 3, 4)).numpy(), windows[:, 1:2].mean((0, 2, 3, 4)).numpy()


@pytest.mark.parametrize(("swap", "expected"), [
    # a perfect swap: A's content, B's style
    (lambda a, b: (_factors(a)[0], _factors(b)[1]), {"style_closer_to_b_roundtrip": 1.0, "style_predicted_as_b": 1.0,
                                                     "content_closer_to_a_roundtrip": 1.0}),
    # a decoder that ignores the partner's style: nothing is swapped
    (lambda a, b: _factors(a), {"style_closer_to_b_roundtrip": 0.0, "style_predicted_as_b": 0.0,
                                "content_closer_to_a_roundtrip": 1.0}),
    # a decoder that copies B whole: style swapped, but content lost
    (lambda a, b: _factors(b), {"style_closer_to_b_roundtrip": 1.0, "style_predicted_as_b": 1.0,
                                "content_closer_to_a_roundtrip": 0.0}),
])
def test_swap_test_scores_known_swaps(swap, expected) -> None:
    rng = np.random.default_rng(0)
    y = np.array([0, 0, 0, 1, 1, 1])
    # six volumes: channel 0 = a subject's anatomy level (any), channel 1 = the site's style level
    windows = [torch.from_numpy(np.stack([np.full((2, 4, 4, 4), rng.normal()), np.full((2, 4, 4, 4), 5.0 * site)],
                                         axis=1).astype(np.float32)) + 0.01 * torch.randn(2, 2, 4, 4, 4)
               for site in y]  # (n=2, C=2, 4, 4, 4) each
    content, style = (np.stack(f) for f in zip(*(_factors(w) for w in windows)))
    result = swap_test(swap, windows, content, y, fit_probe(style, y), pairs=10, seed=0)
    assert result["pairs"] == 10 and result["self_style_predicted_as_a"] == 1.0
    for key, value in expected.items():
        assert result[key] == value, (key, result)


def test_too_few_volumes_per_site_skip_the_probes_but_write_every_output(tmp_path: Path) -> None:
    cfg = MeduetConfig.model_validate({"evaluate_disentanglement": {"permutations": 5, "swap_pairs": 1,
                                                                    "counterfactual_pairs": 1, "jobs": 1}})
    paths = Paths.resolve(cfg, tmp_path)
    _write_cache(paths.latents, per_domain=1)  # one volume per site: no cross-validation possible
    _save_tiny_model(paths, ["site_a", "site_b"], read_scale(paths.latents))
    extract_factors.run(cfg.extract_factors, paths, ray=cfg.ray)
    result = evaluate_disentanglement.run(cfg.evaluate_disentanglement, paths)
    assert "2 volumes of every site" in result.metrics["skipped"] and result.metrics["content_accuracy"] is None
    assert result.metrics["goals"]["style_accuracy_at_least_0.95"]["met"] is None
    for output in ("metrics", "plot", "curve", "retrieval"):
        assert result.outputs[output].is_file()
