"""Stage ``finetune-sweep``: label efficiency and leave-one-site-out, per initialisation and seed.

Every cell fine-tunes a segmenter with the ``finetune`` section's recipe, changing only its
``init`` (scratch, the masked-autoencoder baseline ``mae``, MeDUET), ``labels_per_site`` and
``seed`` (``meduet.stages.finetune``'s own fit and score functions, on Ray Train):

- label efficiency: labels of the first ``n`` training subjects of every site, scored on every
  site's held-out subjects (subjects no training stage saw);
- leave one site out: all labels of every site but one, scored on the left-out site's held-out
  subjects, each site in turn.

Arms besides the initialisations: ``meduet+style`` (leave one site out with style-bank
augmentation, ``style_arm``) and ``meduet+synth`` (label efficiency with each labelled scan's
style-swapped translations from the synthesis store added to its training cases, labelled
with the scan's labels: ``synthetic_arm``, the claim that synthesis helps analysis). Each
MeDUET arm is compared pair by pair with the baselines and with plain MeDUET.

A cell is a training run of its own key, so an interrupted sweep resumes cell by cell.

Outputs under ``paths.reports/finetune_sweep/``: ``scores.csv`` (one row per cell, held-out
case and organ), ``history.csv`` (every cell's training loss by step), ``label_efficiency.csv``
(one row per cell: the DVC plot of Dice against labels), ``metrics.json`` (per protocol and
initialisation: mean and sd over seeds; paired differences MeDUET - scratch and MeDUET - MAE
over the same seeds, cases and organs, with a bootstrap interval; the issue's goals met or
missed; ``lesion_classification``: lesion presence from each init's pooled content by a linear
probe, AUC and accuracy; ``per_cell``: each cell's means and seconds), ``tables.md`` (those
numbers as Markdown tables: ``meduet.evaluation.sweep_tables``) and ``sweep.png`` (Dice against
labels; with leave one site out, a second panel of Dice per unseen site).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from meduet.artifacts.synthesis import SYNTHESIS_MANIFEST, SYNTHESIS_META, read_synthesis
from meduet.artifacts.vae import vae_path
from meduet.config import FinetuneConfig, FinetuneSweepConfig, HarmonizeConfig, Paths, RayConfig
from meduet.data.latents import LatentRecord
from meduet.engine.finetune_runs import (
    LARGE_ORGAN_TARGET,
    SCORES,
    SegmentationData,
    backbone_source,
    fit_segmenter,
    labelled_cases,
    large_organs,
    mean,
    score_segmenter,
    segmentation_data,
    write_scores,
)
from meduet.engine.finetune_training import CaseFiles
from meduet.engine.metrics import mean_ci95
from meduet.engine.probes import fit_probe, linear_probe, probe_folds
from meduet.engine.progress import Progress
from meduet.engine.volume_factors import pooled_content
from meduet.evaluation.sweep_tables import sweep_tables
from meduet.io.atomic import write_json, write_text
from meduet.io.figures import plt, save_figure
from meduet.io.images import sha256_file
from meduet.models.meduet import MeduetModel
from meduet.stages import StageError, StageResult

log = logging.getLogger(__name__)

STAGE = "finetune_sweep"
BASELINES = ("scratch", "mae")  # what MeDUET is compared with, pair by pair
# The goals with labels of one subject per site: MeDUET's mean Dice over these baselines.
GOALS = {"scratch": 0.05, "mae": 0.02}


@dataclass(frozen=True)
class Cell:
    """One fine-tuning run of the sweep."""

    protocol: str  # label_efficiency | leave_one_site_out
    init: str
    labels_per_site: int | str
    left_out: str | None  # the unseen site (leave one site out)
    seed: int
    style: bool = False  # style-bank augmentation
    synthetic: bool = False  # the labelled scans' style-swapped translations train too

    @property
    def arm(self) -> str:
        """The initialisation, with ``+style`` under style-bank augmentation, ``+synth`` with translations."""
        return self.init + ("+style" if self.style else "") + ("+synth" if self.synthetic else "")

    @property
    def name(self) -> str:
        point = f"labels{self.labels_per_site}" if self.left_out is None else f"without-{self.left_out}"
        return f"{self.arm}-{point}-seed{self.seed}"


def _arms(cfg: FinetuneSweepConfig, augmented: bool) -> list[tuple[str, bool]]:
    """``(init, False)`` per init, then ``("meduet", True)`` when ``augmented`` and MeDUET is an init."""
    arms = [(init, False) for init in cfg.inits]
    return arms + [("meduet", True)] if augmented and "meduet" in cfg.inits else arms


def loso_arms(cfg: FinetuneSweepConfig) -> list[tuple[str, bool]]:
    """Leave-one-site-out arms: ``(init, style)``; MeDUET also with style-bank augmentation (``style_arm``)."""
    return _arms(cfg, cfg.style_arm)


def efficiency_arms(cfg: FinetuneSweepConfig) -> list[tuple[str, bool]]:
    """Label-efficiency arms: ``(init, synthetic)``; MeDUET also with synthetic augmentation (``synthetic_arm``)."""
    return _arms(cfg, cfg.synthetic_arm)


def plan(cfg: FinetuneSweepConfig, sites: list[str]) -> list[Cell]:
    """The sweep's cells, label efficiency first, in a stable order."""
    cells = [Cell("label_efficiency", init, labels, None, seed, synthetic=synthetic)
             for labels in cfg.labels_per_site for init, synthetic in efficiency_arms(cfg) for seed in cfg.seeds]
    if cfg.leave_one_site_out:
        cells += [Cell("leave_one_site_out", init, "all", site, seed, style)
                  for site in sites for init, style in loso_arms(cfg) for seed in cfg.seeds]
    return cells


