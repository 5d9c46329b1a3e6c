"""Stage ``pretrain``: MeDUET's disentangled self-supervised pretraining on the latent cache, on Ray Train.

Inputs: the latent cache (``paths.latents``: manifest, scale factor, ``.npy`` latents);
training uses its ``train`` split, and the sites ``K`` are all domains of the manifest.
Outputs: ``paths.models/pretrain/meduet.pt`` (student and EMA-teacher weights, network
architecture, the ``pretrain`` section, the site list; see ``meduet.artifacts.pretrained``) and
``paths.reports/pretrain/``: ``metrics.json`` (first and final loss terms), ``history.csv``
(mean losses since the previous row) and ``loss.png``.

The same ``run`` is stage ``pretrain-mae`` for the section ``pretrain_mae`` (``objective: mae``,
the masked-autoencoder baseline of the same network): it writes under ``pretrain_mae``.
"""

from __future__ import annotations

import dataclasses

from meduet.artifacts.pretrained import meduet_path, save_meduet
from meduet.config import Paths, PretrainConfig, RayConfig
from meduet.data.latents import MANIFEST, LatentRecord, read_manifest, read_scale
from meduet.engine.pretrain_training import TERMS, build_trainer
from meduet.engine.training_stage import finish_training_stage, fit_trainer
from meduet.models.architectures import MEDUET_PRESETS, MeduetArchitecture
from meduet.stages import StageError, StageResult


def _domains(records: list[LatentRecord]) -> list[str]:
    """Site names ordered by ``domain_index`` (which must number them 0..K-1 consistently)."""
    by_index: dict[int, set[str]] = {}
    for record in records:
        by_index.setdefault(record.domain_index, set()).add(record.domain)
    if sorted(by_index) != list(range(len(by_index))) or any(len(names) != 1 for names in by_index.values()):
        raise StageError(f"latent manifest: domain_index does not number the domains 0..K-1 one to one: "
                         f"{ {i: sorted(n) for i, n in sorted(by_index.items())} }")
    return [next(iter(by_index[i])) for i in range(len(by_index))]


def architecture(cfg: PretrainConfig, num_domains: int) -> MeduetArchitecture:
    """The section's preset with its mask ratio, logit-scale switch and the cache's site count."""
    return dataclasses.replace(MEDUET_PRESETS[cfg.preset], mask_ratio=cfg.mask_ratio, num_domains=num_domains,
                               learnable_logit_scale=cfg.learnable_logit_scale)


def _terms(row: dict) -> dict[str, float]:
    return {term: row[term] for term in TERMS if term in row}


STAGES = {"meduet": "pretrain", "mae": "pretrain_mae"}  # by objective: the stage's name and output folders


def run(cfg: PretrainConfig, paths: Paths, ray: RayConfig) -> StageResult:
    """Pretrain MeDUET (or, with ``objective: mae``, its baseline) on the latent cache; save student and EMA teacher."""
    stage = STAGES[cfg.objective]
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
    arch = architecture(cfg, len(domains))
    scale = read_scale(paths.latents)

    trained = fit_trainer(stage=stage, cfg=cfg, build=build_trainer,
                          inputs={"architecture": arch, "latents": [str(paths.latents / r.latent) for r in train],
                                  "domains": [r.domain_index for r in train], "scale": scale},
                          input_manifest=manifest, paths=paths, ray=ray)
    state, history = trained.state, trained.history
    target = save_meduet(meduet_path(paths, stage), student=state["student"], teacher=state["teacher"],
                         architecture=arch, config=cfg.model_dump(mode="json"), domains=domains, scale_factor=scale,
                         train_latents=[r.key for r in train], steps=int(state["step"]))
    metrics = {"steps": int(state["step"]), "domains": domains, "train_latents": len(train),
               "first": _terms(history[0]) if history else {}, "final": _terms(history[-1]) if history else {}}
    title = "MeDUET pretraining" if cfg.objective == "meduet" else "Masked-autoencoder baseline pretraining"
    return finish_training_stage(stage, paths=paths, outputs={"model": target}, metrics=metrics, run=trained,
                                 terms=("rec", "total") if cfg.objective == "mae" else TERMS, title=title)
