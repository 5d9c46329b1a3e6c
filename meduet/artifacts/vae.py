"""The VAE file ``models/vae/vae.pt`` (written by ``train-vae``, read by ``encode-latents`` and later stages).

A dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``: ``state_dict``,
the network's shape (``architecture``, ``VAEArchitecture.to_dict()``), the ``vae`` section it
was trained with (``config``) and the cases it was trained and evaluated on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from meduet.config import Paths
from meduet.io.atomic import atomic_save
from meduet.models.architectures import VAEArchitecture
from meduet.models.vae import CheckpointMismatchError, build_vae, load_weights
from meduet.stages import StageError


def vae_path(paths: Paths) -> Path:
    return paths.models / "vae" / "vae.pt"


def save_vae(target: Path, *, state: dict[str, torch.Tensor], architecture: VAEArchitecture, config: dict,
             train_cases: list[str], held_out_cases: list[str]) -> Path:
    """Write the VAE file atomically (``config``: the ``vae`` section as JSON-ready dict)."""
    return atomic_save(target, {"state_dict": state, "architecture": architecture.to_dict(), "config": config,
                          "train_cases": train_cases, "held_out_cases": held_out_cases})


def load_vae(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The frozen VAE (eval mode, CPU) and the file's other entries.

    Raises:
        StageError: the file is missing or is not a readable VAE file (the message names it).
    """
    if not path.is_file():
        raise StageError(f"{path}: VAE weights not found; run the train-vae stage first")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = build_vae(VAEArchitecture.from_dict(saved["architecture"])).eval()
        load_weights(model, path, state=saved["state_dict"])
    except CheckpointMismatchError as error:
        raise StageError(str(error)) from None
    except Exception as error:  # truncated zip, foreign pickle, missing keys: all mean "not our VAE file"
        raise StageError(f"{path}: not a readable VAE checkpoint ({type(error).__name__}: {error})") from None
    return model, {k: v for k, v in saved.items() if k != "state_dict"}