def cell_section(finetune: FinetuneConfig, cfg: FinetuneSweepConfig, cell: Cell) -> FinetuneConfig:
    """The ``finetune`` recipe of one cell: its init, labels, seed and style arm, and the sweep's steps if set."""
    return finetune.model_copy(update={"init": cell.init, "labels_per_site": cell.labels_per_site, "seed": cell.seed,
                                       "style_augmentation": cell.style, "steps": cfg.steps or finetune.steps})


def _sd(values: list[float]) -> float | None:
    return round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else None


def paired_difference(rows: list[dict], *, arm: str, baseline: str, seed: int = 0) -> dict | None:
    """Dice of ``arm`` minus ``baseline`` over the (seed, case, organ) both scored: mean, sd, n, 95 % interval.

    The interval is a percentile bootstrap of the mean over those pairs (scipy). Organs a
    model never predicted count with Dice 0, as in the means. None when no pair exists.
    """
    def by_key(name: str) -> dict[tuple, float]:
        return {(r["seed"], r["case"], r["organ"]): r["dice"] for r in rows if r["arm"] == name}

    ours, theirs = by_key(arm), by_key(baseline)
    keys = sorted(set(ours) & set(theirs))
    if not keys:
        return None
    diff = np.array([ours[k] - theirs[k] for k in keys])
    seeds = sorted({k[0] for k in keys})
    per_seed = [float(np.mean([ours[k] - theirs[k] for k in keys if k[0] == s])) for s in seeds]
    out = {"mean": round(float(diff.mean()), 4), "sd": _sd(list(diff)), "n": len(keys),
           "seed_means": [round(v, 4) for v in per_seed], "seed_sd": _sd(per_seed)}
    ci = mean_ci95(diff, seed)
    if ci is not None:
        out["ci95"] = ci
    return out


def summarize_protocol(rows: list[dict], points: list, point_key: str, arms: list[str],
                       large_organ_min_ml: float) -> dict:
    """Per point (label count or left-out site) and arm: scores' means (over seeds: mean and sd), the same for
    the large organs' Dice (``large_organ_dice``: organs of at least ``large_organ_min_ml``), and the paired
    differences of each MeDUET arm against each baseline (``<arm>_minus``)."""
    out: dict = {}
    for point in points:
        at = [r for r in rows if r[point_key] == point]
        entry: dict = {}
        for arm in arms:
            mine = [r for r in at if r["arm"] == arm]
            seeds = sorted({r["seed"] for r in mine})
            entry[arm] = {}
            for score in SCORES:
                per_seed = [mean([r[score] for r in mine if r["seed"] == s]) for s in seeds]
                per_seed = [v for v in per_seed if v is not None]
                entry[arm][score] = {"mean": mean(per_seed), "sd": _sd(per_seed), "seeds": len(per_seed)}
            large = [large_organs([r for r in mine if r["seed"] == s], large_organ_min_ml)["dice"] for s in seeds]
            large = [v for v in large if v is not None]
            entry[arm]["large_organ_dice"] = {"mean": mean(large), "sd": _sd(large), "seeds": len(large)}
        for arm in (a for a in arms if a.startswith("meduet")):
            against = [*BASELINES, *(["meduet"] if arm != "meduet" else [])]  # an augmented arm: also plain MeDUET
            entry[f"{arm}_minus"] = {b: paired_difference(at, arm=arm, baseline=b) for b in against if b in arms}
        out[str(point)] = entry
    return out


