"""Stage ``finetune``: organ segmentation over VAE latents with the MeDUET encoder as backbone, on Ray Train.

Inputs: the latent cache (``paths.latents``: manifest with its ``split``, scale factor, latents),
the harmonized dataset (``paths.harmonized``: the image each latent was encoded from and its
label map), the pretrained MeDUET file (its shape, and with ``init: meduet`` its encoder
weights) and the VAE file (stored with the segmenter so ``meduet predict`` encodes as the
cache did). Training uses the ``train`` split's labelled cases, ``labels_per_site`` of them per
site (the first by key); evaluation the ``held_out`` split: subjects no training stage saw.

Outputs: ``paths.models/finetune/segmenter.pt`` (see ``meduet.artifacts.segmenter``) and
``paths.reports/finetune/``: ``metrics.json`` (Dice, HD95 in mm and surface Dice per organ
per site on the held-out cases, their means, the labelled cases), ``scores.csv`` (one row
per held-out case and organ), ``history.csv`` and ``loss.png``.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from meduet.artifacts.pretrained import load_meduet, meduet_path
from meduet.artifacts.segmenter import save_segmenter, segmenter_path
from meduet.artifacts.vae import load_vae, vae_path
from meduet.config import FinetuneConfig, HarmonizeConfig, Paths, RayConfig
from meduet.data.latents import MANIFEST, SCALE, LatentRecord, read_manifest, read_scale
from meduet.engine.finetune_training import TERMS, CaseFiles, build_trainer, read_case
from meduet.engine.segmentation import organ_metrics, segment_volume
from meduet.engine.training_stage import finish_training_stage, fit_trainer
from meduet.harmonize.manifest import CaseRecord
from meduet.harmonize.manifest import read_manifest as read_harmonized
from meduet.harmonize.settings import case_settings
from meduet.io.atomic import write_json, write_text
from meduet.io.images import sha256_file
from meduet.models.architectures import SegmenterArchitecture, VAEArchitecture
from meduet.models.segmenter import LatentSegmenter
from meduet.stages import StageError, StageResult

log = logging.getLogger(__name__)

STAGE = "finetune"
SCORES = ("dice", "hd95", "surface_dice")


def labelled_cases(records: list[LatentRecord], per_site: int | str) -> list[LatentRecord]:
    """The first ``per_site`` records of each site by key (all with ``"all"``)."""
    by_site: dict[str, list[LatentRecord]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.key):
        by_site[record.domain].append(record)
    return [r for site in sorted(by_site) for r in (by_site[site] if per_site == "all" else by_site[site][:per_site])]


def _cases(paths: Paths, harmonize: HarmonizeConfig) -> tuple[list[LatentRecord], dict[str, CaseRecord]]:
    """Latent records with a label map, and their harmonized records, checked against the settings."""
    manifest = paths.latents / MANIFEST
    if not manifest.is_file():
        raise StageError(f"{manifest}: no latent cache; run the encode-latents stage first")
    harmonized_manifest = paths.harmonized / "manifest.csv"
    if not harmonized_manifest.is_file():
        raise StageError(f"{harmonized_manifest}: no harmonized dataset; run the harmonize stage first")
    harmonized = {r.key: r for r in read_harmonized(harmonized_manifest) if r.status == "ok"}
    expected = case_settings(harmonize).settings_hash
    stale = sorted(k for k, r in harmonized.items() if r.settings_hash != expected)
    if stale:
        raise StageError(f"{harmonized_manifest}: {len(stale)} case(s) (e.g. {stale[0]}) were harmonized with other "
                         f"settings than params' harmonize section (settings hash {expected}); the segmenter would "
                         f"store settings its training data never saw: rerun the harmonize stage")
    records = [r for r in read_manifest(paths.latents) if r.key in harmonized and harmonized[r.key].label]
    return records, harmonized


def _files(paths: Paths, record: LatentRecord, harmonized: CaseRecord) -> CaseFiles:
    return CaseFiles(latent=str(paths.latents / record.latent), image=str(paths.harmonized / harmonized.image),
                     label=str(paths.harmonized / harmonized.label))


def evaluate(model: LatentSegmenter, cases: list[tuple[LatentRecord, CaseFiles]], *, scale: float,
             cfg: FinetuneConfig) -> list[dict]:
    """One score row per held-out case and organ present in its label map (``SCORES`` and the voxel counts)."""
    rows = []
    for record, files in cases:
        latent, image, label = read_case(files, scale)
        spacing = tuple(float(s) for s in reversed(sitk.ReadImage(files.image).GetSpacing()))  # (D, H, W) axes
        pred = segment_volume(model, latent, image, overlap=cfg.overlap, batch_size=cfg.window_batch)
        scores = organ_metrics(pred, label, list(range(1, len(cfg.label_names))), spacing, cfg.surface_tolerance_mm)
        for c, values in scores.items():
            rows.append({"case": record.key, "site": record.domain, "organ": cfg.label_names[c],
                         **{k: (None if math.isinf(v) else round(v, 4)) for k, v in values.items()}})
        log.info("%s: %s mean Dice %.3f over %d organs", STAGE, record.key,
                 np.mean([v["dice"] for v in scores.values()]), len(scores))
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per site and organ, per organ (mean over sites), per site (mean over organs) and overall means."""
    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return round(float(np.mean(values)), 4) if values else None

    out: dict = {}
    for score in SCORES:
        by_site: dict[str, dict[str, float | None]] = defaultdict(dict)
        for row in rows:
            by_site[row["site"]][row["organ"]] = row[score]
        organs = sorted({row["organ"] for row in rows})
        out[score] = {
            "by_site": dict(by_site),
            "by_organ": {o: mean([row[score] for row in rows if row["organ"] == o]) for o in organs},
            "site_mean": {s: mean(list(v.values())) for s, v in by_site.items()},
            "mean": mean([row[score] for row in rows]),
        }
    out["hd95"]["missed"] = sum(row["hd95"] is None for row in rows)  # organs never predicted (HD95 undefined)
    return out


