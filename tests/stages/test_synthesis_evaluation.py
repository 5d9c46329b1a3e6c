"""train-evaluator (real Ray) and evaluate-synthesis on a tiny project with a stand-in synthesis store.

Two sites scan the same two subjects (site_b: +60 HU and more noise); subject 1 is held out.
The stand-in store (``tests.evaluation.fake_synthesis``) "translates" by histogram matching to
a train volume of the target site, which is exactly the histogram-matched baseline: the
translation can never beat it, a known answer for the counterfactual share.
"""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from meduet.artifacts.evaluator import evaluator_path, load_evaluator
from meduet.artifacts.vae import save_vae
from meduet.config import MeduetConfig, Paths, TrainEvaluatorConfig
from meduet.data.labelled import labelled_cases
from meduet.data.windows import sliding_windows
from meduet.evaluation.counterfactual import ImageCache
from meduet.evaluation.scoring import VolumeReader
from meduet.models.vae import PRESETS, build_vae
from meduet.stages import StageError, encode_latents, evaluate_synthesis, harmonize, train_evaluator
from tests.evaluation.fake_synthesis import write_fake_store
from tests.harmonize.synth import phantom, write_msd

CROP = [16, 16, 16]


def _site_b(image: sitk.Image, seed: int) -> sitk.Image:
    noisy = sitk.GetArrayFromImage(image).astype(np.float32) + 60
    noisy += np.random.default_rng(seed).normal(0, 25, noisy.shape)
    out = sitk.GetImageFromArray(noisy.astype(np.int16))
    out.CopyInformation(image)
    return out


def labelled_project(root: Path) -> tuple[MeduetConfig, Paths]:
    """Harmonized images and labels of both sites, a (random) tiny VAE and its latent cache (subject 1 held out)."""
    datasets = []
    for site in ("site_a", "site_b"):
        cases = {}
        for subject in range(2):
            image, label = phantom(seed=subject)  # the same anatomy at both sites
            cases[f"{site}_{subject}"] = (image if site == "site_a" else _site_b(image, subject), label)
        write_msd(root / "raw" / site, cases)
        datasets.append({"name": site, "root": f"raw/{site}", "domain": site})
    cfg = MeduetConfig.model_validate({
        "harmonize": {"datasets": datasets, "target_spacing": [2.0, 2.0, 2.0], "min_size": [16, 16, 16],
                      "divisible_by": 16, "workers": 1},
        "encode_latents": {"workers": 1},
        "train_evaluator": {"channels": [4, 8], "crop_size": CROP, "steps": 6, "crops_per_site": 2,
                            "warmup_steps": 1, "log_every": 2, "min_body_fraction": 0.3},
        "evaluate_synthesis": {"bootstrap": 20, "real_crops_per_volume": 3, "ms_ssim_kernel": 3, "ms_ssim_scales": 2,
                               "ssim_window": 3},
        "ray": {"checkpoint_every": 3, "local_num_cpus": 2, "max_failures": 0},
    })
    paths = Paths.resolve(cfg, root)
    harmonize.run(cfg.harmonize, paths)
    torch.manual_seed(0)
    keys = ["site_a__site_a_0", "site_b__site_b_0"], ["site_a__site_a_1", "site_b__site_b_1"]
    save_vae(paths.models / "vae" / "vae.pt", state=build_vae(PRESETS["tiny"]).state_dict(),
             architecture=PRESETS["tiny"], config={}, train_cases=keys[0], held_out_cases=keys[1])
    encode_latents.run(cfg.encode_latents, paths, ray=cfg.ray)
    return cfg, paths


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    cfg, paths = labelled_project(tmp_path_factory.mktemp("synthesis_project"))
    trained = train_evaluator.run(cfg.train_evaluator, paths, ray=cfg.ray)
    write_fake_store(paths.harmonized, paths.latents, paths.synthesis, samples_per_site=3, crop=tuple(CROP))
    return cfg, paths, trained


