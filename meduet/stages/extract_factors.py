"""Stage ``extract-factors``: content and style vectors per cached latent and per window.

Inputs: the pretrained model ``paths.models/pretrain/meduet.pt`` and the latent cache
(``paths.latents``). Each latent is scaled by the cache's scale factor (as in training),
cut into windows of the model's input size (stride = window, the last window of an axis
aligned to the end; a latent smaller than the window is zero-padded, centred, as the
training crops are), encoded with ``MeduetModel.encode_full``, and its factor tokens
averaged over tokens and then over windows: content ``(E,)``, style ``(S,)``.

Every weights set in ``cfg.weights`` (the EMA teacher and the student) encodes every
window; the per-window factors and each window's world box are kept, so evaluation can
average any subset of windows (a region every site covers, a given number of windows).

Volumes are encoded as Ray tasks (``cfg.workers`` in flight, each reserving the ``ray``
section's CPUs/GPUs per worker, so a cluster spreads them over its nodes), a few chunks of
volumes per worker so each task loads the model once; ``workers: 1`` runs the same code in
this process. The outputs do not depend on the worker count. On a cluster without a shared
file system the tasks get the model and latents through ``ray.exchange``.

Outputs: the factor store ``paths.factors/`` (``factors.npz``, ``manifest.csv``,
``manifest.json``; format in ``meduet.artifacts.factors``) and
``paths.reports/extract_factors/metrics.json`` (volumes, widths, windows per volume, per site).
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from meduet import distributed as dist
from meduet.artifacts.factors import FactorRecord, save_factors
from meduet.artifacts.pretrained import load_meduet, meduet_path
from meduet.config import ExtractFactorsConfig, Paths, RayConfig
from meduet.data.latents import MANIFEST, LatentRecord, load_latent, read_manifest, read_scale
from meduet.engine.progress import Progress
from meduet.engine.runs import RunSpec, Scaling
from meduet.engine.volume_factors import volume_windows
from meduet.io.atomic import write_json
from meduet.io.exchange import Exchange
from meduet.io.images import sha256_file
from meduet.stages import StageError, StageResult

CHUNKS_PER_WORKER = 4  # tasks per worker: each loads the model once; several even out unequal volumes

log = logging.getLogger(__name__)


def encode_chunk(job: dict) -> list[dict]:
    """Factors of a chunk of volumes with every weights set (runs inside a Ray task or in this process).

    Args:
        job: ``model`` (the pretrained file), ``weights``, ``latents`` (the cache folder),
            ``records`` (latent records as dicts), ``rows``, ``scale``, ``batch_size``, ``threads``.
            With ``exchange`` (``ray.exchange``: the task opens no path of the driver's),
            ``model`` is the file's SHA-256 and ``latents`` maps each latent file to its SHA-256.

    Returns:
        per volume ``{"row", "boxes" (n, 2, 3), "<weights>_window_content" (n, E), "<weights>_window_style" (n, S)}``.
    """
    exchange: Exchange | None = job.get("exchange")
    if exchange is None:
        return _encode_chunk(job, Path(job["model"]), Path(job["latents"]))
    with tempfile.TemporaryDirectory(prefix="meduet-factors-") as scratch:
        latents = Path(scratch) / "latents"
        for name, sha in job["latents"].items():
            exchange.get_file(sha, latents / name)
        return _encode_chunk(job, exchange.cached(job["model"], "meduet.pt"), latents)


def _encode_chunk(job: dict, model: Path, latents: Path) -> list[dict]:
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)  # nothing is random at eval time; fixed anyway for bit-stable outputs
    models = {weights: load_meduet(model, weights)[0] for weights in job["weights"]}
    out = []
    for row, fields in zip(job["rows"], job["records"], strict=True):
        record = LatentRecord.model_validate(fields)
        latent, affine = load_latent(latents, record), np.array(record.affine).reshape(4, 4)
        result: dict = {"row": row}
        for weights, encoder in models.items():
            content, style, result["boxes"] = volume_windows(encoder, latent, job["scale"], affine, job["batch_size"])
            result[f"{weights}_window_content"], result[f"{weights}_window_style"] = content.numpy(), style.numpy()
        out.append(result)
    return out


def run(cfg: ExtractFactorsConfig, paths: Paths, ray: RayConfig) -> StageResult:
    """Encode every window of every cached latent with each weights set; keep windows and volume means."""
    if not (paths.latents / MANIFEST).is_file():
        raise StageError(f"{paths.latents / MANIFEST}: no latent cache; run the encode-latents stage first")
    primary = cfg.weights[0]
    ckpt = meduet_path(paths)
    model, meta = load_meduet(ckpt, primary)  # fail early, in the driver, on a missing or broken file
    model_sha = sha256_file(ckpt)
    architecture = model.config
    latents = sorted(read_manifest(paths.latents), key=lambda r: r.key)
    if not latents:
        raise StageError(f"{paths.latents / MANIFEST}: empty latent cache")
    scale = read_scale(paths.latents)
    domains = list(meta["domains"])
    if abs(scale - float(meta["scale_factor"])) > 1e-6 * abs(scale):
        log.warning("latent scale %.6g differs from the one the model was trained with (%.6g)",
                    scale, meta["scale_factor"])
    for record in latents:
        if record.domain_index >= len(domains) or domains[record.domain_index] != record.domain:
            raise StageError(f"{record.key}: site {record.domain!r} (index {record.domain_index}) is not the "
                             f"model's site {record.domain_index} of {domains}")

    size = math.ceil(len(latents) / (cfg.workers * CHUNKS_PER_WORKER)) if cfg.workers > 1 else len(latents)
    jobs = [{"model": str(ckpt), "weights": list(cfg.weights), "latents": str(paths.latents),
             "records": [r.model_dump(mode="json") for r in latents[start:start + size]],
             "rows": list(range(start, min(start + size, len(latents)))), "scale": scale,
             "batch_size": cfg.batch_size, "threads": max(1, int(ray.cpus_per_task))}
            for start in range(0, len(latents), size)]
    if ray.exchange and cfg.workers > 1:  # nodes without this machine's files get them through the exchange
        exchange = Exchange(ray.exchange, paths.s3_options)
        model_file = exchange.put_file(ckpt, model_sha)
        for job in jobs:
            job.update(exchange=exchange, model=model_file, latents={
                r["latent"]: exchange.put_file(paths.latents / r["latent"]) for r in job["records"]})
    progress = Progress("extract-factors", len(latents), unit="volumes")
    by_row: dict[int, dict] = {}
    for chunk in dist.map_tasks(encode_chunk, jobs, workers=cfg.workers, scaling=Scaling.for_tasks(ray),
                                run=RunSpec.from_config(ray, paths, "extract_factors", model_sha[:16])):
        by_row.update((result["row"], result) for result in chunk)
        progress.update(len(by_row))

    records: list[FactorRecord] = []
    windows: dict[str, list[np.ndarray]] = {f"{w}_window_{f}": [] for w in cfg.weights for f in ("content", "style")}
    window_volume, window_box = [], []
    for row, record in enumerate(latents):
        result = by_row[row]
        for name in windows:
            windows[name].append(result[name])
        boxes = result["boxes"]
        window_volume.append(np.full(len(boxes), row))
        window_box.append(boxes)
        records.append(FactorRecord(key=record.key, dataset=record.dataset, case_id=record.case_id,
                                    domain=record.domain, body_part=record.body_part, row=row,
                                    domain_index=record.domain_index, split=record.split, latent=record.latent,
                                    latent_shape=record.latent_shape, windows=len(boxes)))
    arrays = {name: np.concatenate(parts) for name, parts in windows.items()}
    arrays["window_volume"], arrays["window_box_mm"] = np.concatenate(window_volume), np.concatenate(window_box)
    for weights in cfg.weights:  # volume factors: the mean over the volume's windows
        for factor in ("content", "style"):
            per_window = arrays[f"{weights}_window_{factor}"]
            arrays[f"{weights}_{factor}"] = np.stack([per_window[arrays["window_volume"] == r.row].mean(0)
                                                      for r in records])
    arrays["content"], arrays["style"] = arrays[f"{primary}_content"], arrays[f"{primary}_style"]
    info = {"model": str(ckpt.relative_to(paths.root)) if ckpt.is_relative_to(paths.root) else str(ckpt),
            "model_sha256": model_sha, "weights": primary,
            "all_weights": list(cfg.weights),
            "domains": domains, "scale_factor": scale, "window": list(architecture.input_size),
            "content_dim": architecture.embed_dim, "style_dim": architecture.style_dim, "volumes": len(records)}
    outputs = save_factors(paths.factors, records, arrays, info)

    metrics = {"volumes": len(records), "content_dim": info["content_dim"], "style_dim": info["style_dim"],
               "windows_per_volume": float(np.mean([r.windows for r in records])), "weights": list(cfg.weights),
               "per_site": {d: sum(r.domain == d for r in records) for d in domains}}
    outputs["metrics"] = write_json(paths.reports / "extract_factors" / "metrics.json", metrics)
    log.info("extract-factors: %d volumes, E=%d, S=%d", len(records), info["content_dim"], info["style_dim"])
    return StageResult("extract-factors", outputs, metrics)