def _write_scores(target: Path, rows: list[dict]) -> Path:
    header = ["case", "site", "organ", *SCORES]
    lines = [",".join(header)] + [",".join("" if row[k] is None else str(row[k]) for k in header) for row in rows]
    return write_text(target, "\n".join(lines) + "\n")


def run(cfg: FinetuneConfig, paths: Paths, ray: RayConfig, harmonize: HarmonizeConfig) -> StageResult:
    """Fine-tune the segmenter, score it on the held-out cases and save it for ``meduet predict``."""
    records, harmonized = _cases(paths, harmonize)
    train = labelled_cases([r for r in records if r.split == "train"], cfg.labels_per_site)
    held_out = sorted((r for r in records if r.split == "held_out"), key=lambda r: r.key)
    if not train:
        raise StageError(f"{paths.latents / MANIFEST}: no labelled case of the train split")
    too_high = {r.key: max(harmonized[r.key].labels_present) for r in records
                if max(harmonized[r.key].labels_present, default=0) >= len(cfg.label_names)}
    if too_high:
        raise StageError(f"{paths.harmonized / 'manifest.csv'}: label values past finetune.label_names "
                         f"({len(cfg.label_names)} names): {too_high}")
    teacher_file = meduet_path(paths)
    pretrained, meta = load_meduet(teacher_file, "teacher")
    seen = sorted(set(meta.get("train_latents", [])) & {r.key for r in held_out})
    if seen:
        raise StageError(f"{teacher_file}: pretraining saw held-out case(s) {seen}; they cannot measure fine-tuning")
    vae_file = vae_path(paths)
    vae, vae_meta = load_vae(vae_file)
    vae_sha = sha256_file(vae_file)
    other_vae = sorted(r.key for r in records if r.vae_sha256 != vae_sha)
    if other_vae:
        raise StageError(f"{paths.latents / MANIFEST}: latents of {other_vae[:3]} were encoded with another VAE than "
                         f"{vae_file}: rerun encode-latents")
    scale = read_scale(paths.latents)
    head = SegmenterArchitecture(num_classes=len(cfg.label_names), decoder=cfg.decoder, features=cfg.features,
                                 image_features=cfg.image_features)
    meduet_sha = sha256_file(teacher_file)
    settings_hash = case_settings(harmonize).settings_hash
    # The run key covers the section, the code and this listing: other latents, labels, harmonization
    # settings or pretrained weights are another run.
    inputs = write_json(paths.work / "inputs" / f"{STAGE}.json", {
        "latents": sha256_file(paths.latents / MANIFEST), "scale": sha256_file(paths.latents / SCALE),
        "harmonized": sha256_file(paths.harmonized / "manifest.csv"), "settings": settings_hash,
        "meduet": meduet_sha, "labelled": [r.key for r in train]})
    log.info("%s: %d labelled training case(s) (%s per site), %d held-out, init %s, decoder %s", STAGE, len(train),
             cfg.labels_per_site, len(held_out), cfg.init, cfg.decoder)

    init_file = None if cfg.init == "scratch" else str(teacher_file)
    trained = fit_trainer(stage=STAGE, cfg=cfg, build=build_trainer, inputs={
        "backbone": pretrained.config, "head": head, "meduet_file": init_file,
        "cases": [_files(paths, r, harmonized[r.key]) for r in train], "scale": scale},
        input_manifest=inputs, paths=paths, ray=ray)
    state, history = trained.state, trained.history

    model = LatentSegmenter(pretrained.config, head)
    model.load_state_dict(state["model"])
    rows = evaluate(model.eval(), [(r, _files(paths, r, harmonized[r.key])) for r in held_out], scale=scale, cfg=cfg)
    steps = int(state["step"])
    target = save_segmenter(
        segmenter_path(paths), model=state["model"], architecture=head, backbone=pretrained.config,
        config=cfg.model_dump(mode="json"), harmonize=harmonize.model_dump(mode="json"), labels=list(cfg.label_names),
        scale_factor=scale, vae_state=vae.state_dict(),
        vae_architecture=VAEArchitecture.from_dict(vae_meta["architecture"]), vae_sha256=vae_sha,
        meduet_sha256=None if init_file is None else meduet_sha,
        labelled_cases=[r.key for r in train], steps=steps)
    sites = sorted({r.domain for r in records if r.split == "train"})
    metrics = {"steps": steps, "init": cfg.init, "decoder": cfg.decoder, "labels_per_site": cfg.labels_per_site,
               "labelled_cases": len(train), "labelled_fraction": {
                   s: round(sum(r.domain == s for r in train) / sum(r.domain == s and r.split == "train"
                                                                    for r in records), 4) for s in sites},
               "held_out_cases": len(held_out), **summarize(rows),
               "first": {t: history[0][t] for t in TERMS} if history else {},
               "final": {t: history[-1][t] for t in TERMS} if history else {}}
    if not held_out:
        log.warning("%s: no held-out labelled case; nothing scored", STAGE)
    outputs = {"model": target, "scores": _write_scores(paths.reports / STAGE / "scores.csv", rows)}
    return finish_training_stage(STAGE, paths=paths, outputs=outputs, metrics=metrics, run=trained, terms=TERMS,
                                 title=f"Segmentation fine-tuning ({cfg.init}, {cfg.decoder})")

