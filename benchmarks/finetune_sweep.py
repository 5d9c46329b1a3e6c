"""The fine-tuning sweep's tables: run the stage (any protocol, e.g. the whole one) or read a finished run.

    python benchmarks/finetune_sweep.py [--params params.yaml] [--set finetune_sweep.full=true ...]
    python benchmarks/finetune_sweep.py --metrics reports/finetune_sweep/metrics.json

The first form runs ``finetune-sweep`` through its stage function (cells already finished
with the same settings are reused, so an interrupted sweep goes on where it stopped) and
prints the CPU, the wall time and the stage's tables (``meduet.evaluation.sweep_tables``:
mean ± sd over seeds per point and arm, paired differences with bootstrap intervals, the
goals, seconds per cell). The second prints the tables of a run already made. Needs the
data, VAE and pretrained encoders of a ``make run`` (or ``dvc repro finetune_sweep``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py (this script's folder)

from meduet.config import Paths, load_config
from meduet.evaluation.sweep_tables import sweep_tables
from meduet.stages import finetune_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--metrics", type=Path, default=None, help="print this finished run's tables; run nothing")
    args = parser.parse_args()
    if args.metrics is not None:
        print(sweep_tables(json.loads(args.metrics.read_text())))
        return
    cfg = load_config(args.params, args.overrides)
    paths = Paths.resolve(cfg, args.params.resolve().parent)
    start = time.perf_counter()
    result = finetune_sweep.run(cfg.finetune_sweep, paths, ray=cfg.ray, finetune=cfg.finetune,
                                harmonize=cfg.harmonize)
    print(f"CPU: {cpu_name()}; ray.local_num_cpus: {cfg.ray.local_num_cpus}; "
          f"sweep wall time {(time.perf_counter() - start) / 60:.1f} min")
    print(sweep_tables(result.metrics))


if __name__ == "__main__":
    main()
