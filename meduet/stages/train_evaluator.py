"""Stage ``train-evaluator``: the synthesis evaluator, trained on real harmonized images on Ray Train.

Inputs: the harmonized images and label maps (``paths.harmonized``) and the latent cache's
manifest (``paths.latents``), whose split decides what is trained on (``train``) and what
the evaluator is judged on (``held_out``). Never latents, never MeDUET: the evaluator must
not share the generative stages' view of the data.

Outputs: ``paths.models/evaluator/evaluator.pt`` (``meduet.artifacts.evaluator``) and
``paths.reports/train_evaluator/``: ``metrics.json`` (held-out site accuracy, per volume and
per crop, with Wilson intervals; per-organ Dice), ``history.csv`` and ``loss.png``.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch

from meduet.artifacts.evaluator import evaluator_path, save_evaluator
from meduet.config import Paths, RayConfig, TrainEvaluatorConfig
from meduet.data.labelled import LabelledCase, label_classes, labelled_cases
from meduet.data.latents import MANIFEST
from meduet.data.volumes import load_volume
from meduet.engine.evaluator_training import TERMS, build_trainer
from meduet.engine.probes import proportion_ci
from meduet.engine.training_stage import finish_training_stage, fit_trainer
from meduet.evaluation.scoring import VolumeReader, organ_dice
from meduet.harmonize.manifest import harmonized_range
from meduet.io.atomic import write_json
from meduet.models.architectures import EvaluatorArchitecture
from meduet.models.evaluator import EvaluatorNet
from meduet.stages import StageError, StageResult

log = logging.getLogger(__name__)

STAGE = "train_evaluator"


def held_out_scores(reader: VolumeReader, cases: list[LabelledCase], *, sites: list[str],
                    label_ids: list[int]) -> dict:
    """Site accuracy (per volume: mean probability over its body crops; per crop) and per-organ Dice."""
    rows, crops_correct, crops_total = [], 0, 0
    for case in cases:
        image = load_volume(case.image)  # (1, D, H, W)
        truth = label_classes(load_volume(case.label)[0], label_ids)  # (D, H, W)
        probs = reader.site(image)  # (n crops, K)
        site = sites.index(case.site)
        crops_correct += int((probs.argmax(1) == site).sum())
        crops_total += len(probs)
        rows.append({"case": case.key, "site": case.site, "predicted_site": sites[int(probs.mean(0).argmax())],
                     "dice": organ_dice(reader.organs(image), truth, len(label_ids))})
    if not rows:
        return {"held_out_cases": 0, "site_accuracy": None, "dice_mean": None}
    correct = sum(r["site"] == r["predicted_site"] for r in rows)
    dice = np.stack([r["dice"] for r in rows])  # (cases, L - 1), NaN: organ absent
    organs = {str(label): float(np.nanmean(dice[:, i])) for i, label in enumerate(label_ids[1:])
              if not np.isnan(dice[:, i]).all()}
    return {"held_out_cases": len(rows), "site_accuracy": correct / len(rows),
            "site_accuracy_ci95": proportion_ci(correct, len(rows)), "site_crop_accuracy": crops_correct / crops_total,
            "site_crop_accuracy_ci95": proportion_ci(crops_correct, crops_total), "site_crops": crops_total,
            "dice_per_organ": organs, "dice_mean": float(np.mean(list(organs.values()))) if organs else None,
            "per_case": [{**{k: r[k] for k in ("case", "site", "predicted_site")},
                          "dice_mean": float(np.nanmean(r["dice"]))} for r in rows]}


def run(cfg: TrainEvaluatorConfig, paths: Paths, ray: RayConfig) -> StageResult:
    """Train the evaluator on the train split, judge it on the held-out split, save it."""
    cases = labelled_cases(paths.harmonized, paths.latents)
    train = [c for c in cases if c.split == "train"]
    held_out = [c for c in cases if c.split == "held_out"]
    sites = sorted({c.site for c in cases})
    if len({c.site for c in train}) < 2:
        raise StageError(f"{paths.latents / MANIFEST}: the evaluator's site head needs train cases of at least 2 "
                         f"sites, found {sorted({c.site for c in train})}")
    label_ids = sorted({0, *(label for c in train for label in c.labels_present)})
    if len(label_ids) < 2:
        raise StageError(f"{paths.harmonized / 'manifest.csv'}: the train cases' label maps hold no organ")
    arch = EvaluatorArchitecture(channels=tuple(cfg.channels), num_sites=len(sites), num_labels=len(label_ids),
                                 dropout=cfg.dropout)
    # The run key covers the section, the code and this listing: other images or another split is another run.
    inputs = write_json(paths.work / "inputs" / f"{STAGE}.json", {
        name: hashlib.sha256(path.read_bytes()).hexdigest()
        for name, path in (("harmonized", paths.harmonized / "manifest.csv"), ("split", paths.latents / MANIFEST))})
    trained = fit_trainer(stage=STAGE, cfg=cfg, build=build_trainer,
                          inputs={"architecture": arch, "label_ids": label_ids,
                                  "volumes": [(str(c.image), str(c.label), sites.index(c.site)) for c in train]},
                          input_manifest=inputs, paths=paths, ray=ray)

    model = EvaluatorNet(arch)
    model.load_state_dict(trained.state["model"])
    torch.manual_seed(cfg.seed)
    value_range = harmonized_range({c.key: c.window for c in cases}, paths.harmonized / "manifest.csv")
    reader = VolumeReader.from_section(model, cfg, value_range)
    scores = held_out_scores(reader, held_out, sites=sites, label_ids=label_ids)
    if not held_out:
        log.warning("%s: the latent cache holds no held-out case; the evaluator is not judged", STAGE)
    target = save_evaluator(evaluator_path(paths), state=trained.state["model"], architecture=arch,
                            config=cfg.model_dump(mode="json"), sites=sites, label_ids=label_ids,
                            train_cases=[c.key for c in train], held_out_cases=[c.key for c in held_out])
    final = trained.history[-1] if trained.history else {}
    metrics = {"steps": int(trained.state["step"]), "train_cases": len(train), "sites": sites, "label_ids": label_ids,
               **scores, "final": {term: final[term] for term in TERMS if term in final}}
    return finish_training_stage(STAGE, paths=paths, outputs={"model": target}, metrics=metrics, run=trained,
                                 terms=TERMS[:3], title="Synthesis evaluator training")
