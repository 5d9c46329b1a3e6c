"""The stage graph, read from ``dvc.yaml`` (its one owner) for the Prefect flow and the results report.

``load_stages`` returns the stages in an order in which they can run: stage B comes after
stage A when one of B's deps is one of A's outputs (outs, metrics or plots), lies inside
one, or contains one. Among stages that are ready at the same time, the one written first
in ``dvc.yaml`` runs first, so the order is stable and readable.

Only plain stages are understood; ``foreach``/``matrix`` templating is refused with a
clear error rather than guessed at.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

DVC_FILE = "dvc.yaml"


class DagError(ValueError):
    """A ``dvc.yaml`` the flow cannot turn into an execution order."""


@dataclass(frozen=True)
class Stage:
    """One DVC stage as the flow needs it; paths are relative to the project folder."""

    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    metrics: tuple[str, ...]
    plots: tuple[str, ...]

    @property
    def outputs(self) -> tuple[str, ...]:
        """Everything the stage writes: outs, metrics and plots."""
        return self.outs + self.metrics + self.plots


def _entry_paths(entries: Any, stage: str, key: str) -> tuple[str, ...]:
    """Paths of a deps/outs/metrics/plots list; an entry is a path or ``{path: options}``."""
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise DagError(f"stage '{stage}': '{key}' must be a list, got {type(entries).__name__}")
    paths = []
    for entry in entries:
        if isinstance(entry, dict) and len(entry) == 1:
            entry = next(iter(entry))
        if not isinstance(entry, str):
            raise DagError(f"stage '{stage}': cannot read {key} entry {entry!r}")
        paths.append(_normalise(entry))
    return tuple(paths)


def _normalise(path: str) -> str:
    return PurePosixPath(os.path.normpath(path.replace("\\", "/"))).as_posix()


def overlaps(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` are the same path or one lies inside the other."""
    pa, pb = PurePosixPath(a), PurePosixPath(b)
    return pa == pb or pa.is_relative_to(pb) or pb.is_relative_to(pa)


def parse_stages(text: str, source: str = DVC_FILE) -> list[Stage]:
    """The stages of a ``dvc.yaml`` document, in file order."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise DagError(f"{source}: not valid YAML: {error}") from None
    raw = doc.get("stages") if isinstance(doc, dict) else None
    if not isinstance(raw, dict):
        raise DagError(f"{source}: expected a top-level 'stages' mapping")
    stages = []
    for name, spec in raw.items():
        if not isinstance(spec, dict):
            raise DagError(f"{source}: stage '{name}' must be a mapping")
        if "foreach" in spec or "matrix" in spec:
            raise DagError(f"{source}: stage '{name}' uses foreach/matrix, which the flow does not expand")
        if "cmd" not in spec:
            raise DagError(f"{source}: stage '{name}' has no cmd")
        cmd = spec["cmd"]
        stages.append(Stage(
            name=str(name),
            cmd=" && ".join(cmd) if isinstance(cmd, list) else str(cmd),
            deps=_entry_paths(spec.get("deps"), name, "deps"),
            outs=_entry_paths(spec.get("outs"), name, "outs"),
            metrics=_entry_paths(spec.get("metrics"), name, "metrics"),
            plots=_entry_paths(spec.get("plots"), name, "plots"),
        ))
    return stages


def upstream_stages(stages: list[Stage]) -> dict[str, set[str]]:
    """For each stage, the stages among ``stages`` that write one of its deps (its direct upstream)."""
    upstream: dict[str, set[str]] = {s.name: set() for s in stages}
    for consumer in stages:
        for producer in stages:
            if producer is consumer:
                continue
            if any(overlaps(dep, out) for dep in consumer.deps for out in producer.outputs):
                upstream[consumer.name].add(producer.name)
    return upstream


def execution_order(stages: list[Stage]) -> list[Stage]:
    """Topological order of ``stages`` (Kahn's algorithm, ties broken by file order)."""
    upstream = upstream_stages(stages)
    ordered: list[Stage] = []
    done: set[str] = set()
    pending = list(stages)
    while pending:
        ready = next((s for s in pending if upstream[s.name] <= done), None)
        if ready is None:
            names = ", ".join(s.name for s in pending)
            raise DagError(f"{DVC_FILE}: stages depend on each other in a cycle: {names}")
        ordered.append(ready)
        done.add(ready.name)
        pending.remove(ready)
    return ordered


class StageQueue:
    """Which stages of a plan may start now, for running several side by side.

    A stage is ready when every stage of the plan upstream of it has finished. Ready stages
    come longest tail first: the one with the most stages downstream of it, so work that
    gates most of the graph is never left waiting behind a leaf (the ccb5044 demo run replayed
    by ``benchmarks/stage_schedule.py``: 23.8 min, 25.3 with ``--file-order``); ties keep the
    plan's order. Stages outside the plan are taken as done (as with
    ``--single-item``, upstream is not rechecked).
    """

    def __init__(self, plan: list[Stage]) -> None:
        self.plan = list(plan)
        self.upstream = upstream_stages(self.plan)
        downstream: dict[str, set[str]] = {s.name: set() for s in self.plan}
        for stage in reversed(execution_order(self.plan)):  # consumers first: their tails are known
            for producer in self.upstream[stage.name]:
                downstream[producer] |= {stage.name} | downstream[stage.name]
        self.tail = {name: len(names) for name, names in downstream.items()}
        self.started: set[str] = set()
        self.finished: set[str] = set()

    def ready(self) -> list[Stage]:
        """Stages not started whose upstream stages have all finished, longest tail first."""
        ready = [s for s in self.plan if s.name not in self.started and self.upstream[s.name] <= self.finished]
        return sorted(ready, key=lambda s: -self.tail[s.name])  # stable: ties stay in plan order

    def start(self, stage: Stage) -> None:
        self.started.add(stage.name)

    def finish(self, stage: Stage) -> None:
        self.finished.add(stage.name)

    @property
    def done(self) -> bool:
        """Every stage of the plan has finished."""
        return len(self.finished) == len(self.plan)


def load_stages(project_dir: str | os.PathLike[str] = ".") -> list[Stage]:
    """Read ``<project_dir>/dvc.yaml`` and return its stages in execution order."""
    path = Path(project_dir) / DVC_FILE
    if not path.is_file():
        raise DagError(f"{path}: not found")
    return execution_order(parse_stages(path.read_text(), source=str(path)))
