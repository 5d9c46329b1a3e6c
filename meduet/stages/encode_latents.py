"""Stage ``encode-latents``: every harmonized volume through the frozen VAE, cached.

Outputs (``paths.latents``): ``<dataset>/<case>.npy`` posterior means ``(4, d, h, w)``
float32 (optionally ``<case>_std.npy``), ``manifest.csv`` and ``scale.json`` (latent
scale factor over the VAE's training cases). Encoding runs as parallel tasks on Ray
(``encode_latents.workers``); on a cluster without a shared file system they exchange
volumes and latents with this process through ``ray.exchange`` (:mod:`meduet.io.exchange`).
Each finished case is recorded at once (``records/<key>.json``), and a case already encoded
from the same volume with the same VAE is reused, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from pydantic import ValidationError

from meduet import distributed as dist
from meduet.artifacts.vae import load_vae, vae_path
from meduet.config import EncodeLatentsConfig, Paths, RayConfig
from meduet.data.latents import (MANIFEST, LatentRecord, latent_affine, load_latent, read_manifest, save_array,
                                 write_manifest, write_scale)
from meduet.engine.progress import Progress
from meduet.engine.runs import RunSpec, Scaling
from meduet.harmonize.manifest import CaseRecord
from meduet.harmonize.manifest import read_manifest as read_harmonized
from meduet.io.atomic import write_json
from meduet.io.exchange import Exchange
from meduet.io.images import ras_affine, sha256_file
from meduet.io.locks import output_lock
from meduet.io.prune import prune_unowned
from meduet.models.vae import encode_volume
from meduet.stages import StageError, StageResult

log = logging.getLogger(__name__)


def _encode(job: dict, vae: Path, image_path: Path, cache: Path) -> dict:
    model, _ = load_vae(vae)
    torch.set_num_threads(job["threads"])
    image = sitk.ReadImage(str(image_path))
    volume = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))[None, None]  # (1, 1, D, H, W)
    mu, sigma = encode_volume(model, volume, job["max_voxels"])
    save_array(cache / job["latent"], mu[0].numpy())
    if job["latent_std"]:
        save_array(cache / job["latent_std"], sigma[0].numpy())
    record = dict(job["record"])
    record["latent_shape"] = list(mu.shape[1:])
    record["affine"] = latent_affine(ras_affine(image)).reshape(-1).tolist()
    return record


def encode_case(job: dict) -> dict:
    """Encode one volume (runs inside a Ray task); returns the latent record as a dict.

    With ``job["exchange"]`` (``ray.exchange``) the task opens no path of the driver's: the VAE
    and the volume come from the exchange (``vae``, ``image``: SHA-256s), the latents go back to
    it, and ``record["shipped"]`` maps each latent file to its SHA-256 for the driver to fetch.
    """
    exchange: Exchange | None = job.get("exchange")
    if exchange is None:
        return _encode(job, Path(job["vae"]), Path(job["image"]), Path(job["cache"]))
    with tempfile.TemporaryDirectory(prefix="meduet-encode-") as scratch:
        image = exchange.get_file(job["image"], Path(scratch) / "image.nii.gz")
        cache = Path(scratch) / "latents"
        record = _encode(job, exchange.cached(job["vae"], "vae.pt"), image, cache)
        record["shipped"] = {name: exchange.put_file(cache / name) for name in (job["latent"], job["latent_std"])
                             if name}
    return record


def _record_path(cache: Path, key: str) -> Path:
    return cache / "records" / f"{key}.json"


def _previous(cache: Path) -> dict[str, LatentRecord]:
    """What earlier runs encoded: the manifest, and the per-case records of a run killed before it."""
    previous = {r.key: r for r in read_manifest(cache)} if (cache / MANIFEST).is_file() else {}
    for path in sorted((cache / "records").glob("*.json")):
        try:
            record = LatentRecord.model_validate_json(path.read_text())
        except (ValidationError, OSError):  # a torn record: that case is encoded again
            continue
        previous[record.key] = record
    return previous


def _reusable(cache: Path, previous: dict[str, LatentRecord], key: str, image_sha: str, vae_sha: str,
              store_std: bool) -> LatentRecord | None:
    record = previous.get(key)
    if record is None or record.image_sha256 != image_sha or record.vae_sha256 != vae_sha:
        return None
    if not (cache / record.latent).is_file() or (store_std and not (cache / record.latent_std).is_file()):
        return None
    return record


def run(cfg: EncodeLatentsConfig, paths: Paths, ray: RayConfig) -> StageResult:
    """Encode all harmonized volumes; see the module docstring for outputs.

    One run at a time per output folder: a second one is refused with a message naming the first.
    """
    with output_lock(paths.work / "locks", paths.latents):
        return _run(cfg, paths, ray)


def _run(cfg: EncodeLatentsConfig, paths: Paths, ray: RayConfig) -> StageResult:
    vae_file = vae_path(paths)
    _, saved = load_vae(vae_file)  # fail early, in the driver, on a missing or broken VAE
    vae_sha = sha256_file(vae_file)
    held_out = set(saved.get("held_out_cases", []))
    cases: list[CaseRecord] = [r for r in read_harmonized(paths.harmonized / "manifest.csv") if r.status == "ok"]
    if not cases:
        raise StageError("no harmonized case to encode")
    domains = sorted({c.domain for c in cases})
    cache = paths.latents
    previous = _previous(cache)
    # Tasks on nodes that share no file system with this one get their files through the exchange.
    exchange = Exchange(ray.exchange, paths.s3_options) if ray.exchange and cfg.workers > 1 else None

    records: list[LatentRecord] = []
    jobs: list[dict] = []
    for case in sorted(cases, key=lambda c: c.key):
        image = paths.harmonized / case.image
        image_sha = sha256_file(image)
        split = "held_out" if case.key in held_out else "train"
        reused = _reusable(cache, previous, case.key, image_sha, vae_sha, cfg.store_std)
        if reused is not None:  # the site numbering follows today's sites, not the earlier run's
            records.append(reused.model_copy(update={"domain_index": domains.index(case.domain), "split": split}))
            continue
        stem = f"{case.dataset}/{case.case_id}"
        record = {"key": case.key, "dataset": case.dataset, "case_id": case.case_id, "domain": case.domain,
                  "domain_index": domains.index(case.domain), "body_part": case.body_part,
                  "split": split, "latent": f"{stem}.npy",
                  "latent_std": f"{stem}_std.npy" if cfg.store_std else "", "orig_spacing": case.orig_spacing,
                  "image_sha256": image_sha, "vae_sha256": vae_sha, "latent_shape": [], "affine": []}
        job = {"vae": str(vae_file), "image": str(image), "cache": str(cache), "latent": record["latent"],
               "latent_std": record["latent_std"], "max_voxels": cfg.max_voxels_per_split,
               "threads": max(1, int(ray.cpus_per_task)), "record": record}
        if exchange is not None:  # hand over content, not the driver's paths
            job.update(exchange=exchange, vae=exchange.put_file(vae_file, vae_sha),
                       image=exchange.put_file(image, image_sha), cache="")
        jobs.append(job)
    log.info("encode-latents: %d case(s), %d reused, %d to encode on %d worker(s)",
             len(cases), len(records), len(jobs), cfg.workers)
    progress = Progress("encode-latents", len(jobs), unit="cases")
    if jobs:
        scaling = Scaling.for_tasks(ray)
        for result in dist.map_tasks(encode_case, jobs, workers=cfg.workers, scaling=scaling,
                                     run=RunSpec.from_config(ray, paths, "encode_latents", vae_sha[:16])):
            shipped = result.pop("shipped", {})
            if exchange is not None:  # the latents the task left in the exchange
                for name, sha in shipped.items():
                    exchange.get_file(sha, cache / name)
            record = LatentRecord.model_validate(result)
            # Each finished case is recorded at once: a killed run resumes from here.
            write_json(_record_path(cache, record.key), record.model_dump(mode="json"))
            records.append(record)
            progress.update(len(records) - (len(cases) - len(jobs)))  # cases encoded by this run

    keep = {cache / MANIFEST, cache / "scale.json"}
    keep.update(cache / p for r in records for p in (r.latent, r.latent_std) if p)
    keep.update(_record_path(cache, r.key) for r in records)
    prune_unowned(cache, keep)
    write_manifest(cache, records)
    train = [load_latent(cache, r) for r in records if r.split == "train"] or [load_latent(cache, r) for r in records]
    scale = write_scale(cache, train)
    metrics = {"cases": len(records), "encoded": len(jobs), "reused": len(records) - len(jobs), "scale": scale,
               "latent_shapes": sorted({"x".join(map(str, r.latent_shape)) for r in records})}
    write_json(paths.reports / "encode_latents" / "metrics.json", metrics)
    return StageResult("encode_latents", {"manifest": cache / "manifest.csv", "scale": cache / "scale.json",
                                          "metrics": paths.reports / "encode_latents" / "metrics.json"}, metrics)
