"""Convergence of the latent DiT by initialisation: scratch, MeDUET encoder weights, MeDUET + REPA.

Each run is the params file's ``train_diffusion`` section with ``init`` (and the seed) set,
trained by the stage itself (``meduet.stages.train_diffusion.run``, Ray Train) into its own
folders under ``<work>/convergence/<init>-seed<seed>`` (the latent cache and the pretrained
MeDUET are shared), with the held-out validation loss every ``val_every`` steps. Prints, per
init, the final validation loss (mean ± sd over seeds) and the steps it needs to reach
scratch's final value (first validation point at or below it; ``>N`` when it never does), and
writes the curves to ``<work>/convergence/results.json`` and a figure.

With ``--frechet-every N`` the run also keeps a checkpoint every ``N`` steps, and each kept
checkpoint's EMA weights go through the ``synthesize`` stage (generated crops only:
``samples_per_site`` per site) and the ``evaluate-synthesis`` stage, whose overall
evaluator-space Fréchet distance (and its real-vs-real floor) becomes a second curve, with
the same summary: final distance per init and steps to reach scratch's final distance.

    python benchmarks/diffusion_convergence.py [--params params.yaml] [--seeds 0 1 2]
        [--frechet-every 300] [--figure docs/figures/diffusion_convergence.png]
        [--set train_diffusion.steps=1500 ...]

Needs the latent cache and the pretrained MeDUET (``dvc repro pretrain`` or ``make run`` first);
``--frechet-every`` also the teacher factors, the VAE and the synthesis evaluator
(``dvc repro extract_factors train_evaluator``).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
from machine import cpu_name  # benchmarks/machine.py (this script's folder)
from synthesis_scoring import generation_scores, link_models, score_samples

from meduet.config import MeduetConfig, Paths, load_config
from meduet.engine.checkpoint import checkpoint_step, read_checkpoint
from meduet.io.atomic import write_json
from meduet.io.figures import plt, save_figure
from meduet.stages import train_diffusion

INITS = ("scratch", "meduet", "meduet_repa")


def run_init(params: Path, overrides: list[str], init: str, seed: int, frechet_every: int = 0) -> dict:
    """Train one init with one seed; its validation curve, final numbers and (``frechet_every``) Fréchet curve."""
    base = load_config(params, overrides)
    folder = (params.resolve().parent / base.paths.work_dir / "convergence" / f"{init}-seed{seed}").resolve()
    shared = Paths.resolve(base, params.resolve().parent)
    # the run's own models folder: the shared MeDUET (and, for the samples' scores, VAE and evaluator)
    link_models(folder, shared, ("pretrain", "vae", "evaluator") if frechet_every else ("pretrain",))
    if frechet_every:  # keep a checkpoint every frechet_every steps (they do not change the run's weights)
        overrides = [*overrides, f"ray.checkpoint_every={frechet_every}",
                     f"ray.keep_checkpoints={base.train_diffusion.steps // frechet_every + 1}"]
    cfg = load_config(params, [*overrides, f"train_diffusion.init={init}", f"train_diffusion.seed={seed}",
                               f"paths.models_dir={folder / 'models'}", f"paths.reports_dir={folder / 'reports'}",
                               f"paths.work_dir={folder / 'work'}"])
    if not cfg.train_diffusion.val_every:
        raise SystemExit("train_diffusion.val_every is 0: set it (e.g. --set train_diffusion.val_every=100)")
    paths = Paths.resolve(cfg, params.resolve().parent)
    start = time.perf_counter()
    result = train_diffusion.run(cfg.train_diffusion, paths, ray=cfg.ray)
    seconds = time.perf_counter() - start
    with open(paths.reports / "train_diffusion" / "history.csv") as fh:
        curve = [(int(row["step"]), float(row["val_loss"])) for row in csv.DictReader(fh) if row.get("val_loss")]
    row = {"init": init, "seed": seed, "seconds": seconds, "curve": curve, "val_loss": result.metrics["val_loss"],
           "val_loss_ema": result.metrics["val_loss_ema"], "steps": result.metrics["steps"]}
    if frechet_every:
        if cfg.ray.storage and "://" in cfg.ray.storage:
            raise SystemExit(f"--frechet-every reads checkpoints from a local folder, not {cfg.ray.storage}")
        storage = Path(paths.local(cfg.ray.storage)) if cfg.ray.storage else paths.work / "ray_results"
        start = time.perf_counter()
        points = [frechet_point(cfg, paths, state) for state in kept_checkpoints(storage)]
        row |= {"frechet": [(p["step"], p["fd"]) for p in points], "frechet_points": points,
                "frechet_seconds": time.perf_counter() - start}
        row["fd"] = points[-1]["fd"] if points else None
    return row


def kept_checkpoints(storage: Path) -> list[Path]:
    """Checkpoint folders of the newest run under ``storage``, by step."""
    runs = {state.parent.parent for state in storage.glob("*/checkpoint_*/state.pt")}
    if not runs:
        raise SystemExit(f"{storage}: no checkpoint kept")
    newest = max(runs, key=lambda run: max(s.stat().st_mtime for s in run.glob("checkpoint_*/state.pt")))
    return sorted((s.parent for s in newest.glob("checkpoint_*/state.pt")), key=lambda c: checkpoint_step(str(c)))


def frechet_point(cfg: MeduetConfig, paths: Paths, checkpoint: Path) -> dict:
    """One checkpoint's EMA weights: generated crops (``synthesize``) and their Fréchet distance
    (``evaluate-synthesis``), under ``<work>/frechet/<step>/``."""
    state = read_checkpoint(str(checkpoint))
    metrics = score_samples(cfg, paths, paths.work / "frechet" / f"{checkpoint_step(str(checkpoint)):06d}",
                            dit_state=state)
    return {"step": int(state["step"]), **generation_scores(metrics)}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first validated step whose loss is at or below ``target`` (None: never)."""
    return next((step for step, loss in curve if loss <= target), None)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarise(rows: list[dict]) -> list[dict]:
    """Per init: final loss (and Fréchet distance) over seeds, and steps to reach scratch's final one (same seed)."""
    scratch = {r["seed"]: r for r in rows if r["init"] == "scratch"}
    table = []
    for init in INITS:
        runs = [r for r in rows if r["init"] == init]
        if not runs:
            continue
        paired = [r for r in runs if r["seed"] in scratch]
        entry = {"init": init, "steps": runs[0]["steps"], "seconds_mean": float(np.mean([r["seconds"] for r in runs])),
                 "steps_to_scratch_final": [steps_to_reach(r["curve"], scratch[r["seed"]]["val_loss"]) for r in paired]}
        entry["val_loss_mean"], entry["val_loss_sd"] = _mean_sd([r["val_loss"] for r in runs])
        if all(r.get("fd") is not None for r in runs):
            entry["fd_mean"], entry["fd_sd"] = _mean_sd([r["fd"] for r in runs])
            entry["fd_ratio_mean"], _ = _mean_sd([r["frechet_points"][-1]["ratio"] for r in runs])
            entry["kid_mean"], entry["kid_sd"] = _mean_sd([r["frechet_points"][-1]["kid"] for r in runs])
            entry["fd_steps_to_scratch_final"] = [steps_to_reach(r["frechet"], scratch[r["seed"]]["fd"])
                                                  for r in paired if scratch[r["seed"]].get("fd") is not None]
        table.append(entry)
    return table


