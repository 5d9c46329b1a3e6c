"""finetune-sweep: label efficiency and leave-one-site-out cells on the finetune test project (real local Ray)."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from meduet.artifacts.pretrained import meduet_path
from meduet.artifacts.synthesis import AUGMENTATIONS, LATENTS, SynthesisRecord, write_synthesis
from meduet.config import MeduetConfig, Paths, load_config
from meduet.data.latents import read_manifest, save_array
from meduet.engine.finetune_runs import backbone_source, read_scores, segmentation_data
from meduet.engine.finetune_training import CaseFiles, read_case
from meduet.io.images import write_image
from meduet.stages import StageError, finetune_sweep
from tests.stages.trainers import FINETUNE_SITES, checkpoints

# Two inits keep the nine cells (one per init and meduet+synth; then per left-out site scratch, meduet and
# meduet+style) near 140 s (this file took 163 s alone): each cell is a Ray Train run (~12 s of start-up for
# 4 steps). The mae init differs only in the file it reads: test below.
SWEEP = {"inits": ["scratch", "meduet"], "labels_per_site": [1], "seeds": [0], "leave_one_site_out": True,
         "synthetic_arm": True}


def write_augmentations(cfg: MeduetConfig, paths: Paths, *, keys: set[str] | None = None) -> list[SynthesisRecord]:
    """A stand-in synthesis store in ``meduet.artifacts.synthesis``'s contract: each training scan (of ``keys``, or
    all) "translated" by inverting its intensities on its own grid, with its scaled cached latent negated."""
    data = segmentation_data(paths, cfg.harmonize, cfg.finetune.label_names)
    records = []
    for record in data.split("train"):
        if keys is not None and record.key not in keys:
            continue
        key = f"aug__{record.key}__other"
        source = sitk.ReadImage(str(paths.harmonized / data.harmonized[record.key].image))
        image = sitk.GetImageFromArray(1.0 - sitk.GetArrayFromImage(source))
        image.CopyInformation(source)
        write_image(image, paths.synthesis / AUGMENTATIONS / f"{key}.nii.gz")
        save_array(paths.synthesis / LATENTS / f"{key}.npy", -np.load(paths.latents / record.latent) * data.scale)
        records.append(SynthesisRecord(
            key=key, kind="augmentation", source_key=record.key, source_site=record.domain, source_split="train",
            subject=None, target_site="other", target_domain_index=0, image=f"{AUGMENTATIONS}/{key}.nii.gz",
            latent=f"{LATENTS}/{key}.npy", shape=list(source.GetSize()[::-1]), seed=0, seconds=0.0))
    write_synthesis(paths.synthesis, records, {"vae_sha256": data.input_hashes["vae"]})
    return records


@pytest.fixture(scope="module")
def swept(uninterrupted_run, tmp_path_factory: pytest.TempPathFactory):
    """The finetune test project with a stand-in synthesis store, swept once."""
    root = Path(shutil.copytree(uninterrupted_run("finetune"), tmp_path_factory.mktemp("sweep") / "project",
                                symlinks=True))
    cfg = load_config(root / "params.yaml", [f"finetune_sweep.{k}={json.dumps(v)}" for k, v in SWEEP.items()])
    paths = Paths.resolve(cfg, root)
    write_augmentations(cfg, paths)
    result = finetune_sweep.run(cfg.finetune_sweep, paths, ray=cfg.ray, finetune=cfg.finetune,
                                harmonize=cfg.harmonize)
    return cfg, paths, result


def test_every_cell_trains_and_scores_its_own_cases(swept) -> None:
    cfg, paths, result = swept
    metrics = result.metrics
    assert metrics["cells"] == 3 + 3 * len(FINETUNE_SITES)
    assert metrics["cells_per_arm"] == {"scratch": 3, "meduet": 3, "meduet+synth": 1, "meduet+style": 2}
    rows = list(csv.DictReader(open(paths.reports / "finetune_sweep" / "scores.csv")))
    organs = ("body", "liver")
    for cell in metrics["per_cell"]:
        mine = [r for r in rows if (r["protocol"], r["arm"], r["left_out"]) ==
                (cell["protocol"], cell["arm"], cell["left_out"])]
        expected_sites = list(FINETUNE_SITES) if cell["protocol"] == "label_efficiency" else [cell["left_out"]]
        assert sorted((r["site"], r["organ"]) for r in mine) == [(s, o) for s in expected_sites for o in organs]
        # one labelled subject per site; without a site: both training subjects of the other
        assert cell["labelled_cases"] == 2 and cell["steps"] == cfg.finetune.steps
        # the synthetic arm also trains on the augmentations of its two labelled scans, and no other arm does
        assert cell["synthetic_cases"] == (2 if cell["arm"] == "meduet+synth" else 0)
    dice = {c["arm"]: c["dice"] for c in metrics["per_cell"] if c["protocol"] == "label_efficiency"}
    assert dice["scratch"] != dice["meduet"], dice  # two initialisations, two different models
    assert dice["meduet+synth"] != dice["meduet"], dice  # the augmentations reached training

    efficiency = metrics["label_efficiency"]["1"]
    assert efficiency["meduet"]["dice"]["mean"] == pytest.approx(dice["meduet"], abs=1e-3)
    paired = efficiency["meduet_minus"]
    assert set(paired) == {"scratch"} and paired["scratch"]["n"] == len(FINETUNE_SITES) * len(organs)
    assert paired["scratch"]["mean"] == pytest.approx(dice["meduet"] - dice["scratch"], abs=2e-3)
    synth = efficiency["meduet+synth_minus"]  # the augmentation's own effect: against plain MeDUET too
    assert set(synth) == {"scratch", "meduet"}
    assert synth["meduet"]["mean"] == pytest.approx(dice["meduet+synth"] - dice["meduet"], abs=2e-3)
    loso = metrics["leave_one_site_out"]
    assert set(loso) == set(FINETUNE_SITES)
    histories = list(csv.DictReader(open(paths.reports / "finetune_sweep" / "history.csv")))
    losses: dict[str, list[str]] = {}
    for r in histories:
        losses.setdefault(r["cell"], []).append(r["total"])
    for site in FINETUNE_SITES:
        # the style bank changes training (its losses, not necessarily a 4-digit Dice after 20 steps)
        styled, plain = (losses[f"leave_one_site_out-{arm}-without-{site}-seed0"] for arm in ("meduet+style", "meduet"))
        assert styled != plain and len(styled) == len(plain)
        assert set(loso[site]["meduet+style_minus"]) == {"scratch", "meduet"}
        assert "meduet+synth" not in loso[site]  # translations would show the unseen site's style
    goals = metrics["goals"]
    assert set(goals) == {"one_label_meduet_minus_scratch_at_least_0.05", "one_label_meduet_minus_mae_at_least_0.02",
                          "loso_meduet_beats_scratch_on_every_site", "all_labels_large_organ_dice_at_least_0.85"}
    assert goals["all_labels_large_organ_dice_at_least_0.85"] == "not measured"  # no all-labels point swept
    assert goals["one_label_meduet_minus_scratch_at_least_0.05"]["met"] == (paired["scratch"]["mean"] >= 0.05)
    assert goals["one_label_meduet_minus_mae_at_least_0.02"] == "not measured"
    unseen = goals["loso_meduet_beats_scratch_on_every_site"]
    assert unseen["arm"] == "meduet+style" and unseen["of"] == len(FINETUNE_SITES)
    assert unseen["won"] == sum(loso[s]["meduet+style_minus"]["scratch"]["mean"] > 0 for s in FINETUNE_SITES)
    assert unseen["met"] == (unseen["won"] == unseen["of"])
    assert len({p.parent.parent for p in checkpoints(paths.root, "finetune_sweep")}) == metrics["cells"]  # a run each
    assert (paths.reports / "finetune_sweep" / "sweep.png").stat().st_size > 5000
    table = list(csv.DictReader(open(paths.reports / "finetune_sweep" / "label_efficiency.csv")))
    assert [r["arm"] for r in table] == [*SWEEP["inits"], "meduet+synth"]
    by_cell = {r["cell"]: [] for r in histories}
    for r in histories:
        by_cell[r["cell"]].append(int(r["step"]))
    assert len(by_cell) == metrics["cells"]  # every cell's training, not the last one's only
    assert all(steps[-1] == cfg.finetune.steps for steps in by_cell.values())
    assert all(cell["seconds"] > 0 for cell in metrics["per_cell"])
    tables = (paths.reports / "finetune_sweep" / "tables.md").read_text()  # the same numbers, as tables
    assert f"| 1 | meduet | {efficiency['meduet']['dice']['mean']:.3f} (1) |" in tables
    assert f"| 1 | meduet − scratch | {paired['scratch']['mean']:+.3f} |" in tables
    for site in FINETUNE_SITES:
        assert f"| {site} | meduet+style | {loso[site]['meduet+style']['dice']['mean']:.3f} (1) |" in tables
    assert f"| all |  | {metrics['cells']} |" in tables


def test_the_written_scores_summarise_back_to_the_stage_metrics(swept) -> None:
    """scores.csv read back (types restored) gives the stage's own summary: what merging sweeps relies on."""
    cfg, paths, result = swept
    metrics = result.metrics
    rows = read_scores(paths.reports / "finetune_sweep" / "scores.csv")
    assert {type(r["seed"]) for r in rows} == {int} and {type(r["dice"]) for r in rows} == {float}
    efficiency_arms = [a for a in metrics["label_efficiency"]["1"] if not a.endswith("_minus")]
    loso_arms = [a for a in metrics["leave_one_site_out"][FINETUNE_SITES[0]] if not a.endswith("_minus")]
    summary = finetune_sweep.summarize_sweep(rows, labels=[1], efficiency_arms=efficiency_arms,
                                             sites=list(FINETUNE_SITES), loso_arms=loso_arms,
                                             large_organ_min_ml=cfg.finetune.large_organ_min_ml)
    keys = ("label_efficiency", "leave_one_site_out", "unseen_site_cost", "goals")
    assert summary == {key: metrics[key] for key in keys}
    seed_one = [{**r, "seed": 1} for r in rows]  # a second seed's run of the same cells, merged
    merged = finetune_sweep.summarize_sweep(rows + seed_one, labels=[1], efficiency_arms=efficiency_arms,
                                            sites=list(FINETUNE_SITES), loso_arms=loso_arms,
                                            large_organ_min_ml=cfg.finetune.large_organ_min_ml)
    dice = merged["label_efficiency"]["1"]["meduet"]["dice"]
    assert dice["seeds"] == 2 and dice["sd"] == 0.0
    assert merged["label_efficiency"]["1"]["meduet_minus"]["scratch"]["n"] == 2 * summary[
        "label_efficiency"]["1"]["meduet_minus"]["scratch"]["n"]


