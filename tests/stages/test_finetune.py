"""finetune: a tiny segmenter trained through the stage (real Ray) on harmonized phantoms encoded by a tiny VAE
(the session's uninterrupted run of tests/stages/trainers.py, shared with the kill/resume test)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from meduet.artifacts.segmenter import load_segmenter
from meduet.config import MeduetConfig, Paths, load_config
from meduet.data.body import body_channels
from meduet.data.latents import LatentRecord, read_manifest, read_scale
from meduet.engine.finetune_runs import SegmentationData, labelled_cases, large_organs
from meduet.engine.finetune_training import CaseFiles, SegmentationCropSampler, read_case
from meduet.engine.segmentation import pad_case, segment_volume
from meduet.harmonize.manifest import CaseRecord
from meduet.stages import StageError, finetune
from tests.stages.trainers import FINETUNE_SITES, TRAINERS

FINETUNE = TRAINERS["finetune"]
STEPS = FINETUNE.steps
SITES = FINETUNE_SITES


@pytest.fixture(scope="module")
def trained(uninterrupted_run):
    """The session's uninterrupted finetune run (tests/stages/trainers.py): config, paths, metrics."""
    root = uninterrupted_run("finetune")
    cfg = load_config(root / "params.yaml")
    return cfg, Paths.resolve(cfg, root), json.loads((root / "reports" / "finetune" / "metrics.json").read_text())


def test_training_scores_held_out_sites_and_saves_a_model_predict_can_load(trained) -> None:
    cfg, paths, metrics = trained
    assert metrics["steps"] == STEPS and metrics["labelled_cases"] == 4 and metrics["held_out_cases"] == 2
    assert metrics["labelled_fraction"] == {"site_a": 1.0, "site_b": 1.0}
    for score in ("dice", "hd95", "surface_dice"):
        assert set(metrics[score]["by_site"]) == set(SITES) and set(metrics[score]["by_organ"]) == {"body", "liver"}
    # the body is the phantom's bright ellipsoid: found on the held-out cases of both sites
    assert min(metrics["dice"]["by_site"][s]["body"] for s in SITES) > 0.8, metrics["dice"]
    assert metrics["final"]["total"] < metrics["first"]["total"]
    rows = list(csv.DictReader(open(paths.reports / "finetune" / "scores.csv")))
    assert sorted((r["case"], r["organ"]) for r in rows) == [
        (f"{s}__{s}_2", organ) for s in SITES for organ in ("body", "liver")]
    for row in rows:  # each organ's true volume, from its harmonized label map
        label = sitk.ReadImage(str(paths.harmonized / _label_file(paths, row["case"])))
        voxels = int((sitk.GetArrayFromImage(label) == cfg.finetune.label_names.index(row["organ"])).sum())
        assert float(row["volume_ml"]) == pytest.approx(voxels * np.prod(label.GetSpacing()) / 1000, abs=0.01)
    large = metrics["large_organs"]
    volumes = {o: np.mean([float(r["volume_ml"]) for r in rows if r["organ"] == o]) for o in ("body", "liver")}
    assert large["min_ml"] == cfg.finetune.large_organ_min_ml
    assert large["organs"] == sorted(o for o, v in volumes.items() if v >= cfg.finetune.large_organ_min_ml)
    history = (paths.reports / "finetune" / "history.csv").read_text().splitlines()
    assert history[0].startswith("step,total") and len(history) == 1 + STEPS
    assert (paths.reports / "finetune" / "loss.png").stat().st_size > 2000

    model, vae, meta = load_segmenter(paths.models / "finetune")
    assert model.config.decoder == "refine" and model.config.num_classes == 3
    assert meta["harmonize"] == cfg.harmonize.model_dump(mode="json") and meta["labels"] == ["background", "body",
                                                                                               "liver"]
    assert meta["labelled_cases"] == [f"{s}__{s}_{i}" for s in SITES for i in (0, 1)]
    assert meta["scale_factor"] == read_scale(paths.latents) and meta["steps"] == STEPS
    assert isinstance(vae, torch.nn.Module)


def _label_file(paths: Paths, key: str) -> str:
    """The harmonized label map of case ``key``, relative to the harmonized folder."""
    return next(r["label"] for r in csv.DictReader(open(paths.harmonized / "manifest.csv")) if r["key"] == key)


