"""Segmentation quality against fine-tuning steps: how far the demo's 300 steps are from converged.

For each step count, the fine-tuning sweep runs its label-efficiency cells at one label count
(default: all labels) for the given inits, one seed, each in ``<work>/finetune_steps/<steps>/``
(``paths.reports_dir``; cells already trained with the same settings are reused, so a rerun
only rescores). The table: per step count and init, the cell's seconds in this run (a reused cell
counts only its scoring), the held-out mean Dice,
the large organs' mean Dice (the analysis issue's all-labels goal, >= 0.85; organs of at least
``finetune.large_organ_min_ml`` of true volume) with its bootstrap interval over held-out cases,
and every organ's Dice.

    python benchmarks/finetune_steps.py [--params params.yaml] [--steps 300 1500 3000] [--inits scratch meduet]

Needs the data, VAE and pretrained encoder of a ``make run`` (or ``dvc repro pretrain``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from machine import cpu_name  # benchmarks/machine.py (this script's folder)

from meduet.config import Paths, load_config
from meduet.engine.finetune_runs import LARGE_ORGAN_TARGET, large_organs, read_scores
from meduet.io.atomic import write_json
from meduet.stages import finetune_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--steps", nargs="+", type=int, default=[300, 1500, 3000])
    parser.add_argument("--inits", nargs="+", default=["meduet"], choices=["scratch", "mae", "meduet"])
    parser.add_argument("--labels", default="all", help="labelled training subjects per site (a number or all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    base = load_config(args.params, args.overrides)
    work = Paths.resolve(base, args.params.resolve().parent).work / "finetune_steps"
    results = []
    for steps in args.steps:
        cfg = load_config(args.params, [*args.overrides, f"finetune.steps={steps}", f"finetune_sweep.steps={steps}",
                                        f"finetune_sweep.labels_per_site=[{args.labels}]",
                                        f"finetune_sweep.inits=[{', '.join(args.inits)}]",
                                        "finetune_sweep.seeds=[0]", "finetune_sweep.leave_one_site_out=false",
                                        "finetune_sweep.synthetic_arm=false",
                                        f"paths.reports_dir={work / str(steps)}"])
        paths = Paths.resolve(cfg, args.params.resolve().parent)
        metrics = finetune_sweep.run(cfg.finetune_sweep, paths, ray=cfg.ray, finetune=cfg.finetune,
                                     harmonize=cfg.harmonize).metrics
        scores = read_scores(paths.reports / finetune_sweep.STAGE / "scores.csv")
        for init in args.inits:
            mine = [r for r in scores if r["arm"] == init]
            large = large_organs(mine, cfg.finetune.large_organ_min_ml)
            organs = sorted({r["organ"] for r in mine}, key=cfg.finetune.label_names.index)
            results.append({"steps": steps, "init": init,
                            "seconds": next(c["seconds"] for c in metrics["per_cell"] if c["arm"] == init),
                            "mean_dice": float(np.mean([r["dice"] for r in mine])), "large_organs": large,
                            "by_organ": {o: float(np.mean([r["dice"] for r in mine if r["organ"] == o]))
                                         for o in organs}})
    name = f"results-{'-'.join(map(str, args.steps))}-{'-'.join(args.inits)}.json"
    write_json(work / name, {"cpu": cpu_name(), "overrides": args.overrides, "labels": args.labels,
                                       "rows": results})
    print(f"CPU: {cpu_name()}; ray.local_num_cpus: {base.ray.local_num_cpus}; labels per site: {args.labels}; "
          f"seed 0; held-out cases: {results[0]['large_organs']['cases'] if results else 0}")
    organs = list(results[0]["by_organ"]) if results else []
    large = results[0]["large_organs"]["organs"] if results else []
    print(f"large organs (>= {base.finetune.large_organ_min_ml:g} mL): {', '.join(large)}; "
          f"goal: their mean Dice >= {LARGE_ORGAN_TARGET}")
    print(f"{'steps':>6} {'init':<8}{'s':>6}{'mean Dice':>10}{'large organs (95 % CI)':>26}"
          + "".join(f"{o[:9]:>10}" for o in organs))
    for r in results:
        lo = r["large_organs"]
        interval = "n/a" if lo["ci95"] is None else f"{lo['ci95'][0]:.3f}-{lo['ci95'][1]:.3f}"
        print(f"{r['steps']:>6} {r['init']:<8}{r['seconds']:>6.0f}{r['mean_dice']:>10.3f}"
              f"{lo['dice']:>12.3f} ({interval}) " + "".join(f"{r['by_organ'].get(o, float('nan')):>10.2f}"
                                                             for o in organs))


if __name__ == "__main__":
    main()
