"""Stage ``pretrain``: MeDUET's disentangled self-supervised pretraining on the latent cache, on Ray Train.

Inputs: the latent cache (``paths.latents``: manifest, scale factor, ``.npy`` latents);
training uses its ``train`` split, and the sites ``K`` are all domains of the manifest.
Outputs: ``paths.models/pretrain/meduet.pt`` (student and EMA-teacher weights, network
shape, the ``pretrain`` section, the site list) and ``paths.reports/pretrain/``:
``metrics.json`` (first and final loss terms), ``history.csv`` (every logged step) and
``loss.png``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from meduet import distributed as dist
from meduet.config import Paths, PretrainConfig, RayConfig, config_hash
from meduet.data.latents import MANIFEST, LatentRecord, read_manifest, read_scale
from meduet.engine.plots import plot_history
from meduet.engine.pretrain_training import TERMS, PretrainSettings, pretrain_worker
from meduet.io.atomic import atomic_path, write_json
from meduet.models.meduet import PRESETS, MeduetConfig
from meduet.stages import StageError, StageResult, run_key

log = logging.getLogger(__name__)


def _domains(records: list[LatentRecord]) -> list[str]:
    """Site names ordered by ``domain_index`` (which must number them 0..K-1 consistently)."""
    by_index: dict[int, set[str]] = {}
    for record in records:
        by_index.setdefault(record.domain_index, set()).add(record.domain)
    if sorted(by_index) != list(range(len(by_index))) or any(len(names) != 1 for names in by_index.values()):
        raise StageError(f"latent manifest: domain_index does not number the domains 0..K-1 one to one: "
                         f"{ {i: sorted(n) for i, n in sorted(by_index.items())} }")
    return [next(iter(by_index[i])) for i in range(len(by_index))]


def _model_config(cfg: PretrainConfig, num_domains: int) -> MeduetConfig:
    return dataclasses.replace(PRESETS[cfg.preset], mask_ratio=cfg.mask_ratio, num_domains=num_domains,
                               learnable_logit_scale=cfg.learnable_logit_scale)


def _settings(cfg: PretrainConfig, model: MeduetConfig, train: list[LatentRecord], latents: Path,
              scale: float) -> PretrainSettings:
    weights = {**cfg.weights.model_dump(), "grl_lambda": 1.0 if cfg.use_grl else 0.0}
    return PretrainSettings(
        model=model.to_dict(), latents=[str(latents / r.latent) for r in train],
        domains=[r.domain_index for r in train], scale=scale, batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr,
        betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
        grad_clip=cfg.grad_clip, grad_accumulation=cfg.grad_accumulation, amp=cfg.amp, cpu_bf16=cfg.cpu_bf16,
        weights=weights,
        mftd_start=round(cfg.mftd_start_fraction * cfg.steps), ema_start=cfg.ema_start, ema_end=cfg.ema_end,
        use_mftd=cfg.use_mftd, use_siqc=cfg.use_siqc, log_every=cfg.log_every, seed=cfg.seed,
    )


def _terms(row: dict) -> dict[str, float]:
    return {term: row[term] for term in TERMS if term in row}


def run(cfg: PretrainConfig, paths: Paths, ray: RayConfig) -> StageResult:
    """Pretrain MeDUET on the latent cache and save the student and its EMA teacher."""
    manifest = paths.latents / MANIFEST
    if not manifest.is_file():
        raise StageError(f"{manifest}: no latent cache; run the encode-latents stage first")
    records = read_manifest(paths.latents)
    domains = _domains(records)
    if len(domains) < 2:
        raise StageError(f"{manifest}: domain supervision needs at least 2 sites, found {domains}")
    train = [r for r in records if r.split == "train"]
    if not train:
        raise StageError(f"{manifest}: no latent of the train split")
    model = _model_config(cfg, len(domains))
    settings = _settings(cfg, model, train, paths.latents, read_scale(paths.latents))

    # New latents or code mean a new run, never a resume of the old one's checkpoints.
    spec = dist.RunSpec.from_config(ray, paths, "pretrain", run_key(config_hash(cfg), manifest))
    result = dist.fit(pretrain_worker, dataclasses.asdict(settings), dist.Scaling.from_config(ray), spec)
    state = result.load_state()

    target = paths.models / "pretrain" / "meduet.pt"
    model_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in model.to_dict().items()}
    with atomic_path(target) as tmp:
        torch.save({"student": state["student"], "teacher": state["teacher"], "model_config": model_dict,
                    "config": cfg.model_dump(mode="json"), "domains": domains, "scale_factor": settings.scale,
                    "train_latents": [r.key for r in train], "steps": int(state["step"])}, tmp)

    reports = paths.reports / "pretrain"
    history = result.history
    metrics = {"steps": int(state["step"]), "domains": domains, "train_latents": len(train),
               "first": _terms(history[0]) if history else {}, "final": _terms(history[-1]) if history else {}}
    write_json(reports / "metrics.json", metrics)
    outputs = {"model": target, "metrics": reports / "metrics.json",
               "loss_curve": plot_history(history, list(TERMS), reports / "loss.png", "MeDUET pretraining")}
    if result.metrics_csv is not None:
        outputs["history"] = result.metrics_csv
    log.info("pretrain: %d steps, final %s", metrics["steps"], metrics["final"])
    return StageResult("pretrain", outputs, metrics)
