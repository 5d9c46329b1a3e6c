"""Stage ``synthesize``: held-out scans translated into other sites' styles, and new crops per site.

Inputs: the trained DiT (``paths.models/diffusion/dit.pt``), the MeDUET file it was trained
with (its teacher encodes the content tokens of each source), the factor store (its teacher's
volume styles give each site's style: the mean over the site's training volumes), the latent
cache and the frozen VAE (decoding), the harmonized manifest (each source's grid and affine).

Two uses of the factors (issue 10):

- *translation* (``translations`` pairs): a held-out scan A, whole volume, sampled from noise
  with A's content tokens window by window and site B's style (``meduet.diffusion.sampling``),
  decoded onto A's harmonized grid with A's affine: A's anatomy as site B would acquire it;
- *generation* (``samples_per_site`` per site): a crop of the DiT's input size from one
  training volume's content vector (``generation_content: volume``, as the authors generate;
  ``window``: one of its body windows' content) and the site's style;
- *augmentation* (``augmentations_per_scan``, off by default): each labelled training scan
  translated like the held-out ones into other sites' styles, for fine-tuning on
  style-swapped volumes with the source's labels (``finetune-sweep``'s ``synthetic_arm``).

With ``texture: site`` every decode also gets its target site's fine texture, the noise the VAE
cannot carry (``meduet.diffusion.texture``, fitted once per run on each site's training volumes
against their round trips); the latents are the same either way.

Sources come from the latent cache's ``held_out`` split, the subjects no training stage saw
(a cache without one falls back to ``train``, and the metrics say so). Every image has its
own seed (the run's seed and its position), runs as a Ray task (``workers``; through
``ray.exchange`` on nodes without this machine's files) and is recorded as soon as it is
written, so a killed run resumes where it stopped; a change of settings or of any input file
starts the store afresh (the run key). Outputs: ``paths.synthesis/`` (see
``meduet.artifacts.synthesis``) and ``paths.reports/synthesize/``: ``metrics.json``,
``translations.png`` and ``generated.png``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import tempfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import SimpleITK as sitk
import torch
from pydantic import ValidationError

from meduet import distributed as dist
from meduet.artifacts.diffusion import dit_path, load_dit
from meduet.artifacts.factors import FACTORS, FactorRecord, load_factors
from meduet.artifacts.pretrained import load_meduet, meduet_path
from meduet.artifacts.synthesis import (
    AUGMENTATIONS,
    GENERATED,
    LATENTS,
    TRANSLATIONS,
    WHOLE_SCAN_KINDS,
    SynthesisRecord,
    write_synthesis,
)
from meduet.artifacts.vae import load_vae, vae_path
from meduet.config import Paths, RayConfig, SynthesizeConfig, config_hash
from meduet.data.latents import MANIFEST, SCALE, LatentRecord, read_manifest, read_scale, save_array
from meduet.data.windows import box_fractions, window_origins
from meduet.diffusion import build_process
from meduet.diffusion.sampling import Guidance, TiledPredictor, crop_predictor, sample
from meduet.diffusion.texture import SiteTexture, add_texture, fit_texture, missing_variances
from meduet.engine.progress import Progress
from meduet.engine.runs import RunSpec, Scaling
from meduet.harmonize.intensity import range_level
from meduet.harmonize.manifest import harmonized_range
from meduet.harmonize.manifest import read_manifest as read_harmonized
from meduet.io.atomic import write_json
from meduet.io.exchange import Exchange
from meduet.io.figures import plt, save_figure
from meduet.io.images import read_image, sha256_file, write_image
from meduet.io.locks import output_lock
from meduet.io.prune import prune_unowned
from meduet.models.vae import decode_latent
from meduet.stages import StageError, StageResult

log = logging.getLogger(__name__)

STAGE = "synthesize"
# The subject in a case id (demo: site_a_003 -> 003), as evaluate_disentanglement.subject_pattern's
# default: it names the real s@B a translation s@A -> B is compared with.
SUBJECT_PATTERN = r"_(\d+)$"


# --------------------------------------------------------------------------- one image (a Ray task)
@functools.lru_cache(maxsize=2)
def _dit(path: str, weights: str) -> tuple[torch.nn.Module, dict]:
    return load_dit(Path(path), weights)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=2)
def _teacher(path: str) -> torch.nn.Module:
    return load_meduet(Path(path), "teacher")[0]


@functools.lru_cache(maxsize=2)
def _vae(path: str) -> torch.nn.Module:
    return load_vae(Path(path))[0]


def synthesize_one(job: dict[str, Any]) -> dict[str, Any]:
    """Sample, decode and write one image; returns its :class:`SynthesisRecord` as a dict.

    Models are loaded once per worker process (a task reuses the previous task's). With
    ``job["exchange"]`` (``ray.exchange``) the task opens no path of the driver's: the models,
    the source latent and its header come from the exchange (their SHA-256s in the job), the
    image and latent go back to it, and ``"shipped"`` maps each to its SHA-256 for the driver.
    """
    exchange: Exchange | None = job.get("exchange")
    if exchange is None:
        return _synthesize(job)
    with tempfile.TemporaryDirectory(prefix="meduet-synthesize-") as scratch:
        local = dict(job, store=str(Path(scratch) / "store"))
        for key, name in (("dit", "diffusion.pt"), ("meduet", "meduet.pt"), ("vae", "vae.pt")):
            local[key] = str(exchange.cached(job[key], name))
        for key, name in (("source_latent", "source.npy"), ("header", "header.nii.gz")):
            if job[key]:
                local[key] = str(exchange.get_file(job[key], Path(scratch) / name))
        result = _synthesize(local)
        result["shipped"] = {name: exchange.put_file(Path(local["store"]) / name)
                             for name in (job["record"]["latent"], job["record"]["image"])}
    return result


def _synthesize(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(job["threads"])
    start = time.perf_counter()
    dit, meta = _dit(job["dit"], job["weights"])
    process = build_process(meta["config"]["objective"], flow_time=meta["config"].get("flow_time", "uniform"))
    settings, scale = job["settings"], job["scale"]
    guidance = Guidance(settings["content_scale"], settings["style_scale"])
    generator = torch.Generator().manual_seed(job["seed"])
    style = torch.tensor(job["style"], dtype=torch.float32)
    with torch.no_grad():
        if job["record"]["kind"] in WHOLE_SCAN_KINDS:
            source = torch.from_numpy(np.load(job["source_latent"]).astype(np.float32)) * scale  # (C, D, H, W)
            predict = TiledPredictor(dit, _teacher(job["meduet"]), process, source=source, style=style,
                                     guidance=guidance, overlap=settings["window_overlap"],
                                     batch_size=settings["batch_size"],
                                     spatial=settings["translation_content"] == "tokens")
            noise = torch.randn((1, *source.shape), generator=generator)
            latent = sample(predict, process, noise, steps=settings["sampling_steps"], strength=settings["strength"],
                            source=source[None], clip=settings["ddpm_clip"])[0]
        else:
            content = torch.tensor(job["content"], dtype=torch.float32)[None]
            predict = crop_predictor(dit, process, content=content, style=style[None], guidance=guidance)
            noise = torch.randn((1, dit.config.in_channels, *dit.config.input_size), generator=generator)
            latent = sample(predict, process, noise, steps=settings["sampling_steps"], clip=settings["ddpm_clip"])[0]
        volume = decode_latent(_vae(job["vae"]), (latent / scale)[None], settings["max_voxels_per_split"])[0, 0]
        if job["texture"]:  # drawn after the latent's noise: the latent is the same with or without it
            volume = add_texture(volume, SiteTexture(**job["texture"]), threshold=job["body_level"],
                                 value_range=tuple(job["value_range"]), generator=generator)
    image = sitk.GetImageFromArray(volume.float().numpy())  # array (D, H, W) = image (x, y, z) reversed
    if job["header"]:
        header = sitk.ReadImage(job["header"])
        if header.GetSize() != image.GetSize():
            raise StageError(f"{job['header']}: harmonized grid {header.GetSize()} differs from the decoded "
                             f"latent's {image.GetSize()}; re-encode the latent cache")
        image.CopyInformation(header)
    else:
        image.SetSpacing(job["spacing"])
    out = Path(job["store"])
    save_array(out / job["record"]["latent"], latent.numpy())
    write_image(image, out / job["record"]["image"])
    return {**job["record"], "shape": list(volume.shape), "seconds": round(time.perf_counter() - start, 3)}


# --------------------------------------------------------------------------- site textures
def site_textures(cfg: SynthesizeConfig, *, latents: list[LatentRecord], harmonized_images: dict[str, Path],
                  latent_dir: Path, vae: torch.nn.Module, sites: list[str],
                  body_level: float) -> tuple[dict[str, SiteTexture], list]:
    """Each site's texture, fitted on its first ``texture_volumes_per_site`` training volumes (by key) against
    their VAE round trips (on voxels above ``body_level``), and the intensity range ``[low, high]`` of those real
    volumes (decodes are clipped to it).
    """
    textures, low, high = {}, np.inf, -np.inf
    for site in sites:
        chosen = sorted((r for r in latents if r.domain == site and r.split == "train"),
                        key=lambda r: r.key)[:cfg.texture_volumes_per_site]
        if not chosen:
            raise StageError(f"{STAGE}: texture site needs a training volume of {site} in {latent_dir / MANIFEST}")
        pairs = []
        for record in chosen:
            image = read_image(harmonized_images[record.key])
            real = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))  # (D, H, W)
            latent = torch.from_numpy(np.load(latent_dir / record.latent).astype(np.float32))[None]
            with torch.no_grad():
                trip = decode_latent(vae, latent, cfg.max_voxels_per_split)[0, 0]
            if trip.shape != real.shape:
                raise StageError(f"{latent_dir / record.latent}: decodes to {tuple(trip.shape)}, not the harmonized "
                                 f"{tuple(real.shape)} of {record.key}; re-encode the latent cache")
            pairs.append((real, trip))
            low, high = min(low, float(real.min())), max(high, float(real.max()))
        textures[site] = fit_texture(missing_variances(pairs, body_level))
        log.info("%s: %s texture: %.1f (intensity x 1000) at %.2f voxels of correlation, from %d volume(s)", STAGE,
                 site, 1000 * textures[site].amplitude, textures[site].sigma, len(pairs))
    return textures, [low, high]


# --------------------------------------------------------------------------- planning
def site_styles(arrays: dict[str, np.ndarray], records: list, sites: list[str]) -> dict[str, np.ndarray]:
    """Each site's style: the mean teacher style of its training volumes (all its volumes if none is train)."""
    styles = {}
    for site in sites:
        rows = [r.row for r in records if r.domain == site and r.split == "train"] or \
               [r.row for r in records if r.domain == site]
        styles[site] = arrays["teacher_style"][rows].mean(0)
    return styles


def _subject(case_id: str) -> str | None:
    match = re.search(SUBJECT_PATTERN, case_id)
    return match.group(1) if match else None


def _sources(latents: list[LatentRecord]) -> tuple[list[LatentRecord], str]:
    held_out = [r for r in latents if r.split == "held_out"]
    if held_out:
        return held_out, "held_out"
    log.warning("%s: the latent cache has no held-out volume; translating training volumes instead", STAGE)
    return [r for r in latents if r.split == "train"], "train"


class ContentDonor(NamedTuple):
    """Where a generated crop's content vector comes from."""

    volume: FactorRecord  # a training volume of the factor store
    array: str  # the factor store's array holding the vector
    row: int  # its row there
    window: int | None  # the window's index within the volume (window generation)


def content_donors(cfg: SynthesizeConfig, *, arrays: dict[str, np.ndarray], factor_records: list[FactorRecord],
                   harmonized_images: dict[str, Path], window: tuple[int, int, int],
                   body_level: float) -> list[ContentDonor]:
    """The content vectors generation draws from: the training volumes' (``generation_content: volume``) or
    each of their windows that is at least ``min_body_fraction`` body in the harmonized image (``window``:
    the crops' content the DiT is trained on, drawn like the real body crops they are compared with).

    Args:
        harmonized_images: each volume key's harmonized image file (its body mask; the latent is a 4th of it).
        window: the factor store's window ``(d, h, w)`` in latent voxels.
        body_level: the harmonized intensity above which a voxel is body (``body_threshold`` of the range).
    """
    volumes = [r for r in factor_records if r.split == "train"] or list(factor_records)
    if cfg.generation_content == "volume":
        return [ContentDonor(r, "teacher_content", r.row, None) for r in volumes]
    donors = []
    for volume in volumes:
        rows = np.flatnonzero(arrays["window_volume"] == volume.row)
        latent_shape = tuple(volume.latent_shape[1:])
        origins = window_origins(latent_shape, window)
        path = harmonized_images[volume.key]
        body = sitk.GetArrayFromImage(read_image(path)) > body_level  # (D, H, W)
        k = body.shape[0] // latent_shape[0]  # the VAE's downsampling
        if body.shape != tuple(k * n for n in latent_shape) or len(rows) != len(origins):
            raise StageError(f"{path}: grid {body.shape} and {len(rows)} factor window(s) do not fit the latent "
                             f"{latent_shape} ({len(origins)} windows); rerun encode-latents and extract-factors")
        fractions = box_fractions(body, origins * k, tuple(k * n for n in window))
        donors += [ContentDonor(volume, "teacher_window_content", int(rows[i]), int(i))
                   for i in np.flatnonzero(fractions >= cfg.min_body_fraction)]
    if not donors:
        raise StageError(f"{STAGE}: no window of a training volume is {cfg.min_body_fraction:.0%} body "
                         f"(intensity > {body_level:g}); lower min_body_fraction or use generation_content: "
                         f"volume")
    return donors


def plan(cfg: SynthesizeConfig, *, latents: list[LatentRecord], donors: list[ContentDonor], sites: list[str],
         rng: np.random.Generator, labelled: Collection[str] = ()) -> list[dict[str, Any]]:
    """The records to make, each with its seed: translations (source, other site), generated crops per site
    (content from ``donors``, drawn uniformly), then augmentations (the training scans among ``labelled``,
    into other sites' styles)."""
    sources, split = _sources(latents)
    pairs = [(a, site) for a in sources for site in sites if site != a.domain]
    if len(pairs) > cfg.translations:
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), size=cfg.translations, replace=False))]
    planned: list[dict[str, Any]] = []
    for a, site in pairs:
        key = f"{a.key}__{site}"
        planned.append({"key": key, "kind": "translation", "source_key": a.key, "source_site": a.domain,
                        "source_split": split, "subject": _subject(a.case_id), "target_site": site,
                        "target_domain_index": sites.index(site), "image": f"{TRANSLATIONS}/{key}.nii.gz",
                        "latent": f"{LATENTS}/{key}.npy"})
    for site in sites:
        for n in range(cfg.samples_per_site):
            donor = donors[int(rng.integers(len(donors)))]
            volume, key = donor.volume, f"{site}_{n:03d}"
            planned.append({"key": key, "kind": "generation", "source_key": volume.key, "source_site": volume.domain,
                            "source_split": volume.split, "subject": _subject(volume.case_id), "target_site": site,
                            "target_domain_index": sites.index(site), "image": f"{GENERATED}/{key}.nii.gz",
                            "latent": f"{LATENTS}/{key}.npy", "source_window": donor.window,
                            "donor": (donor.array, donor.row)})
    # Last, from their own generator: the records above keep their keys and seeds whatever this count is.
    planned += augmentation_pairs(cfg, [r for r in latents if r.split == "train" and r.key in labelled], sites)
    for index, record in enumerate(planned):
        record["seed"] = int(np.random.SeedSequence([cfg.seed, index]).generate_state(1)[0])
    return planned


