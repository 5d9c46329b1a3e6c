"""Stage ``train-vae``: the 3-D KL-VAE tokenizer, trained on Ray Train or loaded.

Outputs: ``paths.models/vae/vae.pt`` (weights, architecture, config, split) and
``paths.reports/train_vae/``: ``metrics.json`` (held-out PSNR / SSIM / MAE per site),
``history.csv`` (mean losses since the previous row), ``loss.png``, ``reconstructions.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from meduet.artifacts.vae import save_vae, vae_path
from meduet.config import Paths, RayConfig, VAEConfig
from meduet.data.volumes import Volume, holdout_split, load_volume, usable_volumes
from meduet.engine.metrics import mae_raw, mean_ci95, psnr, ssim
from meduet.engine.progress import Progress
from meduet.engine.training_stage import TrainedRun, finish_training_stage, fit_trainer
from meduet.engine.vae_training import build_trainer
from meduet.io.figures import plt, save_figure
from meduet.io.storage import fetch_file
from meduet.models.vae import PRESETS, CheckpointMismatchError, build_vae, decode_latent, encode_volume, load_weights
from meduet.stages import StageError, StageResult


def _pretrained(cfg: VAEConfig, paths: Paths) -> dict:
    local = fetch_file(cfg.pretrained, paths.work / "downloads", paths.s3_options) if "://" in cfg.pretrained \
        else paths.local(cfg.pretrained)
    if not Path(local).is_file():
        raise StageError(f"vae.pretrained: {local}: file not found")
    model = build_vae(PRESETS[cfg.preset])
    try:
        load_weights(model, local)
    except CheckpointMismatchError as error:
        raise StageError(str(error)) from None
    except Exception as error:  # torch raises several types for a corrupt or foreign file
        raise StageError(f"vae.pretrained: {local}: unreadable checkpoint ({error})") from None
    return model.state_dict()


def evaluate(model: torch.nn.Module, volumes: list[Volume], max_voxels: int) -> list[dict]:
    """Whole-volume reconstruction metrics of each held-out case (posterior mean, no sampling).

    A progress line after each case: a CT-sized case takes seconds to minutes on a CPU.
    """
    rows = []
    progress = Progress("train_vae-evaluation", len(volumes), unit="cases", every_fraction=0.0)
    for volume in volumes:
        x = load_volume(volume.path)[None]  # (1, 1, D, H, W)
        mu, _ = encode_volume(model, x, max_voxels)
        recon = decode_latent(model, mu, max_voxels).clamp(volume.window[2], volume.window[3])
        data_range = volume.window[3] - volume.window[2]
        rows.append({"case": volume.key, "domain": volume.domain, "psnr": psnr(x, recon, data_range),
                     "ssim": ssim(x, recon, data_range), "mae_raw": mae_raw(x, recon, volume.window),
                     "_slices": (x[0, 0, x.shape[2] // 2].numpy(), recon[0, 0, x.shape[2] // 2].numpy()),
                     "_range": (volume.window[2], volume.window[3])})
        progress.update(len(rows), {"psnr": rows[-1]["psnr"]})
    return rows


def _per_site(rows: list[dict]) -> dict[str, dict[str, float]]:
    sites: dict[str, dict[str, float]] = {}
    for domain in sorted({r["domain"] for r in rows}):
        group = [r for r in rows if r["domain"] == domain]
        sites[domain] = {k: float(np.mean([r[k] for r in group])) for k in ("psnr", "ssim", "mae_raw")}
        sites[domain]["cases"] = len(group)
    return sites


def overall_scores(rows: list[dict], seed: int) -> dict[str, float | list[float] | None]:
    """Mean PSNR, SSIM and raw MAE over the evaluated volumes, each with its 95 % bootstrap interval over them."""
    out: dict[str, float | list[float] | None] = {}
    for key in ("psnr", "ssim", "mae_raw"):
        values = [r[key] for r in rows]
        out |= {key: float(np.mean(values)), f"{key}_ci95": mean_ci95(values, seed)}
    return out


def _figure_reconstructions(rows: list[dict], target: Path) -> Path:
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False)
    for row, ax in zip(rows, axes):
        original, recon = row["_slices"]
        low, high = row["_range"]  # the harmonized range; the difference on a quarter of it
        for a, image, title, cmap, limits in (
                (ax[0], original, f"{row['case']}\noriginal", "gray", (low, high)),
                (ax[1], recon, "reconstruction", "gray", (low, high)),
                (ax[2], np.abs(original - recon), f"|diff| PSNR {row['psnr']:.1f} dB", "magma", (0, (high - low) / 4))):
            a.imshow(image[::-1, ::-1], cmap=cmap, vmin=limits[0], vmax=limits[1])
            a.set_title(title, fontsize=7)
            a.axis("off")
    fig.tight_layout()
    return save_figure(fig, target)


def run(cfg: VAEConfig, paths: Paths, ray: RayConfig) -> StageResult:
    """Train (or load) the VAE, save it with its provenance, report held-out quality."""
    volumes = usable_volumes(paths.harmonized)
    train, held_out = holdout_split(volumes, cfg.holdout_fraction)
    if not train:
        raise StageError(f"{paths.harmonized / 'manifest.csv'}: no harmonized case to train on")
    trained: TrainedRun | None = None
    if cfg.pretrained:
        state = _pretrained(cfg, paths)
    else:
        trained = fit_trainer(stage="train_vae", cfg=cfg, build=build_trainer,
                              inputs={"volumes": [str(v.path) for v in train]},
                              input_manifest=paths.harmonized / "manifest.csv", paths=paths, ray=ray)
        state = trained.state["model"]

    arch = PRESETS[cfg.preset]
    target = save_vae(vae_path(paths), state=state, architecture=arch, config=cfg.model_dump(mode="json"),
                      train_cases=[v.key for v in train], held_out_cases=[v.key for v in held_out])
    model = build_vae(arch).eval()
    model.load_state_dict(state)
    # With one case per site nothing is held out; the figure and numbers then show
    # in-sample reconstructions (one per site), and the metrics say so.
    evaluated = held_out or [next(v for v in train if v.domain == d) for d in sorted({v.domain for v in train})]
    rows = evaluate(model, evaluated, cfg.max_voxels_per_split)
    metrics = {"train_cases": len(train), "held_out_cases": len(held_out),
               "evaluated_on": "held_out" if held_out else "train (no held-out case)", "per_site": _per_site(rows),
               "overall": overall_scores(rows, cfg.seed)}
    if trained is not None and trained.history:
        metrics["final_loss"] = trained.history[-1]["loss"]
    figure = _figure_reconstructions(rows, paths.reports / "train_vae" / "reconstructions.png")
    return finish_training_stage("train_vae", paths=paths, outputs={"vae": target, "reconstructions": figure},
                                 metrics=metrics, run=trained, terms=["loss", "l1", "g_adv", "d_loss"],
                                 title="VAE training")