def test_train_evaluator_saves_the_model_and_judges_it_on_the_held_out_split(project) -> None:
    cfg, paths, result = project
    metrics = result.metrics
    assert (metrics["train_cases"], metrics["held_out_cases"], metrics["steps"]) == (2, 2, 6)
    assert metrics["sites"] == ["site_a", "site_b"] and metrics["label_ids"] == [0, 1, 2]
    assert 0 <= metrics["site_accuracy"] <= 1 and metrics["site_crops"] >= 2
    assert set(metrics["dice_per_organ"]) <= {"1", "2"} and all(0 <= d <= 1 for d in metrics["dice_per_organ"].values())
    model, meta = load_evaluator(paths.models / "evaluator" / "evaluator.pt")
    assert meta["train_cases"] == ["site_a__site_a_0", "site_b__site_b_0"] and meta["label_ids"] == [0, 1, 2]
    assert model.config.channels == (4, 8) and meta["config"] == cfg.train_evaluator.model_dump(mode="json")
    history = (paths.reports / "train_evaluator" / "history.csv").read_text().splitlines()
    assert history[0].startswith("step,loss,site_ce,seg_dice_ce,site_acc") and len(history) == 1 + 4  # 2, 3, 4, 6


# 3 crops a site: a bootstrap resample that draws one crop three times has a zero covariance, whose matrix square
# root SciPy warns about (the demo's 32 crops a site never printed it); the distances' checks are below.
@pytest.mark.filterwarnings("ignore:Matrix is singular:scipy.linalg.LinAlgWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in scalar divide:RuntimeWarning")
def test_evaluate_synthesis_measures_the_store_with_known_answers(project, caplog) -> None:
    cfg, paths, _ = project
    with caplog.at_level(logging.INFO, logger="meduet.progress"):
        metrics = evaluate_synthesis.run(cfg.evaluate_synthesis, paths).metrics
    assert (metrics["translations"], metrics["generated"]) == (2, 6)  # 2 held-out scans x 1 other site; 3 x 2 sites
    progress = [r.getMessage().split(",")[0] for r in caplog.records if r.name == "meduet.progress"]
    assert progress == ["evaluate_synthesis: 1/2 translations (50%)", "evaluate_synthesis: 2/2 translations (100%)"]
    cf = metrics["counterfactual"]
    assert cf["pairs"] == 2 and cf["closer_than_baselines"] == 0.0  # the stand-in IS the histogram-matched baseline
    assert cf["translation"]["mae_hu"]["mean"] == pytest.approx(cf["a_histmatch"]["mae_hu"]["mean"])
    model, saved = load_evaluator(evaluator_path(paths))
    reader = VolumeReader.from_section(model, TrainEvaluatorConfig.model_validate(saved["config"]), (0.0, 1.0))
    images = {c.key: c.image for c in labelled_cases(paths.harmonized, paths.latents)}
    read = 0
    for row in metrics["rows"]:  # the real s@B is the same subject at the other site
        assert row["counterfactual"]["b"].rsplit("_", 1)[1] == row["source"].rsplit("_", 1)[1]
        assert row["counterfactual"]["histogram_reference"].endswith("_0")  # a train volume, never s@B
        # the reference reading is the evaluator's on that very s@B (and a site of the evaluator on its round trip)
        real_b = ImageCache(None, 1.0, 0).read(images[row["counterfactual"]["b"]])[0]
        expected = saved["sites"][int(reader.site(real_b).mean(0).argmax())]
        assert row["counterfactual"]["read_as"]["b"] == expected and row["counterfactual"]["read_as"]["b_vae"] in \
            saved["sites"]
        read += expected == row["target_site"]
    assert cf["b_read_as_target_site"] == read / 2 and cf["b_read_as_target_site_ci95"][0] <= read / 2
    content = metrics["content"]
    assert {"translation", "a_vae", "a"} <= set(content) and content["ratio_to_roundtrip_ci95"][0] <= \
        content["ratio_to_roundtrip_ci95"][1]
    fd = metrics["generation"]["frechet_distance"]
    assert set(fd) == {"site_a", "site_b", "overall"} and fd["overall"]["fd"] >= 0 and fd["overall"]["floor"] >= 0
    measured = [v for v in fd.values() if "skipped" not in v]
    assert fd["overall"] in measured and all(
        np.isfinite([v["kid"], v["kid_floor"], *v["kid_ci95"], *v["kid_floor_ci95"]]).all() for v in measured)
    ceiling = metrics["generation"]["frechet_distance_vae_roundtrip"]
    assert set(ceiling) == {"site_a", "site_b", "overall"} and ceiling["overall"]["samples"] == fd["overall"]["samples"]
    assert set(metrics["generation"]["ms_ssim"]["site_a"]) == {"generated", "real"}
    assert 0 <= metrics["translation_style_accuracy"] <= 1 and 0 <= metrics["generation_style_accuracy"] <= 1
    assert set(metrics["median_hu"]) == {"site_a", "site_b"}
    assert all(goal["met"] in (True, False) for goal in metrics["goals"].values())
    assert metrics["goals"]["counterfactual_closer_than_baselines_at_least_0.80"]["met"] is False
    saved = json.loads((paths.reports / "evaluate_synthesis" / "metrics.json").read_text())
    assert saved["goals"] == json.loads(json.dumps(metrics["goals"]))
    for figure in ("pairs.png", "summary.png"):
        assert (paths.reports / "evaluate_synthesis" / figure).stat().st_size > 5000


