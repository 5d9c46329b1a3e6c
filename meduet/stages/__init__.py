"""Pipeline stages. Each is one function ``run(cfg, paths) -> StageResult``.

``STAGES`` maps a CLI/DVC stage name to the module holding its ``run`` and the params
section it takes. Modules are imported lazily so ``meduet --help`` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class StageError(RuntimeError):
    """A stage failed as a whole; the message says why and where to look."""


@dataclass
class StageResult:
    """What a stage produced: its output paths and headline metrics."""

    stage: str
    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    ok: bool = True


@dataclass(frozen=True)
class StageSpec:
    module: str
    section: str
    help: str

    def load(self) -> Callable[..., StageResult]:
        return importlib.import_module(self.module).run


STAGES: dict[str, StageSpec] = {
    "demo-data": StageSpec("meduet.stages.demo_data", "demo_data", "generate multi-site CT-like phantoms"),
    "harmonize": StageSpec("meduet.stages.harmonize", "harmonize", "reorient, resample, window, crop, QA"),
}