def plot(rows: list[dict], target: Path) -> Path:
    """Validation loss (and, when measured, the Fréchet distance) against steps; band: the seeds' range."""
    panels = [("curve", "held-out validation loss")]
    if any(r.get("frechet") for r in rows):
        panels.append(("frechet", "evaluator-space Fréchet distance"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for init, colour in zip(INITS, ("tab:gray", "tab:blue", "tab:orange"), strict=True):
            curves = [r[key] for r in rows if r["init"] == init and r.get(key)]
            if not curves:
                continue
            steps = [s for s, _ in curves[0]]
            values = np.array([[v for _, v in c] for c in curves])  # (seeds, points)
            ax.plot(steps, values.mean(0), color=colour, marker="." if key == "frechet" else None,
                    label=f"{init} ({len(curves)} seed(s))")
            if len(curves) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.2)
        if key == "frechet":
            floors = [p["floor"] for r in rows for p in r.get("frechet_points", [])]
            ax.axhline(np.mean(floors), color="black", lw=0.8, ls="--", label="real vs real (floor)")
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("DiT convergence by initialisation (band: seed range)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, target, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--frechet-every", type=int, default=0, metavar="N",
                        help="also the Fréchet distance of generated crops every N steps (0: off)")
    parser.add_argument("--figure", type=Path, default=None, help="also write the curves here (PNG)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    rows = [run_init(args.params, args.overrides, init, seed, args.frechet_every)
            for seed in args.seeds for init in args.inits]
    table = summarise(rows)
    work = args.params.resolve().parent / load_config(args.params, args.overrides).paths.work_dir / "convergence"
    write_json(work / "results.json", {"cpu": cpu_name(), "overrides": args.overrides, "rows": rows, "table": table})
    if args.figure:
        plot(rows, args.figure)
    print(f"CPU: {cpu_name()}; seeds {args.seeds}; {table[0]['steps'] if table else 0} steps each")
    frechet = all("fd_mean" in row for row in table)
    print(f"{'init':<13}{'final val loss':>20}{'steps to scratch final':>26}{'s/run':>8}"
          + (f"{'final Fréchet':>20}{'(x floor)':>10}{'steps to scratch final':>26}{'final kernel':>20}"
             if frechet else ""))

    def reach(steps: list[int | None], total: int) -> str:
        return ", ".join(str(s) if s is not None else f">{total}" for s in steps)

    for row in table:
        line = (f"{row['init']:<13}{row['val_loss_mean']:>12.4f} ± {row['val_loss_sd']:.4f}"
                f"{reach(row['steps_to_scratch_final'], row['steps']):>26}{row['seconds_mean']:>8.0f}")
        if frechet:
            line += (f"{row['fd_mean']:>13.1f} ± {row['fd_sd']:<5.1f}{row['fd_ratio_mean']:>9.1f}x"
                     f"{reach(row['fd_steps_to_scratch_final'], row['steps']):>26}"
                     f"{row['kid_mean']:>12.2f} ± {row['kid_sd']:<5.2f}")
        print(line)


if __name__ == "__main__":
    main()
