"""The fine-tuned segmenter file ``models/finetune/segmenter.pt`` (written by ``finetune``, read by ``meduet predict``).

A dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``, everything
``predict`` needs to segment a raw scan on its own: the segmenter's weights and shapes
(``architecture``: the head, ``backbone``: the MeDUET encoder), the ``finetune`` section
(``config``), the ``harmonize`` section the training data was harmonized with, the class
names, the latent scale factor, the frozen VAE (weights and shape) the latents came from,
the hashes of the VAE and MeDUET files, the cases trained on and the steps trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from meduet.config import Paths
from meduet.io.atomic import atomic_save
from meduet.models.architectures import MeduetArchitecture, SegmenterArchitecture, VAEArchitecture
from meduet.models.segmenter import LatentSegmenter
from meduet.models.vae import CheckpointMismatchError, build_vae, load_weights
from meduet.stages import StageError

FILE_NAME = "segmenter.pt"
SEGMENTER_KEYS = ("model", "architecture", "backbone", "config", "harmonize", "labels", "scale_factor", "vae")


def segmenter_path(paths: Paths) -> Path:
    return paths.models / "finetune" / FILE_NAME


def save_segmenter(target: Path, *, model: dict[str, torch.Tensor], architecture: SegmenterArchitecture,
                   backbone: MeduetArchitecture, config: dict, harmonize: dict, labels: list[str], scale_factor: float,
                   vae_state: dict[str, torch.Tensor], vae_architecture: VAEArchitecture, vae_sha256: str,
                   meduet_sha256: str | None, labelled_cases: list[str], steps: int) -> Path:
    """Write the segmenter file atomically (``config``, ``harmonize``: sections as JSON-ready dicts)."""
    return atomic_save(target, {
        "model": model, "architecture": architecture.to_dict(), "backbone": backbone.to_dict(), "config": config,
        "harmonize": harmonize, "labels": labels, "scale_factor": scale_factor,
        "vae": {"state_dict": vae_state, "architecture": vae_architecture.to_dict(), "sha256": vae_sha256},
        "meduet_sha256": meduet_sha256, "labelled_cases": labelled_cases, "steps": steps})


def load_segmenter(path: Path) -> tuple[LatentSegmenter, torch.nn.Module, dict[str, Any]]:
    """The segmenter and its VAE (both eval mode, CPU) and the file's other entries.

    Args:
        path: a segmenter file, or a ``finetune`` run folder holding one (``models/finetune``).

    Raises:
        StageError: the file is missing or is not a readable segmenter file (the message names it).
    """
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise StageError(f"{path}: no segmenter; run the finetune stage first")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, foreign pickle: all mean "not our file"
        raise StageError(f"{path}: not a readable segmenter file ({type(error).__name__}: {error})") from None
    missing = [k for k in SEGMENTER_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise StageError(f"{path}: not a segmenter file, missing {missing}")
    model = LatentSegmenter(MeduetArchitecture.from_dict(saved["backbone"]),
                            SegmenterArchitecture.from_dict(saved["architecture"]))
    vae = build_vae(VAEArchitecture.from_dict(saved["vae"]["architecture"]))
    try:
        model.load_state_dict(saved["model"])
        load_weights(vae, path, state=saved["vae"]["state_dict"])
    except (RuntimeError, CheckpointMismatchError) as error:
        raise StageError(f"{path}: weights do not fit the saved shapes: {error}") from None
    return model.eval(), vae.eval(), {k: v for k, v in saved.items() if k not in ("model", "vae")}
