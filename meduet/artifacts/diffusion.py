"""The trained DiT file ``models/diffusion/dit.pt`` (written by ``train-diffusion``, read by synthesis).

A dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``: the trained
weights (``model``) and their EMA (``ema``, what sampling should use), the network's shape
(``architecture``, ``DiTArchitecture.to_dict()``), the ``train_diffusion`` section it was
trained with (``config``: ``objective``, ``flow_time`` ... rebuild the process with
``meduet.diffusion.build_process``), the latent scale factor, the MeDUET file whose teacher
supplied the conditioning factors (``meduet_sha256``; synthesis must take its factors from the
same file), the MeDUET initialisation report, the steps trained and the validation losses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from meduet.config import Paths
from meduet.io.atomic import atomic_save
from meduet.models.architectures import DiTArchitecture
from meduet.models.dit import ConditionedDiT
from meduet.stages import StageError

DIT_KEYS = ("model", "ema", "architecture", "config", "scale_factor", "meduet_sha256")


def dit_path(paths: Paths) -> Path:
    return paths.models / "diffusion" / "dit.pt"


def save_dit(target: Path, *, model: dict[str, torch.Tensor], ema: dict[str, torch.Tensor],
             architecture: DiTArchitecture, config: dict, scale_factor: float, meduet_sha256: str,
             init_report: dict | None, steps: int, validation: dict[str, float | None]) -> Path:
    """Write the DiT file atomically (``config``: the ``train_diffusion`` section, JSON-ready)."""
    return atomic_save(target, {"model": model, "ema": ema, "architecture": architecture.to_dict(), "config": config,
                                "scale_factor": scale_factor, "meduet_sha256": meduet_sha256,
                                "init_report": init_report, "steps": steps, "validation": validation})


def load_dit(path: Path, weights: Literal["ema", "model"] = "ema") -> tuple[ConditionedDiT, dict[str, Any]]:
    """The DiT (eval mode, CPU) and the file's other entries.

    Args:
        path: a ``dit.pt`` written by :func:`save_dit`.
        weights: ``"ema"`` (for sampling) or ``"model"`` (the raw trained weights).

    Raises:
        StageError: the file is missing, is not a DiT file or its weights do not fit its shape.
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if not path.is_file():
        raise StageError(f"{path}: no trained DiT; run the train-diffusion stage first")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in DIT_KEYS if k not in saved]
    if missing:
        raise StageError(f"{path}: not a train-diffusion file, missing {missing}")
    model = ConditionedDiT(DiTArchitecture.from_dict(saved["architecture"]))
    try:
        model.load_state_dict(saved[weights])
    except RuntimeError as error:
        raise StageError(f"{path}: {weights} weights do not fit the saved architecture: {error}") from None
    return model.eval(), {k: v for k, v in saved.items() if k not in ("model", "ema")}