def test_large_organs_are_those_of_large_true_volume_and_their_dice_is_averaged_per_case() -> None:
    rows = [{"case": case, "organ": organ, "dice": dice, "volume_ml": ml}
            for case, organ, dice, ml in [("a", "liver", 0.9, 900.0), ("a", "lung", 0.0, 700.0),
                                          ("a", "spleen", 0.5, 150.0), ("b", "liver", 0.7, 1100.0),
                                          ("b", "spleen", 0.1, 160.0), ("c", "lung", 0.4, 200.0)]]
    large = large_organs(rows, 500.0)
    # lung: mean volume (700 + 200) / 2 = 450 < 500; liver 1000 mL
    assert large["organs"] == ["liver"] and large["mean_volume_ml"] == {"liver": 1000.0}
    assert large["dice"] == pytest.approx(0.8) and large["cases"] == 2 and large["by_organ"] == {"liver": 0.8}
    assert large["ci95"][0] <= 0.8 <= large["ci95"][1] and 0.7 <= large["ci95"][0]
    both = large_organs(rows, 400.0)  # the lung too; case a's mean over its two large organs counts once
    assert both["organs"] == ["liver", "lung"] and both["dice"] == round(np.mean([0.45, 0.7, 0.4]), 4)
    assert large_organs(rows, 5000.0)["dice"] is None
    goal = finetune.large_organ_goal(large, "all")
    assert goal["large_organ_dice_all_labels"] == large["dice"]
    assert goal["goals"]["all_labels_large_organ_dice_at_least_0.85"] == {
        "value": large["dice"], "target": 0.85, "organs": ["liver"], "met": False}
    assert finetune.large_organ_goal(large, 1) == {}  # the goal is for all labels only


def test_labels_per_site_keeps_the_first_cases_of_each_site() -> None:
    records = [LatentRecord(key=f"{site}__c{i}", dataset=site, case_id=f"c{i}", domain=site, domain_index=0,
                            body_part="x", split="train", latent="", latent_shape=[], affine=[], orig_spacing=[],
                            image_sha256="", vae_sha256="") for site in ("b", "a") for i in (2, 0, 1)]
    assert [r.key for r in labelled_cases(records, 1)] == ["a__c0", "b__c0"]
    assert [r.key for r in labelled_cases(records, 2)] == ["a__c0", "a__c1", "b__c0", "b__c1"]
    assert len(labelled_cases(records, "all")) == len(labelled_cases(records, 4)) == 6


def test_a_cases_files_carry_its_harmonization_floor(tmp_path: Path) -> None:
    latent = LatentRecord(key="a__c0", dataset="a", case_id="c0", domain="a", domain_index=0, body_part="x",
                          split="train", latent="a__c0.npy", latent_shape=[], affine=[], orig_spacing=[],
                          image_sha256="", vae_sha256="")
    case = CaseRecord(key="a__c0", dataset="a", case_id="c0", domain="a", body_part="x", split="train", status="ok",
                      image="a/imagesTr/c0.nii.gz", label="a/labelsTr/c0.nii.gz", window=[-175.0, 250.0, -1.0, 1.0])
    data = SegmentationData(records=[latent], harmonized={"a__c0": case}, scale=1.0, input_hashes={})
    files = data.files(Paths.resolve(MeduetConfig(), tmp_path), latent)
    assert files.floor == -1.0  # what training pads with and scoring passes to segment_volume, as predict does
    assert files.image.endswith("a/imagesTr/c0.nii.gz") and files.label.endswith("a/labelsTr/c0.nii.gz")


def test_each_seed_labels_the_next_subjects_of_each_site() -> None:
    records = [LatentRecord(key=f"{site}__c{i}", dataset=site, case_id=f"c{i}", domain=site, domain_index=0,
                            body_part="x", split="train", latent="", latent_shape=[], affine=[], orig_spacing=[],
                            image_sha256="", vae_sha256="") for site in ("a", "b") for i in range(5)]
    chosen = {seed: [r.key for r in labelled_cases(records, 1, seed) if r.domain == "a"] for seed in range(6)}
    assert chosen == {0: ["a__c0"], 1: ["a__c1"], 2: ["a__c2"], 3: ["a__c3"], 4: ["a__c4"], 5: ["a__c0"]}
    assert [r.key for r in labelled_cases(records, 2, 2) if r.domain == "b"] == ["b__c0", "b__c4"]  # wraps round
    assert len(labelled_cases(records, 7, 3)) == 10  # never more than a site has, never twice the same
    assert len({r.key for r in labelled_cases(records, 4, 1)}) == 8
    assert labelled_cases(records, "all", 1) == labelled_cases(records, "all", 0)


