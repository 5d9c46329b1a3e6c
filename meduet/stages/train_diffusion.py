"""Stage ``train-diffusion``: the latent DiT conditioned on MeDUET's content and style, on Ray Train.

Inputs: the latent cache (``paths.latents``: manifest, scale factor, ``.npy`` latents; training
uses its ``train`` split, validation its ``held_out`` split) and the pretrained MeDUET file
(``paths.models/pretrain/meduet.pt``), whose EMA teacher encodes every clean crop into the
conditioning factors and, with ``init: meduet | meduet_repa``, initialises the DiT's encoder
weights. The DiT works on the teacher's crop and patch grid (its content tokens align with the
DiT's tokens one to one), so the preset must match the pretrained MeDUET's input and patch size.

Outputs: ``paths.models/diffusion/dit.pt`` (weights, EMA, shape, section, scale factor, the
MeDUET file's hash; see ``meduet.artifacts.diffusion``) and ``paths.reports/train_diffusion/``:
``metrics.json`` (first and final loss terms, held-out validation loss of the weights and of
their EMA, the initialisation report), ``history.csv`` and ``loss.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import torch

from meduet.artifacts.diffusion import dit_path, save_dit
from meduet.artifacts.pretrained import load_meduet, meduet_path
from meduet.config import Paths, RayConfig, TrainDiffusionConfig
from meduet.data.latents import MANIFEST, SCALE, read_manifest, read_scale
from meduet.diffusion import build_process
from meduet.engine.diffusion_training import TERMS, build_trainer, validation_crops, validation_loss
from meduet.engine.training_stage import finish_training_stage, fit_trainer
from meduet.io.atomic import write_json
from meduet.models.architectures import DIT_PRESETS, DiTArchitecture, MeduetArchitecture
from meduet.models.dit import ConditionedDiT
from meduet.models.dit_init import InitReport, plan_meduet_init
from meduet.stages import StageError, StageResult

log = logging.getLogger(__name__)

STAGE = "train_diffusion"


def architecture(cfg: TrainDiffusionConfig, meduet: MeduetArchitecture) -> DiTArchitecture:
    """The section's preset on the teacher's widths; its grid must be the teacher's.

    Raises:
        StageError: the pretrained MeDUET works on another crop or patch size.
    """
    preset = DIT_PRESETS[cfg.preset]
    if (tuple(meduet.input_size), meduet.patch_size, meduet.in_channels) != \
            (tuple(preset.input_size), preset.patch_size, preset.in_channels):
        raise StageError(f"train_diffusion.preset {cfg.preset!r} works on {preset.input_size} crops with patch "
                         f"{preset.patch_size} and {preset.in_channels} channels, the pretrained MeDUET on "
                         f"{meduet.input_size} with patch {meduet.patch_size} and {meduet.in_channels} channels: "
                         f"their tokens must align (pick the pretrain preset's name)")
    return dataclasses.replace(preset, content_dim=meduet.embed_dim, style_dim=meduet.style_dim,
                               spatial_content=cfg.spatial_content)


def init_report(cfg: TrainDiffusionConfig, arch: DiTArchitecture, meduet_state: dict) -> InitReport | None:
    """What the trainer's MeDUET initialisation maps (planned from shapes, on the meta device)."""
    if cfg.init == "scratch":
        return None
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ConditionedDiT(arch).state_dict().items()}
    return plan_meduet_init(shapes, {k: v.shape for k, v in meduet_state.items()})


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _terms(row: dict) -> dict[str, float]:
    return {term: row[term] for term in TERMS if term in row}


