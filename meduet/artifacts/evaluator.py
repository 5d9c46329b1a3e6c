"""The synthesis evaluator file ``models/evaluator/evaluator.pt`` (written by ``train-evaluator``,
read by ``evaluate-synthesis``).

A dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``: ``state_dict``,
the network's shape (``architecture``, ``EvaluatorArchitecture.to_dict()``), the
``train_evaluator`` section (``config``), the site names in head order (``sites``), the
harmonized label values in head order (``label_ids``; head class ``i`` is label value
``label_ids[i]``) and the cases it was trained and evaluated on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from meduet.config import Paths
from meduet.io.atomic import atomic_save
from meduet.models.architectures import EvaluatorArchitecture
from meduet.models.evaluator import EvaluatorNet
from meduet.stages import StageError

EVALUATOR_KEYS = ("state_dict", "architecture", "config", "sites", "label_ids")


def evaluator_path(paths: Paths) -> Path:
    return paths.models / "evaluator" / "evaluator.pt"


def save_evaluator(target: Path, *, state: dict[str, torch.Tensor], architecture: EvaluatorArchitecture,
                   config: dict, sites: list[str], label_ids: list[int], train_cases: list[str],
                   held_out_cases: list[str]) -> Path:
    """Write the evaluator file atomically (``config``: the ``train_evaluator`` section, JSON-ready)."""
    return atomic_save(target, {"state_dict": state, "architecture": architecture.to_dict(), "config": config,
                                "sites": sites, "label_ids": label_ids, "train_cases": train_cases,
                                "held_out_cases": held_out_cases})


def load_evaluator(path: Path) -> tuple[EvaluatorNet, dict[str, Any]]:
    """The frozen evaluator (eval mode, CPU) and the file's other entries.

    Raises:
        StageError: the file is missing, is not an evaluator file or its weights do not fit its shape.
    """
    if not path.is_file():
        raise StageError(f"{path}: no synthesis evaluator; run the train-evaluator stage first")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, foreign pickle: not our file
        raise StageError(f"{path}: not a readable evaluator file ({type(error).__name__}: {error})") from None
    missing = [k for k in EVALUATOR_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise StageError(f"{path}: not a train-evaluator file, missing {missing}")
    model = EvaluatorNet(EvaluatorArchitecture.from_dict(saved["architecture"]))
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as error:
        raise StageError(f"{path}: weights do not fit the saved architecture: {error}") from None
    return model.eval(), {k: v for k, v in saved.items() if k != "state_dict"}