def large_organ_goal(rows: list[dict], min_ml: float) -> dict | None:
    """MeDUET's large-organ mean Dice with all labels (label efficiency's ``all`` point), mean over seeds, against
    the analysis issue's target; None when the sweep has no such cell."""
    mine = [r for r in rows if r["protocol"] == "label_efficiency" and r["labels_per_site"] == "all"
            and r["arm"] == "meduet"]
    per_seed = {seed: large_organs([r for r in mine if r["seed"] == seed], min_ml)
                for seed in sorted({r["seed"] for r in mine})}
    values = [v["dice"] for v in per_seed.values() if v["dice"] is not None]
    if not values:
        return None
    value = round(float(np.mean(values)), 4)
    organs = sorted(set().union(*(v["organs"] for v in per_seed.values())))
    return {"value": value, "seed_values": values, "sd": _sd(values), "target": LARGE_ORGAN_TARGET,
            "organs": organs, "by_organ": {o: mean([v["by_organ"].get(o) for v in per_seed.values()]) for o in organs},
            "met": value >= LARGE_ORGAN_TARGET}


def goals(label_efficiency: dict, loso: dict | None, large: dict | None = None) -> dict:
    """The issue's goals on the demo, each met, missed, or not measured by this sweep."""
    out: dict = {}
    one = label_efficiency.get("1", {}).get("meduet_minus", {})
    for baseline, margin in GOALS.items():
        diff = one.get(baseline)
        out[f"one_label_meduet_minus_{baseline}_at_least_{margin}"] = (
            "not measured" if diff is None else {"value": diff["mean"], "met": diff["mean"] >= margin})
    if loso:
        arm = "meduet+style" if any("meduet+style_minus" in e for e in loso.values()) else "meduet"
        beats = {site: entry[f"{arm}_minus"]["scratch"]["mean"] > 0 for site, entry in loso.items()
                 if entry.get(f"{arm}_minus", {}).get("scratch")}
        out["loso_meduet_beats_scratch_on_every_site"] = {"arm": arm, "sites": beats, "won": sum(beats.values()),
                                                          "of": len(beats), "met": bool(beats) and all(beats.values())}
    out[f"all_labels_large_organ_dice_at_least_{LARGE_ORGAN_TARGET}"] = large or "not measured"
    return out


def unseen_site_cost(rows: list[dict], sites: list[str], arms: list[str], large_organ_min_ml: float) -> dict:
    """What leaving a site out costs its held-out cases: per site and arm, the Dice of the leave-one-site-out
    cell minus the Dice the same arm and seed gave those cases with every site's labels (label efficiency's
    ``all`` point), per seed, for the mean over organs (``dice``) and the large organs (``large_organ_dice``).

    The unseen-site cells also train on one site's labelled subjects fewer, so the cost holds both. A site
    and arm without both cells for some seed is left out; an empty dict when the sweep has no such pair.
    """
    def cells(protocol: str, arm: str, site: str) -> dict[int, list[dict]]:
        """The site's held-out rows of one protocol's cell (all labels, or this site left out), by seed."""
        out: dict[int, list[dict]] = defaultdict(list)
        for r in rows:
            if r["protocol"] == protocol and r["arm"] == arm and r["site"] == site and (
                    r["left_out"] == site if protocol == "leave_one_site_out" else r["labels_per_site"] == "all"):
                out[r["seed"]].append(r)
        return out

    scores = {"dice": lambda cases: mean([r["dice"] for r in cases]),
              "large_organ_dice": lambda cases: large_organs(cases, large_organ_min_ml)["dice"]}
    out: dict = {}
    for site in sites:
        for arm in arms:
            seen, unseen = cells("label_efficiency", arm, site), cells("leave_one_site_out", arm, site)
            seeds = sorted(set(seen) & set(unseen))
            if not seeds:
                continue
            entry = {}
            for name, score in scores.items():
                pairs = [(score(seen[s]), score(unseen[s])) for s in seeds]
                diffs = [round(u - v, 4) for v, u in pairs if u is not None and v is not None]
                entry[name] = {"seen": mean([v for v, _ in pairs]), "unseen": mean([u for _, u in pairs]),
                               "difference": mean(diffs), "seed_differences": diffs, "sd": _sd(diffs)}
            out.setdefault(site, {})[arm] = entry
    return out