def test_windows_align_latent_image_and_label_and_depend_on_the_step_alone() -> None:
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(4, 6, 10, 12)).astype(np.float32)  # d smaller than the window: padded
    image = np.kron(latent[0], np.ones((4, 4, 4), dtype=np.float32))  # each latent voxel's 4^3 image block
    label = (image > 1.0).astype(np.uint8)
    sampler = SegmentationCropSampler([(latent, image, label)], (8, 8, 8), 4, seed=3, foreground_fraction=0.5)
    x, im, lab = sampler.batch(7, 6)
    assert x.shape == (6, 4, 8, 8, 8) and im.shape == lab.shape == (6, 1, 32, 32, 32)
    # the image window repeats its latent window's first channel 4x along every axis: the same voxels
    assert torch.equal(im[:, 0], x[:, 0].repeat_interleave(4, 1).repeat_interleave(4, 2).repeat_interleave(4, 3))
    assert torch.equal(lab[:, 0], (im[:, 0] > 1.0).long())
    again = sampler.batch(7, 6)
    assert all(torch.equal(a, b) for a, b in zip((x, im, lab), again))
    assert not torch.equal(sampler.batch(8, 6)[0], x)
    padded, big, _, before = pad_case(latent, image, label, (8, 8, 8), 4)
    assert padded.shape == (4, 8, 10, 12) and big.shape == (32, 40, 48) and list(before) == [1, 0, 0]


def test_synthesized_cases_give_their_share_of_windows_and_real_only_runs_draw_as_before() -> None:
    cases = [(np.full((4, 8, 8, 8), float(n), np.float32), np.zeros((32, 32, 32), np.float32),
              np.zeros((32, 32, 32), np.uint8)) for n in range(4)]  # each case's latent holds its index

    def drawn(sampler: SegmentationCropSampler) -> np.ndarray:
        return np.concatenate([sampler.batch(step, 8)[0][:, 0, 0, 0, 0].numpy() for step in range(50)]).astype(int)

    mixed = drawn(SegmentationCropSampler(cases, (8, 8, 8), 4, seed=0, synthetic=[False, False, True, True],
                                          synthetic_fraction=0.25))
    assert set(mixed) == {0, 1, 2, 3}
    assert abs(np.isin(mixed, [2, 3]).mean() - 0.25) < 0.06  # 400 windows: a quarter from the two synthesized
    uniform = drawn(SegmentationCropSampler(cases, (8, 8, 8), 4, seed=0))
    assert abs(np.isin(uniform, [2, 3]).mean() - 0.5) < 0.08
    real = drawn(SegmentationCropSampler(cases, (8, 8, 8), 4, seed=0, synthetic=[False] * 4))
    np.testing.assert_array_equal(real, uniform)  # no synthesized case: the draws of before, not a new stream


def test_harmonization_settings_other_than_the_datas_are_refused(trained, tmp_path: Path) -> None:
    cfg, paths, _ = trained
    other = cfg.harmonize.model_copy(update={"target_spacing": (1.5, 1.5, 1.5)})
    with pytest.raises(StageError, match="harmonized with other settings"):
        finetune.run(cfg.finetune, paths, ray=cfg.ray, harmonize=other)
    empty = Paths.resolve(cfg, tmp_path)
    with pytest.raises(StageError, match="run the encode-latents stage first"):
        finetune.run(cfg.finetune, empty, ray=cfg.ray, harmonize=cfg.harmonize)


def test_the_saved_model_segments_a_held_out_case_as_the_stage_scored_it(trained) -> None:
    _, paths, metrics = trained
    model, _, meta = load_segmenter(paths.models / "finetune")
    record = next(r for r in read_manifest(paths.latents) if r.split == "held_out")
    files = CaseFiles(str(paths.latents / record.latent),
                      str(paths.harmonized / f"{record.dataset}/imagesTr/{record.case_id}.nii.gz"),
                      str(paths.harmonized / f"{record.dataset}/labelsTr/{record.case_id}.nii.gz"))
    latent, image, label = read_case(files, meta["scale_factor"])
    pred = segment_volume(model, latent, image, overlap=meta["config"]["overlap"], batch_size=4)
    assert pred.shape == label.shape == sitk.GetArrayViewFromImage(sitk.ReadImage(files.image)).shape
    body = pred == 1
    dice = 2 * (body & (label == 1)).sum() / (body.sum() + (label == 1).sum())
    assert dice == pytest.approx(metrics["dice"]["by_site"][record.domain]["body"], abs=1e-3)


