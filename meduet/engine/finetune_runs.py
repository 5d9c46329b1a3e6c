"""Fine-tuning runs of the segmenter, shared by the ``finetune`` and ``finetune-sweep`` stages.

:func:`segmentation_data` reads and checks the labelled cases (latent cache, harmonized
files, settings, label values, VAE); :func:`fit_segmenter` trains one segmenter on Ray Train
(its own resumable run); :func:`score_segmenter` segments held-out volumes and scores each
organ with ``monai.metrics`` (:func:`evaluate`), and :func:`summarize` averages the rows;
:func:`large_organs` scores the organs the analysis issue's all-labels goal names.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from meduet.artifacts.pretrained import load_meduet, meduet_path
from meduet.artifacts.vae import vae_path
from meduet.config import FinetuneConfig, HarmonizeConfig, Paths, RayConfig
from meduet.data.latents import MANIFEST, SCALE, LatentRecord, read_manifest, read_scale
from meduet.engine.finetune_training import CaseFiles, build_trainer, read_case
from meduet.engine.metrics import grouped_mean_ci95, mean_ci95
from meduet.engine.segmentation import organ_metrics, segment_volume
from meduet.engine.training_stage import TrainedRun, fit_trainer
from meduet.harmonize.manifest import CaseRecord
from meduet.harmonize.manifest import read_manifest as read_harmonized
from meduet.harmonize.settings import case_settings
from meduet.io.atomic import write_json, write_text
from meduet.io.images import sha256_file
from meduet.models.architectures import MeduetArchitecture, SegmenterArchitecture
from meduet.models.meduet import MeduetModel
from meduet.models.segmenter import LatentSegmenter
from meduet.stages import StageError

log = logging.getLogger(__name__)
SCORES = ("dice", "hd95", "surface_dice")
LARGE_ORGAN_TARGET = 0.85  # the analysis issue: mean Dice on the large organs with all labels


def labelled_cases(records: list[LatentRecord], per_site: int | str, seed: int = 0) -> list[LatentRecord]:
    """``per_site`` records of each site (all with ``"all"``), the labelled subjects of ``seed``.

    A site's records in key order are dealt out in turns: seed 0 takes the first ``per_site``,
    seed 1 the next ``per_site`` (wrapping round), and so on, so the seeds of a sweep label
    different subjects wherever a site has enough of them and the spread over seeds includes
    the choice of subjects, not only the initialisation and batches.
    """
    by_site: dict[str, list[LatentRecord]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r.key):
        by_site[record.domain].append(record)
    if per_site == "all":
        return [r for site in sorted(by_site) for r in by_site[site]]
    chosen = []
    for site in sorted(by_site):
        pool, count = by_site[site], min(int(per_site), len(by_site[site]))
        first = seed * count % len(pool)
        chosen += sorted((pool[(first + i) % len(pool)] for i in range(count)), key=lambda r: r.key)
    return chosen


@dataclass(frozen=True)
class SegmentationData:
    """The labelled cases of the latent cache with their harmonized files, checked against the settings."""

    records: list[LatentRecord]  # latent records whose harmonized case has a label map
    harmonized: dict[str, CaseRecord]
    scale: float  # the latent cache's scale factor
    input_hashes: dict[str, str]  # what a run's key covers besides its section

    def files(self, paths: Paths, record: LatentRecord) -> CaseFiles:
        case = self.harmonized[record.key]
        return CaseFiles(latent=str(paths.latents / record.latent), image=str(paths.harmonized / case.image),
                         label=str(paths.harmonized / case.label), floor=case.window[2])

    def split(self, name: str) -> list[LatentRecord]:
        return sorted((r for r in self.records if r.split == name), key=lambda r: r.key)


def segmentation_data(paths: Paths, harmonize: HarmonizeConfig, label_names: list[str]) -> SegmentationData:
    """The latent records with a label map and their harmonized records.

    Raises:
        StageError: a missing cache or dataset, cases harmonized with other settings, label values
            past ``label_names``, or latents encoded with another VAE than the saved one.
    """
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
    too_high = {r.key: max(harmonized[r.key].labels_present) for r in records
                if max(harmonized[r.key].labels_present, default=0) >= len(label_names)}
    if too_high:
        raise StageError(f"{harmonized_manifest}: label values past finetune.label_names ({len(label_names)} names): "
                         f"{too_high}")
    vae_sha = sha256_file(vae_path(paths))
    other_vae = sorted(r.key for r in records if r.vae_sha256 != vae_sha)
    if other_vae:
        raise StageError(f"{manifest}: latents of {other_vae[:3]} were encoded with another VAE than "
                         f"{vae_path(paths)}: rerun encode-latents")
    return SegmentationData(records=records, harmonized=harmonized, scale=read_scale(paths.latents), input_hashes={
        "latents": sha256_file(manifest), "scale": sha256_file(paths.latents / SCALE),
        "harmonized": sha256_file(harmonized_manifest), "settings": expected, "vae": vae_sha})


PRETRAINED_STAGES = {"meduet": "pretrain", "mae": "pretrain_mae"}  # by init: the stage whose file initialises


def backbone_source(paths: Paths, init: str, held_out: list[LatentRecord]) -> tuple[MeduetModel, Path]:
    """The pretrained network whose shape (and, unless ``init`` is scratch, EMA weights) the encoder takes.

    Scratch takes MeDUET's shape, so every initialisation trains the same network.

    Raises:
        StageError: the file's pretraining saw a held-out case.
    """
    source = meduet_path(paths, PRETRAINED_STAGES.get(init, "pretrain"))
    pretrained, meta = load_meduet(source, "teacher")
    seen = sorted(set(meta.get("train_latents", [])) & {r.key for r in held_out})
    if seen:
        raise StageError(f"{source}: pretraining saw held-out case(s) {seen}; they cannot measure fine-tuning")
    return pretrained, source


def head_architecture(cfg: FinetuneConfig) -> SegmenterArchitecture:
    return SegmenterArchitecture(num_classes=len(cfg.label_names), decoder=cfg.decoder, features=cfg.features,
                                 image_features=cfg.image_features, body_context=cfg.body_context)


def fit_segmenter(cfg: FinetuneConfig, *, stage: str, paths: Paths, ray: RayConfig, data: SegmentationData,
                  train: list[LatentRecord], held_out: list[LatentRecord], run_name: str,
                  progress_name: str | None = None, extra: Sequence[tuple[str, CaseFiles]] = (),
                  extra_sha256: str | None = None) -> tuple[TrainedRun, dict]:
    """Fine-tune one segmenter on ``train``'s labels (resuming the run of the same key).

    ``progress_name`` names the run in progress lines (``training_stage.fit_trainer``).
    ``extra``: more training cases by key (e.g. style-swapped translations of ``train``'s scans
    with their labels), from a file whose SHA-256 ``extra_sha256`` is part of the run key.

    Returns:
        the trained run and what it was built from: ``backbone`` (its shape), ``source`` (the
        pretrained file), ``source_sha256`` (None for scratch).
    """
    if not train:
        raise StageError(f"{paths.latents / MANIFEST}: no labelled case of the train split")
    pretrained, source = backbone_source(paths, cfg.init, held_out)
    init_file = None if cfg.init == "scratch" else str(source)
    source_sha = None if init_file is None else sha256_file(source)
    # The run key covers the section, the code and this listing: other latents, labels, harmonization
    # settings or pretrained weights are another run.
    inputs = write_json(paths.work / "inputs" / stage / f"{run_name}.json",
                        {**data.input_hashes, "pretrained": source_sha, "labelled": [r.key for r in train],
                         **({"extra": [key for key, _ in extra], "extra_sha256": extra_sha256} if extra else {})})
    log.info("%s: %s: %d labelled training case(s) (%s per site)%s, %d held-out, init %s, decoder %s", stage,
             run_name, len(train), cfg.labels_per_site, f" and {len(extra)} synthetic" if extra else "",
             len(held_out), cfg.init, cfg.decoder)
    trained = fit_trainer(stage=stage, cfg=cfg, build=build_trainer, inputs={
        "backbone": pretrained.config, "head": head_architecture(cfg), "meduet_file": init_file,
        "cases": [data.files(paths, r) for r in train] + [files for _, files in extra], "scale": data.scale},
        input_manifest=inputs, paths=paths, ray=ray, progress_name=progress_name)
    return trained, {"backbone": pretrained.config, "source": source, "source_sha256": source_sha}


def score_segmenter(trained: TrainedRun, backbone: MeduetArchitecture, cfg: FinetuneConfig, *, paths: Paths,
                    data: SegmentationData, cases: list[LatentRecord]) -> tuple[LatentSegmenter, list[dict]]:
    """The trained segmenter (eval mode) and its score rows on ``cases`` (see :func:`evaluate`)."""
    model = LatentSegmenter(backbone, head_architecture(cfg))
    model.load_state_dict(trained.state["model"])
    model.eval()
    return model, evaluate(model, [(r, data.files(paths, r)) for r in cases], scale=data.scale, cfg=cfg)


def evaluate(model: LatentSegmenter, cases: list[tuple[LatentRecord, CaseFiles]], *, scale: float,
             cfg: FinetuneConfig) -> list[dict]:
    """One score row per held-out case and organ present in its label map: ``SCORES`` and the organ's true
    volume in mL (``volume_ml``)."""
    rows = []
    for record, files in cases:
        latent, image, label = read_case(files, scale)
        spacing = tuple(float(s) for s in reversed(sitk.ReadImage(files.image).GetSpacing()))  # (D, H, W) axes
        voxels = np.bincount(label.ravel().astype(np.int64), minlength=len(cfg.label_names))
        pred = segment_volume(model, latent, image, overlap=cfg.overlap, batch_size=cfg.window_batch,
                              image_fill=files.floor)
        scores = organ_metrics(pred, label, list(range(1, len(cfg.label_names))), spacing, cfg.surface_tolerance_mm)
        for c, values in scores.items():
            rows.append({"case": record.key, "site": record.domain, "organ": cfg.label_names[c],
                         **{k: (None if math.isinf(v) else round(v, 4)) for k, v in values.items()},
                         "volume_ml": round(float(voxels[c]) * math.prod(spacing) / 1000.0, 2)})
        log.info("%s: mean Dice %.3f over %d organs", record.key,
                 np.mean([v["dice"] for v in scores.values()]), len(scores))
    return rows


def mean(values: list) -> float | None:
    """The mean of the values that are not None, to 4 digits (None when there are none)."""
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 4) if values else None


def summarize(rows: list[dict], seed: int = 0) -> dict:
    """Per site and organ, per organ (mean over sites), per site (mean over organs) and overall means, each overall
    mean with its 95 % interval (``ci95``: a bootstrap over cases, each case's organs resampled together)."""
    out: dict = {}
    for score in SCORES:
        by_site: dict[str, dict[str, float | None]] = defaultdict(dict)
        for row in rows:
            by_site[row["site"]][row["organ"]] = row[score]
        organs = sorted({row["organ"] for row in rows})
        scored = [row for row in rows if row[score] is not None]
        out[score] = {
            "by_site": dict(by_site),
            "by_organ": {o: mean([row[score] for row in rows if row["organ"] == o]) for o in organs},
            "site_mean": {s: mean(list(v.values())) for s, v in by_site.items()},
            "mean": mean([row[score] for row in rows]),
            "ci95": grouped_mean_ci95([row[score] for row in scored], [row["case"] for row in scored], seed),
        }
    out["hd95"]["missed"] = sum(row["hd95"] is None for row in rows)  # organs never predicted (HD95 undefined)
    return out


def large_organs(rows: list[dict], min_ml: float, seed: int = 0) -> dict:
    """The organs whose true volume, averaged over the rows that hold them, is at least ``min_ml``, and their Dice.

    ``dice``: the mean over cases of each case's mean Dice over the large organs it holds (an organ
    never predicted counts 0); ``ci95``: a percentile bootstrap of that mean over cases (scipy; None
    for one case or no spread); ``by_organ``: each large organ's mean Dice. Empty when no row has a
    volume (scores written before volumes were).
    """
    volumes: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row.get("volume_ml") is not None:
            volumes[row["organ"]].append(row["volume_ml"])
    organs = sorted(o for o, v in volumes.items() if np.mean(v) >= min_ml)
    out: dict = {"min_ml": min_ml, "organs": organs,
                 "mean_volume_ml": {o: round(float(np.mean(volumes[o])), 1) for o in organs}}
    per_case: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["organ"] in organs:
            per_case[row["case"]].append(row["dice"])
    if not per_case:
        return out | {"dice": None, "ci95": None, "by_organ": {}, "cases": 0}
    case_means = np.array([np.mean(v) for v in per_case.values()])
    return out | {"dice": round(float(case_means.mean()), 4), "ci95": mean_ci95(case_means, seed),
                  "cases": len(case_means),
                  "by_organ": {o: mean([r["dice"] for r in rows if r["organ"] == o]) for o in organs}}


def write_scores(target: Path, rows: list[dict]) -> Path:
    """One CSV line per row (its keys, in order; empty where None)."""
    header = list(rows[0]) if rows else ["case", "site", "organ", *SCORES]
    lines = [",".join(header)] + [",".join("" if row[k] is None else str(row[k]) for k in header) for row in rows]
    return write_text(target, "\n".join(lines) + "\n")


def read_scores(source: Path) -> list[dict]:
    """Rows of a :func:`write_scores` file with their types back: ``SCORES`` and ``volume_ml`` as floats (None
    where empty), ``seed`` and a numeric ``labels_per_site`` as ints; every other column as text."""
    def typed(key: str, text: str) -> object:
        if key in (*SCORES, "volume_ml"):
            return None if text == "" else float(text)
        if key == "seed" or (key == "labels_per_site" and text.isdigit()):
            return int(text)
        return text

    with open(source, newline="") as handle:
        return [{key: typed(key, text) for key, text in row.items()} for row in csv.DictReader(handle)]