def augmentation_pairs(cfg: SynthesizeConfig, sources: list[LatentRecord], sites: list[str]) -> list[dict[str, Any]]:
    """Each labelled training scan into ``augmentations_per_scan`` other sites' styles (drawn per scan)."""
    rng = np.random.default_rng([cfg.seed, 1])
    planned = []
    for a in sorted(sources, key=lambda r: r.key):
        others = [site for site in sites if site != a.domain]
        count = min(cfg.augmentations_per_scan, len(others))
        for site in sorted(rng.choice(others, size=count, replace=False).tolist()) if count else []:
            key = f"aug__{a.key}__{site}"
            planned.append({"key": key, "kind": "augmentation", "source_key": a.key, "source_site": a.domain,
                            "source_split": a.split, "subject": _subject(a.case_id), "target_site": site,
                            "target_domain_index": sites.index(site), "image": f"{AUGMENTATIONS}/{key}.nii.gz",
                            "latent": f"{LATENTS}/{key}.npy"})
    return planned


def _reusable(store: Path, run_key: str) -> dict[str, SynthesisRecord]:
    """Images a run of the same key finished (its per-image records), whose files are all there."""
    done: dict[str, SynthesisRecord] = {}
    for path in sorted((store / "records" / run_key).glob("*.json")):
        try:
            record = SynthesisRecord.model_validate_json(path.read_text())
        except (ValidationError, OSError):  # torn by a kill: made again
            continue
        if (store / record.image).is_file() and (store / record.latent).is_file():
            done[record.key] = record
    return done