def test_each_init_reads_its_own_pretrained_file(swept, tmp_path: Path) -> None:
    _, paths, _ = swept
    held_out = [r for r in read_manifest(paths.latents) if r.split == "held_out"]
    saved = torch.load(meduet_path(paths), weights_only=True)
    saved["teacher"] = {k: v + 1.0 if v.is_floating_point() else v for k, v in saved["teacher"].items()}
    mae_file = meduet_path(paths, "pretrain_mae")
    mae_file.parent.mkdir(parents=True)
    torch.save(saved, mae_file)
    try:
        meduet, meduet_source = backbone_source(paths, "meduet", held_out)
        mae, mae_source = backbone_source(paths, "mae", held_out)
        _, scratch_source = backbone_source(paths, "scratch", held_out)  # MeDUET's shape, no weights
    finally:
        shutil.rmtree(mae_file.parent)
    assert (meduet_source, mae_source, scratch_source) == (meduet_path(paths), mae_file, meduet_path(paths))
    name = "blocks.0.attn.qkv.weight"
    torch.testing.assert_close(mae.state_dict()[name], meduet.state_dict()[name] + 1.0)


def test_the_synthetic_arm_names_what_is_missing(swept, tmp_path: Path) -> None:
    cfg, paths, _ = swept
    project = Path(shutil.copytree(paths.root, tmp_path / "project", symlinks=True))
    paths = Paths.resolve(cfg, project)
    data = segmentation_data(paths, cfg.harmonize, cfg.finetune.label_names)
    train = data.split("train")
    shutil.rmtree(paths.synthesis)
    write_augmentations(cfg, paths, keys={train[0].key})
    cases, _ = finetune_sweep.synthetic_cases(paths, data, train[:1])
    assert [key for key, _ in cases] == [f"aug__{train[0].key}__other"] and cases[0][1].synthetic
    with pytest.raises(StageError, match="augmentations_per_scan"):
        finetune_sweep.synthetic_cases(paths, data, train[1:2])  # a labelled scan nobody translated
    with pytest.raises(StageError, match="another VAE"):
        finetune_sweep.synthetic_cases(paths, dataclasses.replace(data, input_hashes={
            **data.input_hashes, "vae": "0" * 64}), train[:1])


