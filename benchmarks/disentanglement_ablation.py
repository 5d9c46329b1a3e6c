"""Ablation of the recipe changes that make content site-free: the authors' recipe, each change, all of them.

Each variant is the params file's ``pretrain`` section with ``pretrain.method`` set as
below, trained, its factors extracted and evaluated with the same stage functions the
pipeline runs, each into its own folders under ``<work>/ablation/<variant>-seed<seed>`` (the
latent cache is shared). Prints one row per variant: mean ± sd over the seeds of the final
reconstruction loss, the site probes (content on all windows and on region-matched
windows with the null's 95th percentile, style), cross-site subject retrieval and the
counterfactual swap; writes every run's numbers to ``<work>/ablation/results.json``.

    python benchmarks/disentanglement_ablation.py [--params params.yaml] [--variants faithful improved]
        [--seeds 0 1 2] [--set pretrain.steps=1500 ...]

Needs the latent cache (``dvc repro encode_latents`` or ``make run`` first).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from machine import cpu_name  # benchmarks/machine.py (this script's folder)

from meduet.config import Paths, load_config
from meduet.io.atomic import write_json
from meduet.stages import evaluate_disentanglement, extract_factors, pretrain

FAITHFUL = ["pretrain.method.recipe=faithful"]
VARIANTS = {
    "faithful": FAITHFUL,
    "+adversary": [*FAITHFUL, "pretrain.method.clean_adversary=1.0", "pretrain.method.crops_per_volume=4"],
    "+partners": [*FAITHFUL, "pretrain.method.cross_site_partners=true", "pretrain.method.same_site_negatives=true"],
    "+alignment": [*FAITHFUL, "pretrain.method.decorrelation=0.1", "pretrain.method.site_alignment=10.0"],
    "+schedules": [*FAITHFUL, "pretrain.method.grl_ramp=true", "pretrain.method.ema_horizon=[0.01,0.1]",
                   "pretrain.method.epoch_sampling=true"],
    "all": ["pretrain.method.recipe=all"],
    "improved": ["pretrain.method.recipe=improved"],  # the default: the best measured (= +adversary)
    "improved-no_mftd": ["pretrain.method.recipe=improved", "pretrain.use_mftd=false"],
    "improved-no_siqc": ["pretrain.method.recipe=improved", "pretrain.use_siqc=false"],
}
DEFAULT_VARIANTS = ["faithful", "+adversary", "+partners", "+alignment", "+schedules", "all"]
# (key in a run's row, column header, digits)
COLUMNS = [("seconds", "train s", 0), ("rec", "rec", 3), ("content", "c→site", 2), ("region_content", "c→site reg", 2),
           ("region_null_p95", "null p95", 2), ("style", "s→site", 2), ("retrieval_content", "c top1", 2),
           ("retrieval_style", "s top1", 2), ("counterfactual", "cf>A", 2), ("counterfactual_roundtrip", "cf>rt", 2)]


def run_variant(params: Path, overrides: list[str], variant: str, seed: int) -> dict:
    """Train, extract and evaluate one variant with one seed; its numbers as one row."""
    name = f"{variant}-seed{seed}"
    base = load_config(params, overrides)
    folder = Path(base.paths.work_dir) / "ablation" / name
    cfg = load_config(params, [*overrides, *VARIANTS[variant], f"pretrain.seed={seed}",
                               f"paths.models_dir={folder / 'models'}", f"paths.reports_dir={folder / 'reports'}",
                               f"paths.factors_dir={folder / 'factors'}"])
    paths = Paths.resolve(cfg, params.resolve().parent)
    start = time.perf_counter()
    trained = pretrain.run(cfg.pretrain, paths, ray=cfg.ray)
    seconds = time.perf_counter() - start
    extract_factors.run(cfg.extract_factors, paths, ray=cfg.ray)
    metrics = evaluate_disentanglement.run(cfg.evaluate_disentanglement, paths).metrics
    counterfactual = metrics.get("counterfactual", {})
    return {"run": name, "variant": variant, "seed": seed, "seconds": seconds, "rec": trained.metrics["final"]["rec"],
            "content": metrics["content_accuracy"], "content_null_p95": metrics["content_null_p95"],
            "region_content": metrics["region_content_accuracy"], "region_null_p95": metrics["region_content_null_p95"],
            "style": metrics["style_accuracy"], "retrieval_content": metrics["retrieval_content_top1"],
            "retrieval_style": metrics["retrieval_style_top1"], "retrieval_chance": metrics["retrieval_chance"],
            "counterfactual": counterfactual.get("swap_closer_than_a"),
            "counterfactual_roundtrip": counterfactual.get("swap_closer_than_roundtrip"),
            "goals": {k: v["met"] for k, v in metrics["goals"].items()}, "chance": metrics["chance"]}


def summarise(rows: list[dict], variants: list[str]) -> list[dict]:
    """Mean and sd over seeds of every column, per variant."""
    table = []
    for variant in variants:
        runs = [r for r in rows if r["variant"] == variant]
        cell = {"variant": variant, "seeds": len(runs)}
        for key, _, _ in COLUMNS:
            values = np.array([np.nan if r[key] is None else r[key] for r in runs], dtype=float)
            cell[key] = (float(np.nanmean(values)), float(np.nanstd(values)))
        table.append(cell)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default: <work>/ablation/results.json); rows are appended run by run")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="RESULTS",
                        help="print the table of earlier results files instead of running anything")
    args = parser.parse_args()
    if args.merge:
        rows = [row for path in args.merge for row in json.loads(path.read_text())["rows"]]
        variants = list(dict.fromkeys(row["variant"] for row in rows))
        print_table(summarise(rows, variants), rows, sorted({row["seed"] for row in rows}))
        return
    out = args.out or Path(load_config(args.params, args.overrides).paths.work_dir) / "ablation" / "results.json"
    rows = []
    for seed in args.seeds:
        for variant in args.variants:
            rows.append(run_variant(args.params, args.overrides, variant, seed))
            print(json.dumps(rows[-1]), flush=True)
            write_json(out, {"machine": cpu_name(), "overrides": args.overrides, "rows": rows})
    print_table(summarise(rows, args.variants), rows, args.seeds)


def print_table(table: list[dict], rows: list[dict], seeds: list[int]) -> None:
    print(f"\n{'variant':<18}{'seeds':>6}" + "".join(f"{header:>14}" for _, header, _ in COLUMNS))
    for cell in table:
        print(f"{cell['variant']:<18}{cell['seeds']:>6}"
              + "".join(f"{cell[k][0]:>8.{d}f}±{cell[k][1]:<5.{d}f}" for k, _, d in COLUMNS))
    print(f"\nmean ± sd over seeds {seeds} ({cpu_name()}).")
    print(f"c→site / s→site: cross-validated site-probe accuracy from content / style (chance "
          f"{rows[0]['chance']:.2f}); reg: content on region-matched windows, with its permutation null's 95th "
          f"percentile; c top1 / s top1: cross-site subject retrieval (chance {rows[0]['retrieval_chance']:.2f}); "
          f"cf>A / cf>rt: counterfactual swaps closer to the real s@B than s@A itself / than s@A's round trip "
          f"through the decoder. rec: last logged reconstruction loss.")


if __name__ == "__main__":
    main()
