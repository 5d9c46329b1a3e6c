"""Stage ``finetune``: organ segmentation over VAE latents with the MeDUET encoder as backbone, on Ray Train.

Inputs: the latent cache (``paths.latents``: manifest with its ``split``, scale factor, latents),
the harmonized dataset (``paths.harmonized``: the image each latent was encoded from and its
label map), the pretrained MeDUET file (its shape, and with ``init: meduet`` its encoder
weights) and the VAE file (stored with the segmenter so ``meduet predict`` encodes as the
cache did). Training uses the ``train`` split's labelled cases, ``labels_per_site`` of them per
site (the first by key); evaluation the ``held_out`` split: subjects no training stage saw.

Outputs: ``paths.models/finetune/segmenter.pt`` (see ``meduet.artifacts.segmenter``) and
``paths.reports/finetune/``: ``metrics.json`` (Dice, HD95 in mm and surface Dice per organ
per site on the held-out cases, their means, the labelled cases; the large organs' mean Dice,
and with all labels the analysis issue's goal on it), ``scores.csv`` (one row per held-out
case and organ), ``history.csv`` and ``loss.png``.
"""

from __future__ import annotations

import logging

from meduet.artifacts.segmenter import save_segmenter, segmenter_path
from meduet.artifacts.vae import load_vae, vae_path
from meduet.config import FinetuneConfig, HarmonizeConfig, Paths, RayConfig
from meduet.data.latents import LatentRecord
from meduet.engine.finetune_runs import (
    LARGE_ORGAN_TARGET,
    fit_segmenter,
    head_architecture,
    labelled_cases,
    large_organs,
    score_segmenter,
    segmentation_data,
    summarize,
    write_scores,
)
from meduet.engine.finetune_training import TERMS
from meduet.engine.training_stage import finish_training_stage
from meduet.models.architectures import VAEArchitecture
from meduet.stages import StageResult

log = logging.getLogger(__name__)

STAGE = "finetune"


def run(cfg: FinetuneConfig, paths: Paths, ray: RayConfig, harmonize: HarmonizeConfig) -> StageResult:
    """Fine-tune the segmenter, score it on the held-out cases and save it for ``meduet predict``."""
    data = segmentation_data(paths, harmonize, cfg.label_names)
    train = labelled_cases(data.split("train"), cfg.labels_per_site, cfg.seed)
    held_out = data.split("held_out")
    trained, built = fit_segmenter(cfg, stage=STAGE, paths=paths, ray=ray, data=data, train=train,
                                   held_out=held_out, run_name=STAGE)
    model, rows = score_segmenter(trained, built["backbone"], cfg, paths=paths, data=data, cases=held_out)
    state, history = trained.state, trained.history
    steps = int(state["step"])
    vae, vae_meta = load_vae(vae_path(paths))
    target = save_segmenter(
        segmenter_path(paths), model=state["model"], architecture=head_architecture(cfg), backbone=built["backbone"],
        config=cfg.model_dump(mode="json"), harmonize=harmonize.model_dump(mode="json"), labels=list(cfg.label_names),
        scale_factor=data.scale, vae_state=vae.state_dict(),
        vae_architecture=VAEArchitecture.from_dict(vae_meta["architecture"]), vae_sha256=data.input_hashes["vae"],
        meduet_sha256=built["source_sha256"], labelled_cases=[r.key for r in train], steps=steps)
    sites = sorted({r.domain for r in data.split("train")})
    metrics = {"steps": steps, "init": cfg.init, "decoder": cfg.decoder, "labels_per_site": cfg.labels_per_site,
               "labelled_cases": len(train), "labelled_fraction": labelled_fraction(train, data.split("train"), sites),
               "held_out_cases": len(held_out), **summarize(rows, cfg.seed),
               "first": {t: history[0][t] for t in TERMS} if history else {},
               "final": {t: history[-1][t] for t in TERMS} if history else {},
               "large_organs": large_organs(rows, cfg.large_organ_min_ml, cfg.seed)}
    metrics |= large_organ_goal(metrics["large_organs"], cfg.labels_per_site)
    if not held_out:
        log.warning("%s: no held-out labelled case; nothing scored", STAGE)
    outputs = {"model": target, "scores": write_scores(paths.reports / STAGE / "scores.csv", rows)}
    return finish_training_stage(STAGE, paths=paths, outputs=outputs, metrics=metrics, run=trained, terms=TERMS,
                                 title=f"Segmentation fine-tuning ({cfg.init}, {cfg.decoder})")


def labelled_fraction(labelled: list[LatentRecord], train: list[LatentRecord], sites: list[str]) -> dict[str, float]:
    """Per site, the share of its training subjects whose labels were used."""
    return {s: round(sum(r.domain == s for r in labelled) / max(1, sum(r.domain == s for r in train)), 4)
            for s in sites}


def large_organ_goal(large: dict, labels_per_site: int | str) -> dict:
    """With all labels: the large organs' mean Dice as ``large_organ_dice_all_labels`` and the analysis issue's
    goal on it (``goals``); nothing with fewer labels, where the goal does not apply."""
    if labels_per_site != "all" or large["dice"] is None:
        return {}
    key = f"all_labels_large_organ_dice_at_least_{LARGE_ORGAN_TARGET}"
    return {"large_organ_dice_all_labels": large["dice"],
            "goals": {key: {"value": large["dice"], "target": LARGE_ORGAN_TARGET, "organs": large["organs"],
                            "met": large["dice"] >= LARGE_ORGAN_TARGET}}}