def test_a_synthesized_latent_is_read_as_it_is_and_a_cached_one_scaled(tmp_path: Path) -> None:
    save_array(tmp_path / "z.npy", np.full((4, 2, 2, 2), 2.0, np.float32))
    image = sitk.GetImageFromArray(np.zeros((8, 8, 8), np.float32))
    write_image(image, tmp_path / "x.nii.gz")
    write_image(sitk.Cast(image, sitk.sitkUInt8), tmp_path / "y.nii.gz")
    files = CaseFiles(latent=str(tmp_path / "z.npy"), image=str(tmp_path / "x.nii.gz"),
                      label=str(tmp_path / "y.nii.gz"))
    assert read_case(files, 0.5)[0].max() == 1.0
    assert read_case(dataclasses.replace(files, synthetic=True), 0.5)[0].max() == 2.0


def test_paired_difference_matches_cases_and_seeds() -> None:
    rows = [{"init": init, "seed": seed, "case": case, "organ": "liver", "dice": dice}
            for init, seed, case, dice in [("meduet", 0, "a", 0.8), ("meduet", 0, "b", 0.6), ("meduet", 1, "a", 0.7),
                                           ("scratch", 0, "a", 0.5), ("scratch", 0, "b", 0.5), ("scratch", 1, "a", 0.6),
                                           ("scratch", 1, "b", 0.9)]]  # (scratch, 1, b) has no MeDUET partner
    rows = [{**r, "arm": r["init"]} for r in rows]
    diff = finetune_sweep.paired_difference(rows, arm="meduet", baseline="scratch")
    assert diff["n"] == 3 and diff["mean"] == pytest.approx((0.3 + 0.1 + 0.1) / 3, abs=1e-4)
    assert diff["seed_means"] == [pytest.approx(0.2), pytest.approx(0.1)]
    assert diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]
    assert finetune_sweep.paired_difference(rows, arm="meduet", baseline="mae") is None