@pytest.mark.parametrize("balance, share", [("case", 1 / 6), ("dataset", 1 / 2)])
def test_dataset_balance_gives_a_class_only_one_case_holds_as_many_windows_as_the_others(balance: str,
                                                                                          share: float) -> None:
    def case(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        label = np.zeros((64, 64, 64), np.uint8)
        label[56:, 56:, 56:] = 1  # every case: class 1 in the far corner
        if n == 0:
            label[:4, :4, :4] = 2  # only case 0: class 2 in the near corner, never in a window with class 1
        return np.full((4, 16, 16, 16), float(n), np.float32), np.zeros((64, 64, 64), np.float32), label

    sampler = SegmentationCropSampler([case(n) for n in range(3)], (8, 8, 8), 4, seed=0, foreground_fraction=1.0,
                                      foreground_balance=balance)
    batches = [sampler.batch(step, 8) for step in range(100)]  # 800 windows
    has_class_2 = np.concatenate([(lab == 2).flatten(1).any(1).numpy() for _, _, lab in batches])
    cases = np.concatenate([x[:, 0, 0, 0, 0].numpy() for x, _, _ in batches]).astype(int)
    assert abs(has_class_2.mean() - share) < 0.05  # case: 1/3 of the windows from case 0, half of those
    assert set(cases[has_class_2]) == {0}
    with pytest.raises(ValueError, match="foreground_balance"):
        SegmentationCropSampler([case(0)], (8, 8, 8), 4, seed=0, foreground_balance="site")


def test_body_context_windows_carry_the_whole_cases_context_over_the_same_voxels() -> None:
    rng = np.random.default_rng(1)
    latent = rng.normal(size=(4, 8, 10, 12)).astype(np.float32)
    image = np.zeros((32, 40, 48), np.float32)
    image[4:28, 6:34, 8:40] = 0.5  # a box of tissue with an air-dark hole: the hole is body
    image[10:20, 14:24, 16:30] = 0.0
    label = (image > 0).astype(np.uint8)
    plain = SegmentationCropSampler([(latent, image, label)], (8, 8, 8), 4, seed=3)
    context = SegmentationCropSampler([(latent, image, label)], (8, 8, 8), 4, seed=3, body_context=True)
    x, im, lab = context.batch(5, 6)
    x0, im0, lab0 = plain.batch(5, 6)
    assert im.shape == (6, 4, 32, 32, 32) and torch.equal(x, x0) and torch.equal(lab, lab0)
    assert torch.equal(im[:, :1], im0)  # the intensity channel is the plain sampler's window
    whole = torch.from_numpy(body_channels(image, 0.0))  # (3, D, H, W) of the whole case, not of a window
    for window, corner in zip(im, _corners(x, latent)):
        box = tuple(slice(4 * c, 4 * c + 32) for c in corner)
        assert torch.equal(window[1:], whole[(slice(None), *box)])


def test_a_window_below_zero_pads_with_its_own_floor_and_measures_the_body_above_it() -> None:
    # harmonized to [-1, 1] (b_min -1): air is -1, and a case smaller than the window is padded with it
    rng = np.random.default_rng(2)
    latent = rng.normal(size=(4, 6, 10, 12)).astype(np.float32)
    image = np.full((24, 40, 48), -1.0, np.float32)
    image[4:20, 6:34, 8:40] = -0.5  # fat: below 0, above air
    image[6:18, 10:20, 12:20] = 0.3  # an organ
    image[8:16, 14:24, 24:36] = -0.98  # an air-dark lung: body
    label = (image > -0.5).astype(np.uint8)
    sampler = SegmentationCropSampler([(latent, image, label)], (8, 8, 8), 4, seed=3, body_context=True,
                                      floors=[-1.0])
    x, im, _ = sampler.batch(5, 6)
    _, big, _, _ = pad_case(latent, image, label, (8, 8, 8), 4, image_fill=-1.0)
    whole = torch.from_numpy(body_channels(big, -1.0))
    assert whole[0].sum() == 16 * 28 * 32  # the box, lung included; above 0.0, the organ alone
    padded_latent = pad_case(latent, image, label, (8, 8, 8), 4)[0]
    for window, corner in zip(im, _corners(x, padded_latent)):
        box = tuple(slice(4 * c, 4 * c + 32) for c in corner)
        assert torch.equal(window[0], torch.from_numpy(big[box]))
        assert torch.equal(window[1:], whole[(slice(None), *box)])
    with pytest.raises(ValueError, match="2 floors for 1 cases"):
        SegmentationCropSampler([(latent, image, label)], (8, 8, 8), 4, seed=3, floors=[-1.0, 0.0])


def _corners(windows: torch.Tensor, latent: np.ndarray) -> list[tuple[int, int, int]]:
    """Where each latent window lies in ``latent`` (found by its values: random latents do not repeat)."""
    corners = []
    for w in windows.numpy():
        hits = [(i, j, k) for i in range(latent.shape[1] - 7) for j in range(latent.shape[2] - 7)
                for k in range(latent.shape[3] - 7) if np.array_equal(latent[:, i:i + 8, j:j + 8, k:k + 8], w)]
        assert len(hits) == 1
        corners.append(hits[0])
    return corners