def test_missing_inputs_are_named(project, tmp_path) -> None:
    cfg, paths, _ = project
    other = Paths(**{**paths.__dict__, "synthesis": tmp_path / "none"})
    with pytest.raises(StageError, match=r"none/manifest.csv: no synthesized images; run the synthesize stage"):
        evaluate_synthesis.run(cfg.evaluate_synthesis, other)
    other = Paths(**{**paths.__dict__, "models": tmp_path / "models"})
    with pytest.raises(StageError, match=r"evaluator.pt: no synthesis evaluator; run the train-evaluator stage"):
        evaluate_synthesis.run(cfg.evaluate_synthesis, other)


def test_the_vae_ceiling_crops_are_the_held_out_real_crops_round_trips(project) -> None:
    cfg, paths, _ = project
    inputs = evaluate_synthesis.SynthesisInputs(cfg.evaluate_synthesis, paths)
    crops = evaluate_synthesis.crop_sets(inputs, cfg.evaluate_synthesis)
    for case in (c for c in inputs.cases.values() if c.split == "held_out"):  # one held-out volume a site
        real, trips = crops["real"][case.site, "held_out"], crops["roundtrip"][case.site]
        assert 1 <= len(real) == len(trips) <= cfg.evaluate_synthesis.real_crops_per_volume
        grid = sliding_windows(inputs.images.read(case.image)[0], tuple(CROP))  # (n, 1, *CROP)
        decoded = sliding_windows(inputs.roundtrip(case), tuple(CROP))
        assert not torch.equal(grid, decoded)
        for crop, trip in zip(real, trips):  # the round trip's crop at the real crop's grid position
            where = [n for n, window in enumerate(grid) if torch.equal(window, crop)]
            assert len(where) == 1 and torch.equal(decoded[where[0]], trip)
    assert set(crops["roundtrip"]) == {"site_a", "site_b"}


def test_a_textured_store_is_also_scored_against_the_round_trip_with_the_same_texture(project) -> None:
    cfg, paths, _ = project
    inputs = evaluate_synthesis.SynthesisInputs(cfg.evaluate_synthesis, paths)
    threshold = cfg.synthesize.body_threshold
    inputs.meta |= {"settings": {"body_threshold": threshold}, "value_range": [0.0, 1.0],
                    "site_textures": {site: {"amplitude": 0.0, "sigma": 1.0} for site in inputs.sites}}
    rows = evaluate_synthesis.translation_rows(inputs, cfg.evaluate_synthesis)
    content = evaluate_synthesis.content_summary(rows, inputs.label_ids, cfg.evaluate_synthesis)
    # no noise: the textured round trip is the round trip, and so are its Dice and ratio
    assert content["a_vae_textured"] == content["a_vae"]
    assert content["ratio_to_textured_roundtrip"] == content["ratio_to_roundtrip"]
    inputs.meta["site_textures"] = {site: {"amplitude": 0.05, "sigma": 0.0} for site in inputs.sites}
    record = next(r for r in inputs.records if r.kind == "translation")
    case = inputs.case(record.source_key)
    bare, textured = inputs.roundtrip(case), inputs.textured_roundtrip(case, record)
    body = bare > threshold
    torch.testing.assert_close(textured[~body], bare[~body], rtol=0, atol=0)  # air untouched
    inside = body & (bare > 0.2) & (bare < 0.8)  # away from the clipping to the value range
    assert (textured - bare)[inside].std() == pytest.approx(0.05, rel=0.1)
    torch.testing.assert_close(inputs.textured_roundtrip(case, record), textured, rtol=0, atol=0)  # the record's seed
    rows = evaluate_synthesis.translation_rows(inputs, cfg.evaluate_synthesis)
    assert all(set(r["dice"]) == {"translation", "a", "a_vae", "a_vae_textured"} for r in rows)
    inputs.meta["site_textures"] = {}  # an untextured store: no textured reference
    rows = evaluate_synthesis.translation_rows(inputs, cfg.evaluate_synthesis)
    assert "ratio_to_textured_roundtrip" not in evaluate_synthesis.content_summary(rows, inputs.label_ids,
                                                                                  cfg.evaluate_synthesis)
