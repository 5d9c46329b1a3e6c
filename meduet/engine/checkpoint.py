"""The training checkpoint file: one ``state.pt`` per ``checkpoint_<step>`` folder.

``state.pt`` is a dict ``{"format", "stage", "config_hash", "state", "history"}`` saved with
``torch.save`` and loaded with ``torch.load(weights_only=True)``: ``state`` is what the
training loop checkpointed (plain tensors, numbers, strings, lists and dicts only),
``history`` the metric rows reported so far, so a resumed run's history equals the
uninterrupted run's. Where the folders live and when they are written is
``meduet.distributed``'s business; this module only knows the file.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

from meduet.io.filesystems import arrow_filesystem, read_bytes

STATE_FILE = "state.pt"
CHECKPOINT_FORMAT = 1
_PREFIX = "checkpoint_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


class ConfigMismatchError(CheckpointError):
    """A checkpoint or run folder written by another configuration (config hash)."""


def checkpoint_dir_name(step: int) -> str:
    """Folder name of the checkpoint after ``step`` steps (sorts by step)."""
    return f"{_PREFIX}{step:09d}"


def checkpoint_step(path: str) -> int:
    """Step of a ``.../checkpoint_<step>`` folder (-1 for other names)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    digits = name.removeprefix(_PREFIX)
    return int(digits) if name.startswith(_PREFIX) and digits.isdigit() else -1


def make_envelope(*, stage: str, config_hash: str, state: dict[str, Any],
                  history: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``state.pt`` holds for a checkpoint of ``stage`` (see the module docstring)."""
    return {"format": CHECKPOINT_FORMAT, "stage": stage, "config_hash": config_hash, "state": state,
            "history": list(history)}


def load_envelope(data: bytes, name: str, config_hash: str | None) -> dict[str, Any]:
    """Parse a ``state.pt`` payload, with errors that name the file ``name``.

    Raises:
        CheckpointError: the bytes are not a readable meduet checkpoint.
        ConfigMismatchError: ``config_hash`` is given and the checkpoint has another.
    """
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" in str(error).lower():
            raise CheckpointError(
                f"{name}: holds objects that torch.load(weights_only=True) refuses; checkpoint state must be "
                f"tensors, numbers, strings, lists and dicts ({error})"
            ) from None
        raise CheckpointError(f"{name}: corrupted or truncated checkpoint ({error})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"{name}: corrupted or truncated checkpoint ({type(error).__name__}: {error}); "
            "delete this checkpoint folder (or the run folder) to continue"
        ) from None
    if not isinstance(loaded, dict) or loaded.get("format") != CHECKPOINT_FORMAT or "state" not in loaded:
        raise CheckpointError(f"{name}: not a meduet checkpoint (format {CHECKPOINT_FORMAT} expected)")
    if config_hash is not None and loaded.get("config_hash") != config_hash:
        raise ConfigMismatchError(
            f"{name}: written with config hash {loaded.get('config_hash')}, this run has {config_hash}; "
            "refusing to load another configuration's checkpoint"
        )
    return loaded


def read_checkpoint(
    checkpoint: str, s3_options: Mapping[str, Any] | None = None, config_hash: str | None = None
) -> dict[str, Any]:
    """The ``state`` dict saved in a checkpoint folder (e.g. ``FitResult.checkpoint``).

    Args:
        checkpoint: checkpoint folder, local path or ``s3://`` URI.
        s3_options: ``s3fs.S3FileSystem`` keyword arguments for ``s3://``.
        config_hash: if given, refuse a checkpoint written with another config hash.

    Returns:
        What the training loop checkpointed, tensors on CPU.
    """
    fs, path = arrow_filesystem(checkpoint, s3_options or {})
    name = f"{checkpoint.rstrip('/')}/{STATE_FILE}"
    try:
        data = read_bytes(fs, f"{path}/{STATE_FILE}")
    except (FileNotFoundError, OSError) as error:
        raise CheckpointError(f"{name}: cannot be read ({error})") from None
    return load_envelope(data, name, config_hash)["state"]