def run(cfg: TrainDiffusionConfig, paths: Paths, ray: RayConfig) -> StageResult:
    """Train the conditioned DiT on the latent cache and save it with its EMA."""
    manifest = paths.latents / MANIFEST
    if not manifest.is_file():
        raise StageError(f"{manifest}: no latent cache; run the encode-latents stage first")
    records = read_manifest(paths.latents)
    train = [r for r in records if r.split == "train"]
    held_out = [r for r in records if r.split == "held_out"]
    if not train:
        raise StageError(f"{manifest}: no latent of the train split")
    teacher_file = meduet_path(paths)
    teacher, meta = load_meduet(teacher_file, "teacher")
    arch = architecture(cfg, teacher.config)
    scale = read_scale(paths.latents)
    if abs(scale - float(meta["scale_factor"])) > 1e-6 * abs(scale):
        log.warning("latent scale %.6g differs from the one MeDUET was trained with (%.6g)", scale,
                    meta["scale_factor"])
    meduet_sha = _sha256(teacher_file)
    report = init_report(cfg, arch, teacher.state_dict())
    if report is not None:
        log.info("%s: MeDUET initialisation: %s; skipped: %s", STAGE, report.summary(),
                 "; ".join(f"{key} ({why})" for key, why in report.skipped.items()))
    # The run key covers the section, the code and this listing: new latents, a new scale or a
    # new MeDUET file (other factors, other initial weights) is another run.
    inputs = write_json(paths.work / "inputs" / f"{STAGE}.json",
                        {"manifest": _sha256(manifest), "scale": _sha256(paths.latents / SCALE), "meduet": meduet_sha})

    trained = fit_trainer(stage=STAGE, cfg=cfg, build=build_trainer,
                          inputs={"architecture": arch, "meduet_file": str(teacher_file),
                                  "latents": [str(paths.latents / r.latent) for r in train], "scale": scale,
                                  "val_latents": [str(paths.latents / r.latent) for r in held_out]},
                          input_manifest=inputs, paths=paths, ray=ray)
    state, history = trained.state, trained.history

    validation: dict[str, float | None] = {"model": None, "ema": None}
    if held_out and cfg.val_crops:
        # (n, C, d, h, w): the same crops for every run of this seed
        crops, styles = validation_crops(cfg, teacher, [str(paths.latents / r.latent) for r in held_out],
                                         arch.input_size[0], scale)
        process = build_process(cfg.objective, flow_time=cfg.flow_time)
        for which in validation:
            dit = ConditionedDiT(arch)
            dit.load_state_dict(state["dit" if which == "model" else "ema"])
            validation[which] = validation_loss(dit.eval(), teacher, process, crops, seed=cfg.seed, styles=styles)
        log.info("%s: held-out validation loss %.5f (EMA %.5f) on %d crops of %d latents", STAGE,
                 validation["model"], validation["ema"], cfg.val_crops, len(held_out))
    else:
        log.warning("%s: no validation loss (held-out latents: %d, val_crops: %d)", STAGE, len(held_out),
                    cfg.val_crops)

    steps = int(state["step"])
    target = save_dit(dit_path(paths), model=state["dit"], ema=state["ema"], architecture=arch,
                      config=cfg.model_dump(mode="json"), scale_factor=scale, meduet_sha256=meduet_sha,
                      init_report=report.to_dict() if report else None, steps=steps, validation=validation)
    metrics = {"steps": steps, "objective": cfg.objective, "init": cfg.init, "train_latents": len(train),
               "held_out_latents": len(held_out), "val_crops": cfg.val_crops if held_out else 0,
               "val_loss": validation["model"], "val_loss_ema": validation["ema"],
               "first": _terms(history[0]) if history else {}, "final": _terms(history[-1]) if history else {},
               # counts; the full report (names and reasons) is in dit.pt and the log
               "init_loaded": len(report.loaded) if report else 0, "init_folded": len(report.folded) if report else 0,
               "init_skipped": len(report.skipped) if report else 0, "init_kept": len(report.kept) if report else 0}
    return finish_training_stage(STAGE, paths=paths, outputs={"model": target}, metrics=metrics, run=trained,
                                 terms=TERMS, title="Latent DiT training")
