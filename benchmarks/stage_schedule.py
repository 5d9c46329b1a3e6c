"""Replay a `make run`'s stage times through the flow's own scheduling, to ask what-if questions.

The flow starts stages with ``meduet.dvc_graph.StageQueue`` (order) and
``flows.pipeline.Slots`` (what fits the machine). This script feeds them the seconds each
stage took in a finished run (``<reports>/<stage>/timing.json``) and prints the measured
span (first stage's start to last stage's end) beside the simulated one (CPUs from
``--params``: give ``--cpus`` where the run used others), then the variants
asked for: other CPU counts (``--cpus stage=n`` with ``--seconds stage=s``, the time that
stage took at that count in another run), a dependency dropped (``--drop-dep
finetune_sweep:synthesize``), smaller stages allowed to overtake one waiting for room
(``--overtake``; the flow does not), or ready stages taken in dvc.yaml order (``--file-order``).

    python benchmarks/stage_schedule.py --reports /path/to/run/reports --cores 2 \\
        [--cpus finetune_sweep=2 --seconds finetune_sweep=440] [--drop-dep a:b] [--overtake] [--file-order]

The times are the run's (its machine, its load): the simulation says what the schedule
does with them, not how fast any stage would run elsewhere. ``--overhead`` is the flow's
cost per stage around the command (DVC checking and recording, Prefect), 4 s by default.
"""

from __future__ import annotations

import argparse
import heapq
import json
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from flows.pipeline import Slots, stage_slots
from meduet.config import load_config
from meduet.dvc_graph import Stage, StageQueue, load_stages, overlaps, upstream_stages

ROOT = Path(__file__).resolve().parents[1]


def run_times(reports: Path, plan: list[Stage]) -> tuple[dict[str, float], float]:
    """Each stage's seconds, and the measured span from the first start to the last end."""
    seconds, starts, ends = {}, [], []
    for stage in plan:
        timing = json.loads((reports / stage.name / "timing.json").read_text())
        end = datetime.fromisoformat(timing["finished"]).timestamp()
        seconds[stage.name] = float(timing["seconds"])
        starts.append(end - timing["seconds"])
        ends.append(end)
    return seconds, max(ends) - min(starts)


def simulate(plan: list[Stage], slots: Slots, seconds: dict[str, float], *, overhead: float,
             overtake: bool = False, file_order: bool = False) -> float:
    """Seconds from the first stage's start to the last one's end, scheduled as the flow does
    (``file_order``: ready stages in dvc.yaml order instead of the queue's longest tail first)."""
    queue, running, now = StageQueue(plan), [], 0.0  # running: heap of (end, name)
    if file_order:
        queue.tail = dict.fromkeys(queue.tail, 0)  # every tie kept in plan order
    by_name = {s.name: s for s in plan}
    while not queue.done:
        for stage in queue.ready():
            if not slots.fits(stage.name, [name for _, name in running]):
                if overtake:
                    continue
                break
            queue.start(stage)
            heapq.heappush(running, (now + seconds[stage.name] + overhead, stage.name))
        now, name = heapq.heappop(running)
        queue.finish(by_name[name])
    return now


def drop_dependency(plan: list[Stage], consumer: str, producer: str) -> list[Stage]:
    """``plan`` with ``consumer`` no longer reading what ``producer`` writes."""
    if producer not in upstream_stages(plan)[consumer]:
        raise SystemExit(f"{consumer} does not depend on {producer}")
    outputs = next(s for s in plan if s.name == producer).outputs
    return [replace(s, deps=tuple(d for d in s.deps if not any(overlaps(d, out) for out in outputs)))
            if s.name == consumer else s for s in plan]


def parse_pairs(values: list[str]) -> dict[str, float]:
    """``["stage=2", ...]`` as ``{"stage": 2.0, ...}``."""
    return {name: float(number) for name, _, number in (value.partition("=") for value in values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=Path, required=True, help="a finished run's reports folder")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--cores", type=int, required=True, help="CPUs of the machine the run ran on")
    parser.add_argument("--cpus", action="append", default=[], metavar="STAGE=N")
    parser.add_argument("--seconds", action="append", default=[], metavar="STAGE=S")
    parser.add_argument("--drop-dep", action="append", default=[], metavar="CONSUMER:PRODUCER")
    parser.add_argument("--overtake", action="store_true")
    parser.add_argument("--file-order", action="store_true", help="ready stages in dvc.yaml order")
    parser.add_argument("--overhead", type=float, default=4.0)
    args = parser.parse_args()

    cfg = load_config(args.params)
    plan = load_stages(ROOT)
    seconds, measured = run_times(args.reports, plan)
    as_params = simulate(plan, stage_slots(cfg, plan, args.cores), seconds, overhead=args.overhead)
    print(f"measured span {measured / 60:.1f} min; replayed with the params' CPUs {as_params / 60:.1f} min")

    cfg.ray.stage_cpus.update({name: int(n) for name, n in parse_pairs(args.cpus).items()})
    seconds.update(parse_pairs(args.seconds))
    for spec in args.drop_dep:
        consumer, _, producer = spec.partition(":")
        plan = drop_dependency(plan, consumer, producer)
    variant = simulate(plan, stage_slots(cfg, plan, args.cores), seconds, overhead=args.overhead,
                       overtake=args.overtake, file_order=args.file_order)
    changes = [*(f"cpus {c}" for c in args.cpus), *(f"seconds {c}" for c in args.seconds),
               *(f"drop {d}" for d in args.drop_dep), *(["overtake"] * args.overtake),
               *(["file order"] * args.file_order)]
    if changes:
        print(f"with {', '.join(changes)}: {variant / 60:.1f} min")
    core_minutes = sum(seconds[s.name] * stage_slots(cfg, plan, args.cores).demand[s.name] for s in plan) / 60
    print(f"work {core_minutes:.1f} core-minutes: no schedule on {args.cores} cores beats "
          f"{core_minutes / args.cores:.1f} min")


if __name__ == "__main__":
    main()