def test_full_switch_plans_the_whole_protocol() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "params.yaml", ["finetune_sweep.full=true"])
    cells = finetune_sweep.plan(cfg.finetune_sweep, ["a", "b", "c", "d"])
    assert len(cells) == 4 * 3 * 3 + 4 * 4 * 3  # labels x inits x seeds, then sites x (inits + meduet+style) x seeds
    assert len({c.name for c in cells}) == len(cells)


def test_lesion_probe_scores_each_inits_pooled_content(swept) -> None:
    cfg, paths, result = swept
    assert result.metrics["lesion_classification"] == {"skipped": "no class named 'lesion' in finetune.label_names"}
    data = segmentation_data(paths, cfg.harmonize, cfg.finetune.label_names)
    # the phantoms all hold a liver: call it a lesion present in the first case of each site only
    marked = {r.key: data.harmonized[r.key].model_copy(update={"labels_present": [1, 2] if r.key.endswith("_0")
                                                               or r.key.endswith("_2") and "site_a" in r.key
                                                               else [1]}) for r in data.records}
    data = dataclasses.replace(data, harmonized={**data.harmonized, **marked})
    names = ["background", "body", "lesion"]
    probe = finetune_sweep.lesion_probe(["scratch", "meduet"], paths=paths, data=data, label_names=names, seed=0)
    assert probe["train"] == {"volumes": 4, "with_lesion": 2} and probe["held_out"] == {"volumes": 2, "with_lesion": 1}
    for init in ("scratch", "meduet"):
        held, cv = probe[init]["held_out"], probe[init]["cross_validated"]
        assert held["accuracy"] in (0.0, 0.5, 1.0) and 0.0 <= held["auc"] <= 1.0
        assert cv["folds"] == 2 and cv["accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0) and 0.0 <= cv["auc"] <= 1.0
    again = finetune_sweep.lesion_probe(["scratch", "meduet"], paths=paths, data=data, label_names=names, seed=0)
    assert again == probe  # seeded: the random encoder and the folds


def test_the_large_organ_goal_averages_meduets_all_label_cells_over_seeds() -> None:
    def row(seed: int, case: str, organ: str, dice: float, ml: float, arm: str = "meduet", labels="all") -> dict:
        return {"protocol": "label_efficiency", "arm": arm, "labels_per_site": labels, "seed": seed, "case": case,
                "organ": organ, "dice": dice, "volume_ml": ml}

    rows = [row(0, "a", "liver", 0.9, 1000.0), row(0, "a", "spleen", 0.1, 100.0), row(0, "b", "liver", 0.7, 1000.0),
            row(1, "a", "liver", 0.6, 1000.0), row(1, "b", "liver", 0.6, 1000.0),
            row(0, "a", "liver", 0.0, 1000.0, arm="scratch"), row(0, "a", "liver", 0.0, 1000.0, labels=1)]
    goal = finetune_sweep.large_organ_goal(rows, 500.0)  # seed 0: 0.8, seed 1: 0.6; other arms and points ignored
    assert goal == {"value": 0.7, "seed_values": [0.8, 0.6], "sd": round(float(np.std([0.8, 0.6], ddof=1)), 4),
                    "target": 0.85, "organs": ["liver"], "by_organ": {"liver": 0.7}, "met": False}
    assert finetune_sweep.large_organ_goal([r for r in rows if r["arm"] == "scratch"], 500.0) is None


def test_each_unseen_site_and_arm_has_its_large_organ_dice_over_seeds() -> None:
    def row(seed: int, organ: str, dice: float, ml: float, arm: str = "meduet", site: str = "a") -> dict:
        return {"protocol": "leave_one_site_out", "arm": arm, "left_out": site, "seed": seed, "case": f"{site}3",
                "organ": organ, "dice": dice, "volume_ml": ml, "surface_dice": dice, "hd95": 1.0}

    rows = [row(0, "liver", 0.9, 1000.0), row(0, "spleen", 0.1, 100.0), row(1, "liver", 0.7, 1000.0),
            row(1, "spleen", 0.3, 100.0), row(0, "liver", 0.5, 1000.0, arm="scratch"),
            row(0, "spleen", 0.5, 100.0, arm="scratch"), row(0, "liver", 0.2, 1000.0, site="b")]
    summary = finetune_sweep.summarize_protocol(rows, ["a", "b"], "left_out", ["scratch", "meduet"], 500.0)
    assert summary["a"]["meduet"]["large_organ_dice"] == {"mean": 0.8, "sd": round(float(np.std([0.9, 0.7],
                                                                                                   ddof=1)), 4),
                                                          "seeds": 2}  # the liver alone, per seed
    assert summary["a"]["meduet"]["dice"]["mean"] == 0.5  # every organ
    assert summary["a"]["scratch"]["large_organ_dice"]["mean"] == 0.5
    assert summary["b"]["meduet"]["large_organ_dice"]["mean"] == 0.2
    assert summary["b"]["scratch"]["large_organ_dice"] == {"mean": None, "sd": None, "seeds": 0}


def test_the_unseen_site_cost_pairs_each_left_out_cell_with_the_same_arm_and_seed_trained_on_every_site() -> None:
    def row(protocol: str, seed: int, site: str, organ: str, dice: float, labels="all", arm: str = "meduet") -> dict:
        return {"protocol": protocol, "arm": arm, "labels_per_site": labels, "seed": seed, "case": f"{site}3",
                "site": site, "left_out": site if protocol == "leave_one_site_out" else "", "organ": organ,
                "dice": dice, "volume_ml": 1000.0 if organ == "liver" else 100.0}

    rows = [row("label_efficiency", s, "a", organ, dice) for s, organ, dice in
            [(0, "liver", 0.9), (0, "spleen", 0.5), (1, "liver", 0.8), (1, "spleen", 0.4)]]
    rows += [row("leave_one_site_out", s, "a", organ, dice) for s, organ, dice in
             [(0, "liver", 0.7), (0, "spleen", 0.5), (1, "liver", 0.7), (1, "spleen", 0.2)]]
    rows += [row("label_efficiency", 0, "a", "liver", 0.0, labels=1),  # another label count: not the reference
             row("label_efficiency", 0, "b", "liver", 0.6),  # site b has no left-out cell
             row("leave_one_site_out", 2, "a", "liver", 0.1),  # seed 2 has no all-sites cell
             row("leave_one_site_out", 0, "a", "liver", 0.3, arm="meduet+style")]  # nor this arm
    cost = finetune_sweep.unseen_site_cost(rows, ["a", "b"], ["meduet", "meduet+style"], 500.0)
    assert list(cost) == ["a"] and list(cost["a"]) == ["meduet"]
    dice, large = cost["a"]["meduet"]["dice"], cost["a"]["meduet"]["large_organ_dice"]
    assert dice["seed_differences"] == [-0.1, -0.15] and dice["difference"] == -0.125  # 0.6 - 0.7, 0.45 - 0.6
    assert dice["seen"] == 0.65 and dice["unseen"] == 0.525
    assert large["seed_differences"] == [-0.2, -0.1] and large["seen"] == 0.85  # the liver alone
    assert finetune_sweep.unseen_site_cost(rows, [], ["meduet"], 500.0) == {}


def test_a_cell_is_the_finetune_recipe_with_its_own_init_labels_seed_and_the_sweeps_steps() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "params.yaml",
                      ["finetune.steps=600", "finetune_sweep.steps=300", "finetune_sweep.leave_one_site_out=true"])
    cells = finetune_sweep.plan(cfg.finetune_sweep, ["a", "b"])
    style = next(c for c in cells if c.style)
    section = finetune_sweep.cell_section(cfg.finetune, cfg.finetune_sweep, style)
    assert (section.init, section.labels_per_site, section.seed, section.steps) == (style.init, "all", 0, 300)
    assert section.style_augmentation and not cfg.finetune.style_augmentation
    assert section.model_dump(exclude={"init", "labels_per_site", "seed", "steps", "style_augmentation"}) == \
        cfg.finetune.model_dump(exclude={"init", "labels_per_site", "seed", "steps", "style_augmentation"})
    unset = cfg.finetune_sweep.model_copy(update={"steps": None})
    assert finetune_sweep.cell_section(cfg.finetune, unset, cells[0]).steps == 600  # null: finetune's own
