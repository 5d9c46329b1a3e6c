"""Convergence of the latent DiT by initialisation: scratch, MeDUET encoder weights, MeDUET + REPA.

Each run is the params file's ``train_diffusion`` section with ``init`` (and the seed) set,
trained by the stage itself (``meduet.stages.train_diffusion.run``, Ray Train) into its own
folders under ``<work>/convergence/<init>-seed<seed>`` (the latent cache and the pretrained
MeDUET are shared), with the held-out validation loss every ``val_every`` steps. Prints, per
init, the final validation loss (mean ± sd over seeds) and the steps it needs to reach
scratch's final value (first validation point at or below it; ``>N`` when it never does), and
writes the curves to ``<work>/convergence/results.json`` and a figure.

    python benchmarks/diffusion_convergence.py [--params params.yaml] [--seeds 0 1 2]
        [--figure docs/figures/diffusion_convergence.png] [--set train_diffusion.steps=1500 ...]

Needs the latent cache and the pretrained MeDUET (``dvc repro pretrain`` or ``make run`` first).
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
from machine import cpu_name  # benchmarks/machine.py (this script's folder)

from meduet.artifacts.pretrained import meduet_path
from meduet.config import Paths, load_config
from meduet.io.atomic import write_json
from meduet.io.figures import plt, save_figure
from meduet.stages import train_diffusion

INITS = ("scratch", "meduet", "meduet_repa")


def run_init(params: Path, overrides: list[str], init: str, seed: int) -> dict:
    """Train one init with one seed; its validation curve and final numbers."""
    base = load_config(params, overrides)
    folder = (params.resolve().parent / base.paths.work_dir / "convergence" / f"{init}-seed{seed}").resolve()
    shared = meduet_path(Paths.resolve(base, params.resolve().parent))
    (folder / "models").mkdir(parents=True, exist_ok=True)
    link = folder / "models" / "pretrain"
    if not link.exists():
        link.symlink_to(shared.parent)
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
    return {"init": init, "seed": seed, "seconds": seconds, "curve": curve, "val_loss": result.metrics["val_loss"],
            "val_loss_ema": result.metrics["val_loss_ema"], "steps": result.metrics["steps"]}


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first validated step whose loss is at or below ``target`` (None: never)."""
    return next((step for step, loss in curve if loss <= target), None)


def summarise(rows: list[dict]) -> list[dict]:
    """Per init: final loss over seeds, and steps to reach scratch's final loss (same seed)."""
    scratch = {r["seed"]: r["val_loss"] for r in rows if r["init"] == "scratch"}
    table = []
    for init in INITS:
        runs = [r for r in rows if r["init"] == init]
        if not runs:
            continue
        reach = [steps_to_reach(r["curve"], scratch[r["seed"]]) for r in runs if r["seed"] in scratch]
        table.append({"init": init, "val_loss_mean": float(np.mean([r["val_loss"] for r in runs])),
                      "val_loss_sd": float(np.std([r["val_loss"] for r in runs], ddof=1)) if len(runs) > 1 else 0.0,
                      "steps_to_scratch_final": reach, "steps": runs[0]["steps"],
                      "seconds_mean": float(np.mean([r["seconds"] for r in runs]))})
    return table


def plot(rows: list[dict], target: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for init, colour in zip(INITS, ("tab:gray", "tab:blue", "tab:orange"), strict=True):
        curves = [r["curve"] for r in rows if r["init"] == init]
        if not curves:
            continue
        steps = [s for s, _ in curves[0]]
        losses = np.array([[loss for _, loss in c] for c in curves])  # (seeds, points)
        ax.plot(steps, losses.mean(0), color=colour, label=f"{init} ({len(curves)} seed(s))")
        if len(curves) > 1:
            ax.fill_between(steps, losses.min(0), losses.max(0), color=colour, alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out validation loss")
    ax.set_title("DiT convergence by initialisation (band: seed range)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, target, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--figure", type=Path, default=None, help="also write the curves here (PNG)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    rows = [run_init(args.params, args.overrides, init, seed) for seed in args.seeds for init in args.inits]
    table = summarise(rows)
    work = args.params.resolve().parent / load_config(args.params, args.overrides).paths.work_dir / "convergence"
    write_json(work / "results.json", {"cpu": cpu_name(), "overrides": args.overrides, "rows": rows, "table": table})
    if args.figure:
        plot(rows, args.figure)
    print(f"CPU: {cpu_name()}; seeds {args.seeds}; {table[0]['steps'] if table else 0} steps each")
    print(f"{'init':<13}{'final val loss':>20}{'steps to scratch final':>26}{'s/run':>8}")
    for row in table:
        reach = ", ".join(str(s) if s is not None else f">{row['steps']}" for s in row["steps_to_scratch_final"])
        print(f"{row['init']:<13}{row['val_loss_mean']:>12.4f} ± {row['val_loss_sd']:.4f}{reach:>26}"
              f"{row['seconds_mean']:>8.0f}")


if __name__ == "__main__":
    main()
