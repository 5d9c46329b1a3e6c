"""The pretrained MeDUET file ``models/pretrain/meduet.pt`` (written by ``pretrain``, read by the stages after it).

``pretrain-mae`` writes the same format to ``models/pretrain_mae/meduet.pt`` (``config.objective: mae``).

A dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``: student and
EMA-teacher weights, the network's shape (``architecture``, ``MeduetArchitecture.to_dict()``),
the ``pretrain`` section (``config``), the site names by ``domain_index``, the latent scale
factor, the training latents and the steps trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from meduet.config import Paths
from meduet.io.atomic import atomic_save
from meduet.models.architectures import MeduetArchitecture
from meduet.models.meduet import MeduetModel
from meduet.stages import StageError

MEDUET_KEYS = ("student", "teacher", "architecture", "domains", "scale_factor")


def meduet_path(paths: Paths, stage: Literal["pretrain", "pretrain_mae"] = "pretrain") -> Path:
    """The file of ``pretrain`` (MeDUET) or of ``pretrain_mae`` (its masked-autoencoder baseline)."""
    return paths.models / stage / "meduet.pt"


def save_meduet(target: Path, *, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                architecture: MeduetArchitecture, config: dict, domains: list[str], scale_factor: float,
                train_latents: list[str], steps: int) -> Path:
    """Write the pretrained MeDUET file atomically (``domains``: site names by ``domain_index``)."""
    return atomic_save(target, {"student": student, "teacher": teacher, "architecture": architecture.to_dict(),
                          "config": config, "domains": domains, "scale_factor": scale_factor,
                          "train_latents": train_latents, "steps": steps})


def load_meduet(path: Path, weights: Literal["teacher", "student"] = "teacher") -> tuple[MeduetModel, dict[str, Any]]:
    """The pretrained network (eval mode) and the file's other entries.

    Args:
        path: a ``meduet.pt`` written by :func:`save_meduet`.
        weights: ``"teacher"`` (EMA) or ``"student"``.
    """
    if weights not in ("teacher", "student"):
        raise ValueError(f"weights must be 'teacher' or 'student', got {weights!r}")
    if not path.is_file():
        raise StageError(f"{path}: no pretrained model; run the pretrain stage first")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in MEDUET_KEYS if k not in saved]
    if missing:
        raise StageError(f"{path}: not a pretrain checkpoint, missing {missing}")
    model = MeduetModel(MeduetArchitecture.from_dict(saved["architecture"]))
    try:
        model.load_state_dict(saved[weights])
    except RuntimeError as error:
        raise StageError(f"{path}: {weights} weights do not fit the saved architecture: {error}") from None
    return model.eval(), {k: v for k, v in saved.items() if k not in ("student", "teacher")}