def summarize_sweep(rows: list[dict], *, labels: list, efficiency_arms: list[str], sites: list[str],
                    loso_arms: list[str], large_organ_min_ml: float) -> dict:
    """The sweep's score rows summarised: ``label_efficiency`` per label count and arm, ``leave_one_site_out``
    per unseen site and arm (None without ``sites``), ``unseen_site_cost`` (where the sweep has both), and the
    ``goals`` they meet or miss (organs of at least ``large_organ_min_ml`` are the large ones)."""
    efficiency = summarize_protocol([r for r in rows if r["protocol"] == "label_efficiency"], labels,
                                    "labels_per_site", efficiency_arms, large_organ_min_ml)
    loso = (summarize_protocol([r for r in rows if r["protocol"] == "leave_one_site_out"], sites, "left_out",
                               loso_arms, large_organ_min_ml) if sites else None)
    return {"label_efficiency": efficiency, "leave_one_site_out": loso,
            "unseen_site_cost": unseen_site_cost(rows, sites, loso_arms, large_organ_min_ml),
            "goals": goals(efficiency, loso, large_organ_goal(rows, large_organ_min_ml))}


def synthetic_cases(paths: Paths, data: SegmentationData, train: list[LatentRecord]) -> tuple[
        list[tuple[str, CaseFiles]], str]:
    """The synthesis store's augmentations of ``train``'s scans as labelled cases, and the store manifest's SHA-256.

    Each is a whole training scan translated into another site's style on the scan's own grid, so
    the scan's label map holds for it; its latent is the sampled one (already scaled).

    Raises:
        StageError: no store, a store made with another VAE, or no augmentation of these scans.
    """
    records, meta = read_synthesis(paths.synthesis)
    if meta.get("vae_sha256") != data.input_hashes["vae"]:
        raise StageError(f"{paths.synthesis / SYNTHESIS_META}: made with another VAE than {vae_path(paths)}; "
                         f"rerun synthesize")
    keys = {r.key for r in train}
    chosen = [r for r in records if r.kind == "augmentation" and r.source_key in keys]
    if not chosen:
        raise StageError(f"{paths.synthesis / SYNTHESIS_MANIFEST}: no augmentation of the labelled scans "
                         f"{sorted(keys)[:3]}...: set synthesize.augmentations_per_scan > 0 and rerun synthesize, "
                         f"or finetune_sweep.synthetic_arm: false")
    sources = [data.harmonized[r.source_key] for r in chosen]
    cases = [(r.key, CaseFiles(latent=str(paths.synthesis / r.latent), image=str(paths.synthesis / r.image),
                               label=str(paths.harmonized / source.label), synthetic=True, floor=source.window[2]))
             for r, source in zip(chosen, sources)]
    return cases, sha256_file(paths.synthesis / SYNTHESIS_MANIFEST)


