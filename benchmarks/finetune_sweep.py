"""The fine-tuning sweep's tables: run the stage (any protocol, e.g. the whole one) or read a finished run.

    python benchmarks/finetune_sweep.py [--params params.yaml] [--set finetune_sweep.full=true ...]
    python benchmarks/finetune_sweep.py --metrics reports/finetune_sweep/metrics.json
    python benchmarks/finetune_sweep.py --merge <reports of run 1>/finetune_sweep <reports of run 2>/finetune_sweep \
        [--figure sweep.png]

The first form runs ``finetune-sweep`` through its stage function (cells already finished
with the same settings are reused, so an interrupted sweep goes on where it stopped) and
prints the CPU, the wall time and the stage's tables (``meduet.evaluation.sweep_tables``:
mean ± sd over seeds per point and arm, paired differences with bootstrap intervals, the
goals, seconds per cell). The second prints the tables of a run already made. The third
summarises sweeps that ran disjoint cells of one protocol (e.g. other seeds, side by side,
each with its own ``paths.reports_dir``) as one: their ``scores.csv`` rows through the
stage's own summary (``finetune_sweep.summarize_sweep``), and ``--figure`` draws it as the
stage's ``sweep.png`` does. Needs the data, VAE and pretrained
encoders of a ``make run`` (or ``dvc repro finetune_sweep``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py (this script's folder)

from meduet.config import Paths, load_config
from meduet.engine.finetune_runs import read_scores
from meduet.evaluation.sweep_tables import sweep_tables
from meduet.stages import finetune_sweep


def merged_metrics(folders: list[Path], large_organ_min_ml: float) -> dict:
    """One summary of several sweeps' ``scores.csv`` and ``per_cell`` rows (disjoint cells of one protocol)."""
    rows: list[dict] = []
    per_cell: list[dict] = []
    runs = []
    for folder in folders:
        rows += read_scores(folder / "scores.csv")
        runs.append(json.loads((folder / "metrics.json").read_text()))
        per_cell += runs[-1]["per_cell"]
    names = {(c["protocol"], c["arm"], c["labels_per_site"], c["left_out"], c["seed"]) for c in per_cell}
    if len(names) != len(per_cell):
        raise SystemExit(f"{[str(f) for f in folders]}: the runs share cells; merge runs of disjoint cells only")

    def ordered(protocol: str, key: str) -> list:
        return list(dict.fromkeys(r[key] for r in rows if r["protocol"] == protocol))

    summary = finetune_sweep.summarize_sweep(
        rows, labels=ordered("label_efficiency", "labels_per_site"),
        efficiency_arms=ordered("label_efficiency", "arm"), sites=ordered("leave_one_site_out", "left_out"),
        loso_arms=ordered("leave_one_site_out", "arm"), large_organ_min_ml=large_organ_min_ml)
    return {"cells": len(per_cell), "steps": runs[0]["steps"], "held_out_cases": runs[0]["held_out_cases"],
            **summary, "per_cell": per_cell}


def scored_arms(cells: dict) -> list[str]:
    """Every arm a summary scored (``{point or site: {arm: scores, "<arm>_minus": differences}}``), in its order."""
    return list(dict.fromkeys(arm for point in cells.values() for arm, v in point.items() if "dice" in v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--metrics", type=Path, default=None, help="print this finished run's tables; run nothing")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="REPORTS",
                        help="print one summary of these finished sweeps' report folders; run nothing")
    parser.add_argument("--figure", type=Path, default=None,
                        help="with --merge: also draw the merged summary as the stage's sweep.png here")
    args = parser.parse_args()
    cfg = load_config(args.params, args.overrides)
    if args.merge:
        merged = merged_metrics(args.merge, cfg.finetune.large_organ_min_ml)
        print(sweep_tables(merged))
        if args.figure is not None:
            efficiency, loso = merged["label_efficiency"], merged["leave_one_site_out"] or None
            efficiency_arms, loso_arms = scored_arms(efficiency), scored_arms(loso or {})
            print(f"figure: {finetune_sweep.plot_sweep(efficiency, loso, efficiency_arms, loso_arms, args.figure)}")
        return
    if args.metrics is not None:
        print(sweep_tables(json.loads(args.metrics.read_text())))
        return
    paths = Paths.resolve(cfg, args.params.resolve().parent)
    start = time.perf_counter()
    result = finetune_sweep.run(cfg.finetune_sweep, paths, ray=cfg.ray, finetune=cfg.finetune,
                                harmonize=cfg.harmonize)
    print(f"CPU: {cpu_name()}; ray.local_num_cpus: {cfg.ray.local_num_cpus}; "
          f"sweep wall time {(time.perf_counter() - start) / 60:.1f} min")
    print(sweep_tables(result.metrics))


if __name__ == "__main__":
    main()