# --------------------------------------------------------------------------- the stage
def run(cfg: SynthesizeConfig, paths: Paths, ray: RayConfig) -> StageResult:
    """Translate held-out scans and generate crops; one run at a time per store."""
    with output_lock(paths.work / "locks", paths.synthesis):
        return _run(cfg, paths, ray)


def _run(cfg: SynthesizeConfig, paths: Paths, ray: RayConfig) -> StageResult:
    dit_file, teacher_file, vae_file = dit_path(paths), meduet_path(paths), vae_path(paths)
    _, dit_meta = load_dit(dit_file, cfg.weights)  # fail early, in the driver, on missing or broken files
    load_vae(vae_file)
    teacher_sha = sha256_file(teacher_file) if teacher_file.is_file() else None
    if teacher_sha != dit_meta["meduet_sha256"]:
        raise StageError(f"{teacher_file}: not the MeDUET file the DiT {dit_file} was trained with; "
                         f"rerun train-diffusion")
    arrays, factor_records, factor_meta = load_factors(paths.factors)
    if factor_meta.get("model_sha256") != teacher_sha or "teacher_style" not in arrays:
        raise StageError(f"{paths.factors / FACTORS}: not the teacher factors of {teacher_file}; rerun extract-factors")
    if not (paths.latents / MANIFEST).is_file():
        raise StageError(f"{paths.latents / MANIFEST}: no latent cache; run the encode-latents stage first")
    latents = read_manifest(paths.latents)
    scale = read_scale(paths.latents)
    harmonized = {r.key: r for r in read_harmonized(paths.harmonized / "manifest.csv")}
    intensity_range = harmonized_range({k: r.window for k, r in harmonized.items() if r.window},
                                       paths.harmonized / "manifest.csv")  # (b_min, b_max)
    body_level = range_level(cfg.body_threshold, intensity_range)  # the intensity above which a voxel is body
    sites = list(factor_meta["domains"])
    styles = site_styles(arrays, factor_records, sites)
    donors = content_donors(cfg, arrays=arrays, factor_records=factor_records, window=tuple(factor_meta["window"]),
                            harmonized_images={k: paths.harmonized / r.image for k, r in harmonized.items()},
                            body_level=body_level) \
        if cfg.samples_per_site else []
    planned = plan(cfg, latents=latents, donors=donors, sites=sites, rng=np.random.default_rng(cfg.seed),
                   labelled={k for k, r in harmonized.items() if r.label})
    if not planned:
        raise StageError(f"{STAGE}: nothing to make (translations and samples_per_site are 0, or one site only)")

    store = paths.synthesis
    dit_sha, vae_sha = sha256_file(dit_file), sha256_file(vae_file)  # each file read once
    # Neither the worker count nor the augmentation count changes an image (each has its own seed and
    # augmentations come last), so a run with more or fewer of them reuses the others.
    run_key = config_hash(cfg.model_copy(update={"workers": 1, "augmentations_per_scan": 0}))[:8] + hashlib.sha256(
        "".join([dit_meta["meduet_sha256"], dit_sha, vae_sha, sha256_file(paths.factors / FACTORS),
                 sha256_file(paths.latents / MANIFEST), sha256_file(paths.latents / SCALE)]).encode()).hexdigest()[:8]
    done = _reusable(store, run_key)
    by_key = {r.key: r for r in latents}
    spacing = list(harmonized[latents[0].key].out_spacing) if latents and latents[0].key in harmonized else [1.0] * 3
    settings = cfg.model_dump(include={"sampling_steps", "ddpm_clip", "content_scale", "style_scale", "strength",
                                       "translation_content", "window_overlap", "batch_size",
                                       "max_voxels_per_split", "body_threshold"})
    textures, value_range = site_textures(
        cfg, latents=latents, harmonized_images={k: paths.harmonized / r.image for k, r in harmonized.items()},
        latent_dir=paths.latents, vae=_vae(str(vae_file)), sites=sites, body_level=body_level) \
        if cfg.texture == "site" else ({}, None)
    jobs = []
    for record in planned:
        if record["key"] in done:
            continue
        donor = record.pop("donor", None)
        translation = record["kind"] in WHOLE_SCAN_KINDS
        source = by_key[record["source_key"]] if translation else None
        jobs.append({"record": dict(record), "seed": record["seed"], "store": str(store),
                     "dit": str(dit_file), "weights": cfg.weights, "meduet": str(teacher_file), "vae": str(vae_file),
                     "scale": scale, "settings": settings, "threads": max(1, int(ray.cpus_per_task)),
                     "style": styles[record["target_site"]].tolist(),
                     "texture": vars(textures[record["target_site"]]) if textures else None,
                     "value_range": value_range, "body_level": body_level,
                     "content": None if translation else arrays[donor[0]][donor[1]].tolist(),
                     "source_latent": str(paths.latents / source.latent) if source else None,
                     "header": str(paths.harmonized / harmonized[source.key].image) if source else None,
                     "spacing": spacing})
    # Tasks on nodes that share no file system with this one get their files through the exchange.
    exchange = Exchange(ray.exchange, paths.s3_options) if ray.exchange and cfg.workers > 1 else None
    if exchange is not None:
        models = {"dit": exchange.put_file(dit_file, dit_sha), "meduet": exchange.put_file(teacher_file, teacher_sha),
                  "vae": exchange.put_file(vae_file, vae_sha)}
        for job in jobs:
            job.update(models, exchange=exchange, store="", **{
                key: exchange.put_file(Path(job[key])) if job[key] else None for key in ("source_latent", "header")})
    log.info("%s: %d image(s) planned, %d reused, %d to make on %d worker(s) (%s, %d steps)", STAGE, len(planned),
             len(planned) - len(jobs), len(jobs), cfg.workers, dit_meta["config"]["objective"], cfg.sampling_steps)

    records = list(done.values())
    progress = Progress(STAGE, len(jobs), unit="images")
    if jobs:
        results = dist.map_tasks(synthesize_one, jobs, workers=cfg.workers, scaling=Scaling.for_tasks(ray),
                                 run=RunSpec.from_config(ray, paths, STAGE, run_key))
        for result in results:
            shipped = result.pop("shipped", {})
            if exchange is not None:  # the image and latent the task left in the exchange
                for name, sha in shipped.items():
                    exchange.get_file(sha, store / name)
            record = SynthesisRecord.model_validate(result)
            write_json(store / "records" / run_key / f"{record.key}.json", record.model_dump(mode="json"))
            records.append(record)
            progress.update(len(records) - (len(planned) - len(jobs)))
    wanted = {r["key"] for r in planned}
    records = sorted((r for r in records if r.key in wanted), key=lambda r: r.key)

    meta = {"run_key": run_key, "dit": str(dit_file), "dit_sha256": dit_sha, "meduet_sha256": teacher_sha,
            "vae_sha256": vae_sha, "objective": dit_meta["config"]["objective"],
            "weights": cfg.weights, "settings": cfg.model_dump(mode="json"), "scale_factor": scale, "sites": sites,
            "site_styles": {site: style.tolist() for site, style in styles.items()},
            "site_textures": {site: vars(texture) for site, texture in textures.items()}, "value_range": value_range}
    keep = {store / p for r in records for p in (r.image, r.latent)}
    keep.update(store / "records" / run_key / f"{r.key}.json" for r in records)
    keep.update({store / "manifest.csv", store / "manifest.json"})
    prune_unowned(store, keep)
    for folder in (store / "records").glob("*/"):  # emptied by the prune: another run key's records
        if not any(folder.iterdir()):
            folder.rmdir()
    outputs = write_synthesis(store, records, meta)
    reports = paths.reports / STAGE
    outputs.update(_figures(store, records, paths, harmonized, reports, intensity_range))
    metrics = _metrics(records, meta, store)
    outputs["metrics"] = write_json(reports / "metrics.json", metrics)
    return StageResult(STAGE, outputs, metrics)


