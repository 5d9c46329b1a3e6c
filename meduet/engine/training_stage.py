"""The stage side of every training stage: params → run on Ray Train → final state → reports.

A training stage (``meduet/stages/train_vae.py``, ``pretrain.py``) reads its inputs, calls
:func:`fit_trainer` with its trainer's ``build_trainer`` (``meduet/engine/*_training.py``),
saves the final state through ``meduet.artifacts`` and ends with :func:`finish_training_stage`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from meduet import distributed as dist
from meduet.config import Paths, RayConfig, config_hash
from meduet.engine.loop import Trainer, train
from meduet.engine.plots import plot_history
from meduet.engine.runs import RunSpec, Scaling, run_key
from meduet.io.atomic import write_json, write_text
from meduet.io.locks import output_lock
from meduet.stages import StageResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainedRun:
    """A finished training run.

    Attributes:
        state: the final checkpoint's parts (``Trainer.checkpointed`` state dicts, ``step``).
        history: every reported row (interval means), resumed parts included.
        history_csv: where the history was written (``<reports>/<stage>/history.csv``).
    """

    state: dict[str, Any]
    history: list[dict[str, Any]]
    history_csv: Path | None


def fit_trainer(*, stage: str, cfg: BaseModel, build: Callable[..., Trainer], inputs: dict[str, Any],
                input_manifest: Path, paths: Paths, ray: RayConfig, progress_name: str | None = None) -> TrainedRun:
    """Train with ``build(cfg=cfg, **inputs)`` on Ray Train, resuming the run of the same key.

    The run key covers the section ``cfg``, the input listing ``input_manifest``, the
    workers and devices (``ray.num_workers``, ``ray.use_gpu``) and the code: anything else
    is another run, never a resume of (or a return of) an old run's weights.

    Args:
        progress_name: what progress lines call the run (default ``stage``); a stage of several
            runs names each one's part, ``finetune_sweep[2/3]`` (``flows.pipeline.progress_percent``).
    """
    scaling = Scaling.from_config(ray)
    spec = RunSpec.from_config(ray, paths, stage, run_key(config_hash(cfg), input_manifest, scaling))
    with output_lock(paths.work / "locks", spec.run_dir):  # one driver per run folder
        result = dist.fit(train, {"build": build, "cfg": cfg, "stage": progress_name or stage, **inputs}, scaling, spec)
    return TrainedRun(state=result.load_state(), history=result.history, history_csv=result.metrics_csv)


def finish_training_stage(stage: str, *, paths: Paths, outputs: dict[str, Path], metrics: dict[str, Any],
                          run: TrainedRun | None, terms: Sequence[str], title: str) -> StageResult:
    """Write ``metrics.json`` and the loss curve under ``<reports>/<stage>/``; the stage's result.

    Args:
        outputs: what the stage saved itself (weights, figures).
        run: the training run, or None when nothing was trained (e.g. given weights).
        terms: history columns drawn in the loss curve.
    """
    reports = paths.reports / stage
    history = run.history if run is not None else []
    outputs = {**outputs, "metrics": write_json(reports / "metrics.json", metrics),
               "loss_curve": plot_history(history, list(terms), reports / "loss.png", title)}
    if run is not None and run.history_csv is not None:
        outputs["history"] = run.history_csv
    elif run is None:  # nothing trained: an empty history (a declared DVC output all the same)
        outputs["history"] = write_text(reports / "history.csv", ",".join(["step", *terms]) + "\n")
    log.info("%s: %s", stage, {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))})
    return StageResult(stage, outputs, metrics)