def lesion_probe(inits: list[str], *, paths: Paths, data: SegmentationData, label_names: list[str],
                 seed: int) -> dict:
    """Lesion presence from each init's frozen encoder: a linear probe of the pooled content vector.

    Per volume, the content factor averaged over its sliding windows (the encoder as
    initialised: scratch's is random, of the same shape and seed as its fine-tuning).
    The target is whether the harmonized label map holds ``lesion``. A logistic regression
    (``meduet.engine.probes``) fitted on the train split scores the held-out volumes (AUC,
    accuracy); stratified cross-validation over the train split gives a second, larger-n
    estimate. With a handful of volumes either is noisy: the counts are reported with them.
    """
    if "lesion" not in label_names:
        return {"skipped": "no class named 'lesion' in finetune.label_names"}
    lesion = label_names.index("lesion")
    train, held_out = data.split("train"), data.split("held_out")
    y_train = np.array([lesion in data.harmonized[r.key].labels_present for r in train], dtype=int)
    y_held = np.array([lesion in data.harmonized[r.key].labels_present for r in held_out], dtype=int)
    out: dict = {"train": {"volumes": len(train), "with_lesion": int(y_train.sum())},
                 "held_out": {"volumes": len(held_out), "with_lesion": int(y_held.sum())}}
    if len(set(y_train)) < 2:
        return {**out, "skipped": "the train split has one class only"}
    latents = {r.key: np.load(paths.latents / r.latent) for r in train + held_out}  # read once for every init
    for init in inits:
        pretrained, _ = backbone_source(paths, init, held_out)
        if init == "scratch":
            torch.manual_seed(seed)
            pretrained = MeduetModel(pretrained.config).eval()

        def content(records: list[LatentRecord]) -> np.ndarray:
            return np.stack([pooled_content(pretrained, latents[r.key], data.scale) for r in records])

        x_train, x_held = content(train), content(held_out)
        entry: dict = {}
        probe = fit_probe(x_train, y_train)
        if len(held_out):
            p_held = probe.predict_proba(x_held)[:, 1]
            entry["held_out"] = {"accuracy": round(float(((p_held > 0.5) == y_held).mean()), 4),
                                 "auc": round(float(roc_auc_score(y_held, p_held)), 4) if len(set(y_held)) > 1
                                 else None}
        try:
            folds = probe_folds(y_train, 5, seed)
        except ValueError as reason:  # too few of a class to cross-validate
            entry["cross_validated"] = {"skipped": str(reason)}
        else:
            p_cv = cross_val_predict(linear_probe(1e-2, len(y_train)), x_train, y_train, cv=folds,
                                     method="predict_proba")[:, 1]
            entry["cross_validated"] = {"folds": folds.get_n_splits(),
                                        "accuracy": round(float(((p_cv > 0.5) == y_train).mean()), 4),
                                        "auc": round(float(roc_auc_score(y_train, p_cv)), 4)}
        out[init] = entry
    return out


def plot_sweep(efficiency: dict, loso: dict | None, inits: list[str], loso_arms: list[str], target: Path) -> Path:
    """Mean held-out Dice per arm (``inits``: the label-efficiency arms; error bars: sd over seeds): against
    labelled subjects per site, and, with leave one site out, on each unseen site."""
    fig, axes = plt.subplots(1, 1 if loso is None else 2, figsize=(5 if loso is None else 10, 3.5), squeeze=False)
    ax = axes[0, 0]
    points = list(efficiency)
    for k, init in enumerate(inits):
        means = [efficiency[p][init]["dice"]["mean"] for p in points]
        nudge = (k - (len(inits) - 1) / 2) * 0.06  # side by side, so overlapping error bars stay readable
        ax.errorbar(np.arange(len(points)) + nudge, [np.nan if m is None else m for m in means],
                    yerr=[efficiency[p][init]["dice"]["sd"] or 0.0 for p in points], marker="o", capsize=3, label=init)
    ax.set_xticks(range(len(points)), points)
    ax.set_xlim(-0.5, len(points) - 0.5)
    ax.set(xlabel="labelled training subjects per site", ylabel="held-out mean Dice", title="Label efficiency")
    ax.legend()
    if loso is not None:
        ax = axes[0, 1]
        sites, width = list(loso), 0.8 / len(loso_arms)
        for i, arm in enumerate(loso_arms):
            ax.bar(np.arange(len(sites)) + (i - (len(loso_arms) - 1) / 2) * width,
                   [loso[s][arm]["dice"]["mean"] or 0.0 for s in sites], width,
                   yerr=[loso[s][arm]["dice"]["sd"] or 0.0 for s in sites], capsize=3, label=arm)
        ax.set_xticks(range(len(sites)), sites)
        ax.set(ylabel="mean Dice on the unseen site", title="Leave one site out")
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, target)


