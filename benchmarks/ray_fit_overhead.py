"""What a Ray Train run costs besides its training: local Ray start-up and one `distributed.fit` of a no-op loop.

Every training stage (and every cell of the fine-tuning sweep) is one ``meduet.distributed.fit``:
Ray Train starts a controller actor and a worker group, the loop runs, and the result travels
back. This measures that fixed cost with a loop that only reports ``--checkpoints`` checkpoints
back to back, for each controller poll interval given (``ray.train_poll_s``, which ``fit`` passes
to Ray Train as ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``; Ray's own default is 2 s). Back-to-back
checkpoints each wait for a poll; in a real run they are further apart than a poll, so
``--checkpoints 1`` is the fixed cost a stage pays per run. ``--watcher on off`` also compares Ray
Train's preemption watcher (an actor per run; Ray's default, which ``fit`` turns off on a local Ray)
with the pipeline's setting.

Each (repeat, row) is its own process, with its own local Ray, the rows alternating,
so that both see the same machine. Prints, per interval (and watcher setting): Ray start-up, the
median and range of the fits, and the ratio against the first row, each with the CPU seconds the
whole machine spent meanwhile (Ray's controller, worker and helper actors are processes of their
own, so the driver's own CPU time misses most of it; run it on an otherwise idle machine).

    python benchmarks/ray_fit_overhead.py [--poll 2.0 0.25] [--watcher off] [--fits 3] [--repeats 2] [--checkpoints 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from statistics import median

from machine import cpu_flags, cpu_name, machine_busy_cpu_seconds, run_json_row  # benchmarks/machine.py


def report_checkpoints(checkpoints: int) -> None:
    """The training loop: ``checkpoints`` checkpoint reports back to back, nothing else."""
    from meduet.distributed import report

    for step in range(1, checkpoints + 1):
        report({"step": step}, state={"step": step})


def child(fits: int, checkpoints: int, poll: float) -> dict:
    """One process: start local Ray, then ``fits`` runs of the loop; wall seconds of each, and the CPU seconds
    the whole machine spent meanwhile (Ray's actors are processes of their own)."""
    from meduet.distributed import driver
    from meduet.engine.runs import RunSpec, Scaling

    root = Path(tempfile.mkdtemp(prefix="meduet-ray-bench-"))

    def spec(name: str) -> RunSpec:
        return RunSpec(stage="bench", config_hash=name, storage=str(root / "runs"), temp_dir=root / "ray",
                       local_num_cpus=2, max_failures=0, checkpoint_every=1, keep_checkpoints=checkpoints,
                       train_poll_s=poll)

    start, cpu = time.perf_counter(), machine_busy_cpu_seconds()
    driver.ensure_ray(spec("start"))
    seconds = {"ray_start": time.perf_counter() - start, "ray_start_cpu": machine_busy_cpu_seconds() - cpu,
               "fits": [], "fits_cpu": []}
    for index in range(fits):
        start, cpu = time.perf_counter(), machine_busy_cpu_seconds()
        result = driver.fit(report_checkpoints, {"checkpoints": checkpoints}, Scaling(num_workers=1),
                            spec(f"run{index}"))
        seconds["fits"].append(time.perf_counter() - start)
        seconds["fits_cpu"].append(machine_busy_cpu_seconds() - cpu)
        assert len(result.history) == checkpoints, result.history
    # Every actor the fits started, alive or finished, by class (Ray's State API; the local Ray serves it).
    from ray.util.state import list_actors

    actors = list_actors(limit=10_000, raise_on_missing_output=False)
    seconds["actors"] = dict(Counter(actor.class_name for actor in actors))
    driver.shutdown_ray()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--poll", type=float, nargs="+", default=[2.0, 0.25], help="controller poll intervals (s)")
    parser.add_argument("--fits", type=int, default=3, help="fits per process (the first pays for cold caches)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per row")
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoint reports per fit")
    parser.add_argument("--watcher", nargs="+", choices=["on", "off"], default=["off"],
                        help="Ray Train's preemption watcher: on (Ray's default) or off (fit's choice on a local Ray)")
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)  # one process at this poll interval
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.fits, args.checkpoints, args.child)))
        return

    from meduet.distributed.driver import PREEMPTION_WATCHER_ENV

    rows_of = [(poll, watcher) for poll in args.poll for watcher in args.watcher]
    runs: dict[tuple[float, str], list[dict]] = {row: [] for row in rows_of}
    for repeat in range(args.repeats):
        for poll, watcher in rows_of:
            # "on" is a user's own setting, which fit keeps; "off" is what fit sets on a local Ray by itself
            env = {**os.environ, PREEMPTION_WATCHER_ENV: "1"} if watcher == "on" else None
            runs[poll, watcher].append(run_json_row(
                [sys.executable, __file__, "--child", str(poll), "--fits", str(args.fits),
                 "--checkpoints", str(args.checkpoints)], env=env))
            print(f"repeat {repeat + 1}, poll {poll} s, watcher {watcher}: {runs[poll, watcher][-1]}",
                  file=sys.stderr, flush=True)

    print(f"# {cpu_name()} ({', '.join(cpu_flags())}), {os.cpu_count()} CPUs; local Ray with 2 CPUs; "
          f"{args.repeats} processes x {args.fits} fits per row, {args.checkpoints} checkpoints per fit")
    print("# CPU s: what the whole machine used meanwhile (every process; run it on an idle machine)")
    print("| poll interval | preemption watcher | Ray start-up s (median) | its CPU s | fit s, median (range) "
          "| fit ratio | fit CPU s, median (range) |")
    print("|---|---|---|---|---|---|---|")
    baseline = None
    for (poll, watcher), rows in runs.items():
        fits = [s for row in rows for s in row["fits"]]
        cpus = [s for row in rows for s in row["fits_cpu"]]
        fit = median(fits)
        baseline = baseline or fit
        print(f"| {poll:g} s | {watcher} | {median(r['ray_start'] for r in rows):.2f} | "
              f"{median(r['ray_start_cpu'] for r in rows):.1f} | {fit:.2f} ({min(fits):.2f}-{max(fits):.2f}) | "
              f"{fit / baseline:.2f}x | {median(cpus):.1f} ({min(cpus):.1f}-{max(cpus):.1f}) |")
    for (poll, watcher), rows in runs.items():
        started = Counter()
        for row in rows:
            started.update(row["actors"])
        per_fit = ", ".join(f"{name} {count / (args.fits * len(rows)):g}" for name, count in sorted(started.items()))
        print(f"# actors started per fit (poll {poll:g} s, watcher {watcher}; one-offs count a fraction): {per_fit}")


if __name__ == "__main__":
    main()
