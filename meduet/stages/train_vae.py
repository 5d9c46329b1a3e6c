"""Stage ``train-vae``: the 3-D KL-VAE tokenizer, trained on Ray Train or loaded.

Outputs: ``paths.models/vae/vae.pt`` (weights, architecture, config, split) and
``paths.reports/train_vae/``: ``metrics.json`` (held-out PSNR / SSIM / MAE per site),
``history.csv`` (losses per logged step), ``loss.png``, ``reconstructions.png``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from meduet import distributed as dist  # noqa: E402
from meduet.config import Paths, RayConfig, VAEConfig, config_hash  # noqa: E402
from meduet.data.volumes import Volume, holdout_split, load_volume, usable_volumes  # noqa: E402
from meduet.engine.metrics import mae_raw, psnr, ssim  # noqa: E402
from meduet.engine.plots import plot_history  # noqa: E402
from meduet.engine.vae_training import VAETrainSettings, train_vae_worker  # noqa: E402
from meduet.io.atomic import atomic_path, write_json  # noqa: E402
from meduet.io.storage import fetch_file  # noqa: E402
from meduet.models.vae import (  # noqa: E402
    PRESETS, CheckpointMismatchError, architecture_dict, build_vae, decode_latent, encode_volume, load_weights,
)
from meduet.stages import StageError, StageResult, run_key  # noqa: E402

log = logging.getLogger(__name__)


def _train(cfg: VAEConfig, train: list[Volume], paths: Paths, ray: RayConfig) -> tuple[dict, list[dict]]:
    settings = VAETrainSettings(
        architecture=architecture_dict(PRESETS[cfg.preset]), volumes=[str(v.path) for v in train],
        crop_size=tuple(cfg.crop_size), batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr,
        warmup_steps=cfg.warmup_steps, kl_weight=cfg.kl_weight, adv_weight=cfg.adv_weight,
        adv_start=cfg.adv_start, disc_channels=cfg.disc_channels, grad_clip=cfg.grad_clip, amp=cfg.amp,
        seed=cfg.seed, checkpoint_every=ray.checkpoint_every, log_every=cfg.log_every,
    )
    # New data or code means a new run, never a resume of the old one's checkpoints.
    key = run_key(config_hash(cfg), paths.harmonized / "manifest.csv")
    run = dist.RunSpec.from_config(ray, paths, "train_vae", key)
    result = dist.fit(train_vae_worker, asdict(settings), dist.Scaling.from_config(ray), run)
    return result.load_state()["model"], result.history


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
    """Whole-volume reconstruction metrics of each held-out case (posterior mean, no sampling)."""
    rows = []
    for volume in volumes:
        x = load_volume(volume.path)[None]  # (1, 1, D, H, W)
        mu, _ = encode_volume(model, x, max_voxels)
        recon = decode_latent(model, mu, max_voxels).clamp(volume.window[2], volume.window[3])
        data_range = volume.window[3] - volume.window[2]
        rows.append({"case": volume.key, "domain": volume.domain, "psnr": psnr(x, recon, data_range),
                     "ssim": ssim(x, recon, data_range), "mae_raw": mae_raw(x, recon, volume.window),
                     "_slices": (x[0, 0, x.shape[2] // 2].numpy(), recon[0, 0, x.shape[2] // 2].numpy())})
    return rows


def _per_site(rows: list[dict]) -> dict[str, dict[str, float]]:
    sites: dict[str, dict[str, float]] = {}
    for domain in sorted({r["domain"] for r in rows}):
        group = [r for r in rows if r["domain"] == domain]
        sites[domain] = {k: float(np.mean([r[k] for r in group])) for k in ("psnr", "ssim", "mae_raw")}
        sites[domain]["cases"] = len(group)
    return sites


def _figure_reconstructions(rows: list[dict], target: Path) -> Path:
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False)
    for row, ax in zip(rows, axes):
        original, recon = row["_slices"]
        for a, image, title in ((ax[0], original, f"{row['case']}\noriginal"), (ax[1], recon, "reconstruction"),
                                (ax[2], np.abs(original - recon), f"|diff| PSNR {row['psnr']:.1f} dB")):
            a.imshow(image[::-1, ::-1], cmap="gray" if a is not ax[2] else "magma", vmin=0, vmax=1 if a is not ax[2]
                     else 0.25)
            a.set_title(title, fontsize=7)
            a.axis("off")
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return target


def run(cfg: VAEConfig, paths: Paths, ray: RayConfig) -> StageResult:
    """Train (or load) the VAE, save it with its provenance, report held-out quality."""
    volumes = usable_volumes(paths.harmonized)
    train, held_out = holdout_split(volumes, cfg.holdout_fraction)
    if not train:
        raise StageError(f"{paths.harmonized / 'manifest.csv'}: no harmonized case to train on")
    reports = paths.reports / "train_vae"
    if cfg.pretrained:
        state, history = _pretrained(cfg, paths), []
    else:
        state, history = _train(cfg, train, paths, ray)

    arch = PRESETS[cfg.preset]
    target = paths.models / "vae" / "vae.pt"
    with atomic_path(target) as tmp:
        torch.save({"state_dict": state, "architecture": architecture_dict(arch), "config": cfg.model_dump(mode="json"),
                    "train_cases": [v.key for v in train], "held_out_cases": [v.key for v in held_out]}, tmp)

    model = build_vae(arch).eval()
    model.load_state_dict(state)
    # With one case per site nothing is held out; the figure and numbers then show
    # in-sample reconstructions (one per site), and the metrics say so.
    evaluated = held_out or [next(v for v in train if v.domain == d) for d in sorted({v.domain for v in train})]
    rows = evaluate(model, evaluated, cfg.max_voxels_per_split)
    metrics = {"train_cases": len(train), "held_out_cases": len(held_out),
               "evaluated_on": "held_out" if held_out else "train (no held-out case)", "per_site": _per_site(rows),
               "overall": {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "mae_raw")}}
    if history:
        metrics["final_loss"] = history[-1]["loss"]
    write_json(reports / "metrics.json", metrics)
    outputs = {"vae": target, "metrics": reports / "metrics.json",
               "reconstructions": _figure_reconstructions(rows, reports / "reconstructions.png"),
               "loss_curve": plot_history(history, ["loss", "l1", "g_adv", "d_loss"], reports / "loss.png",
                                          "VAE training")}
    log.info("train-vae: %s", metrics.get("overall"))
    return StageResult("train_vae", outputs, metrics)