def run(cfg: FinetuneSweepConfig, paths: Paths, ray: RayConfig, finetune: FinetuneConfig,
        harmonize: HarmonizeConfig) -> StageResult:
    """Fine-tune and score every cell of the sweep; summarise the protocols."""
    data = segmentation_data(paths, harmonize, finetune.label_names)
    train_split, held_out = data.split("train"), data.split("held_out")
    sites = sorted({r.domain for r in train_split})
    cells = plan(cfg, sites)
    rows: list[dict] = []
    cell_rows: list[dict] = []
    histories: list[dict] = []  # every cell's training rows, its name first
    progress = Progress(STAGE, len(cells), unit="cells", every_fraction=0.0)  # a line after every cell
    for index, cell in enumerate(cells, 1):
        log.info("%s: cell %d/%d: %s (%s)", STAGE, index, len(cells), cell.name, cell.protocol)
        started = time.perf_counter()
        section = cell_section(finetune, cfg, cell)
        pool = [r for r in train_split if r.domain != cell.left_out]
        test = [r for r in held_out if cell.left_out is None or r.domain == cell.left_out]
        train = labelled_cases(pool, cell.labels_per_site, cell.seed)
        extra, extra_sha = synthetic_cases(paths, data, train) if cell.synthetic else ([], None)
        trained, built = fit_segmenter(section, stage=STAGE, paths=paths, ray=ray, data=data, train=train,
                                       held_out=held_out, run_name=f"{cell.protocol}-{cell.name}",
                                       progress_name=f"{STAGE}[{index}/{len(cells)}]", extra=extra,
                                       extra_sha256=extra_sha)
        _, scored = score_segmenter(trained, built["backbone"], section, paths=paths, data=data, cases=test)
        labels = {"protocol": cell.protocol, "arm": cell.arm, "init": cell.init,
                  "labels_per_site": cell.labels_per_site, "left_out": cell.left_out or "", "seed": cell.seed}
        rows += [{**labels, **row} for row in scored]
        histories += [{"cell": f"{cell.protocol}-{cell.name}", "step": row["step"], "total": row.get("total"),
                       "lr": row.get("lr")} for row in trained.history]
        cell_rows.append({**labels, "labelled_cases": len(train), "synthetic_cases": len(extra),
                          "steps": int(trained.state["step"]),
                          # this run's time: a cell resumed from a finished run counts only its scoring
                          "seconds": round(time.perf_counter() - started, 1),
                          **{score: mean([r[score] for r in scored]) for score in SCORES}})
        log.info("%s: %s: mean Dice %s over %d held-out case(s)", STAGE, cell.name, cell_rows[-1]["dice"], len(test))
        progress.update(index)

    names = [Cell("", init, 1, None, 0, synthetic=synthetic).arm for init, synthetic in efficiency_arms(cfg)]
    arms = [Cell("", init, "all", None, 0, style).arm for init, style in loso_arms(cfg)]
    summary = summarize_sweep(rows, labels=list(cfg.labels_per_site), efficiency_arms=names,
                              sites=sites if cfg.leave_one_site_out else [], loso_arms=arms,
                              large_organ_min_ml=finetune.large_organ_min_ml)
    efficiency, loso = summary["label_efficiency"], summary["leave_one_site_out"]
    reports = paths.reports / STAGE
    outputs = {"scores": write_scores(reports / "scores.csv", rows),
               "cells": write_scores(reports / "label_efficiency.csv",
                                     [r for r in cell_rows if r["protocol"] == "label_efficiency"]),
               # each cell's run wrote its own history here in turn; keep them all, by cell
               "history": write_scores(reports / "history.csv", histories),
               "figure": plot_sweep(efficiency, loso, names, arms, reports / "sweep.png")}
    by_arm: dict[str, int] = defaultdict(int)
    for cell in cells:
        by_arm[cell.arm] += 1
    metrics = {"cells": len(cells), "cells_per_arm": dict(by_arm), "steps": cfg.steps or finetune.steps,
               "held_out_cases": len(held_out), "sites": sites, **summary, "per_cell": cell_rows,
               "lesion_classification": lesion_probe(list(cfg.inits), paths=paths, data=data,
                                                     label_names=finetune.label_names, seed=finetune.seed)}
    outputs["metrics"] = write_json(reports / "metrics.json", metrics)
    outputs["tables"] = write_text(reports / "tables.md", sweep_tables(metrics))
    log.info("%s: goals %s", STAGE, metrics["goals"])
    return StageResult(STAGE, outputs, metrics)
