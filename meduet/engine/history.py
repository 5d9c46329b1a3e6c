"""Training histories: metric rows, interval means, and the CSV they are written as."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch

from meduet.io.atomic import write_text


class IntervalMeans:
    """Running sums of loss terms since the last reported row, so each row is an interval mean.

    A single step's loss is noisy; the mean over the steps since the previous row is what a
    loss curve should show. Sums stay on the training device (no host sync per step).
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = {}
        self._steps = 0

    def add(self, terms: dict[str, torch.Tensor | float]) -> None:
        for name, value in terms.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
            self._sums[name] = self._sums.get(name, 0.0) + value
        self._steps += 1

    def pop(self) -> dict[str, float]:
        """Means since the last ``pop`` (as Python floats), and start a new interval."""
        means = {name: float(total / max(self._steps, 1)) for name, total in self._sums.items()}
        self._sums, self._steps = {}, 0
        return means


def write_history_csv(path: Path, history: list[dict[str, Any]]) -> Path:
    """Write metric rows atomically as CSV; columns in order of first appearance."""
    columns: dict[str, None] = {}
    for row in history:
        columns.update(dict.fromkeys(row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return write_text(path, buffer.getvalue())