def _metrics(records: list[SynthesisRecord], meta: dict, store: Path) -> dict[str, Any]:
    def seconds(kind: str) -> float | None:
        values = [r.seconds for r in records if r.kind == kind]
        return round(float(np.mean(values)), 3) if values else None

    # Scaled latents have unit standard deviation over the training set: a sampler that
    # diverges (e.g. few-step DDPM with a weak ε model) shows here at once.
    stds = [float(np.load(store / r.latent).std()) for r in records]

    return {"translations": sum(r.kind == "translation" for r in records),
            "augmentations": sum(r.kind == "augmentation" for r in records),
            "generated": sum(r.kind == "generation" for r in records),
            "source_split": next((r.source_split for r in records if r.kind == "translation"), None),
            "objective": meta["objective"], "sampling_steps": meta["settings"]["sampling_steps"],
            "seconds_per_translation": seconds("translation"), "seconds_per_augmentation": seconds("augmentation"),
            "seconds_per_generated_crop": seconds("generation"),
            "latent_std_mean": round(float(np.mean(stds)), 4) if stds else None, "sites": meta["sites"]}


# --------------------------------------------------------------------------- figures
def _middle_slice(path: Path) -> np.ndarray:
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # (D, H, W)
    return array[array.shape[0] // 2]


def _figures(store: Path, records: list[SynthesisRecord], paths: Paths, harmonized: dict,
             reports: Path, intensity_range: tuple[float, float]) -> dict[str, Path]:
    """``translations.png``: each source, then its translations (middle axial slices); ``generated.png``.
    Grey levels span the harmonized ``intensity_range``."""
    outputs: dict[str, Path] = {}
    vmin, vmax = intensity_range
    translations = [r for r in records if r.kind == "translation"]
    sources = sorted({r.source_key for r in translations})
    if sources:
        targets = sorted({r.target_site for r in translations})
        fig, axes = plt.subplots(len(sources), 1 + len(targets), figsize=(2.2 * (1 + len(targets)), 2.2 * len(sources)),
                                 squeeze=False)
        for row, source in enumerate(sources):
            real = _middle_slice(paths.harmonized / harmonized[source].image)
            axes[row, 0].imshow(real, cmap="gray", vmin=vmin, vmax=vmax)
            axes[row, 0].set_title(f"{source.split('__')[-1]} (real)", fontsize=7)
            for col, site in enumerate(targets, start=1):
                match = [r for r in translations if r.source_key == source and r.target_site == site]
                if match:
                    axes[row, col].imshow(_middle_slice(store / match[0].image), cmap="gray", vmin=vmin, vmax=vmax)
                    axes[row, col].set_title(f"in {site}'s style", fontsize=7)
        for ax in axes.flat:
            ax.axis("off")
        fig.tight_layout()
        outputs["translations_figure"] = save_figure(fig, reports / "translations.png")
    generated = [r for r in records if r.kind == "generation"]
    if generated:
        sites = sorted({r.target_site for r in generated})
        per_site = max(sum(r.target_site == s for r in generated) for s in sites)
        columns = min(per_site, 8)
        fig, axes = plt.subplots(len(sites), columns, figsize=(1.4 * columns, 1.5 * len(sites)), squeeze=False)
        for row, site in enumerate(sites):
            for col, record in enumerate([r for r in generated if r.target_site == site][:columns]):
                axes[row, col].imshow(_middle_slice(store / record.image), cmap="gray", vmin=vmin, vmax=vmax)
            axes[row, 0].set_title(site, fontsize=7, loc="left")
        for ax in axes.flat:
            ax.axis("off")
        fig.tight_layout()
        outputs["generated_figure"] = save_figure(fig, reports / "generated.png")
    return outputs
