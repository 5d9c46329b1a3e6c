"""Capture and restore every random number generator a training step draws from.

A resumed run restores the generators saved with its checkpoint, so it draws exactly what
the uninterrupted run would have drawn. Everything is stored as tensors, numbers and
tuples so a checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def capture_rng() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / python RNG states, as checkpointable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any], rank: int = 0) -> None:
    """Restore RNG states from :func:`capture_rng`, or rank ``rank``'s from a checkpoint.

    A checkpoint holds every rank's states under ``"per_rank"``; each rank takes its own.
    Resumed with more workers than were saved, the extra ranks take rank 0's states (the run
    then no longer repeats an uninterrupted one exactly).
    """
    if "per_rank" in state:
        per_rank = state["per_rank"]
        if rank >= len(per_rank):
            log.warning("checkpoint holds RNG states of %d ranks; rank %d takes rank 0's", len(per_rank), rank)
        state = per_rank[rank if rank < len(per_rank) else 0]
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    # Tuples come back as lists from some serialisers; random.setstate wants tuples.
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
