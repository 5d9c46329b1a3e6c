"""Pipeline stages. Each is one function ``run(cfg, paths) -> StageResult``.

``STAGES`` maps a CLI/DVC stage name to the module holding its ``run`` and the params
section it takes. Modules are imported lazily so ``meduet --help`` stays fast.

``StageTiming`` is the wall time of one stage run, which the CLI (every door to a stage goes
through it: DVC's ``cmd`` is the CLI line) writes to ``reports/<stage>/timing.json`` for the
results report.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from meduet.io.atomic import write_json

TIMING_FILE = "timing.json"


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
class StageTiming:
    """How long the last run of a stage took, and when it ended (UTC, ISO 8601)."""

    stage: str
    seconds: float
    finished: str
    ok: bool

    def write(self, reports: Path) -> Path:
        """Write ``reports/<stage>/timing.json`` atomically."""
        return write_json(reports / self.stage / TIMING_FILE, asdict(self))

    @classmethod
    def read(cls, reports: Path, stage: str) -> StageTiming | None:
        """The timing of ``stage`` under ``reports``, or None when it never ran through the CLI."""
        path = reports / stage / TIMING_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(stage=stage, seconds=float(data["seconds"]), finished=str(data["finished"]), ok=bool(data["ok"]))


def report_dir_name(cli_name: str) -> str:
    """The stage's name in ``dvc.yaml`` and its folder under ``reports``: ``train-vae`` -> ``train_vae``."""
    return cli_name.replace("-", "_")


@dataclass(frozen=True)
class StageSpec:
    """Where a stage's ``run`` lives and which params sections it takes.

    ``run`` receives its own section positionally and each of ``extra`` (e.g. the ``ray``
    section for training stages) as a keyword argument of the same name.
    """

    module: str
    section: str
    help: str
    extra: tuple[str, ...] = ()

    def load(self) -> Callable[..., StageResult]:
        return importlib.import_module(self.module).run


STAGES: dict[str, StageSpec] = {
    "demo-data": StageSpec("meduet.stages.demo_data", "demo_data", "generate multi-site CT-like phantoms"),
    "harmonize": StageSpec("meduet.stages.harmonize", "harmonize", "reorient, resample, window, crop, QA",
                           extra=("ray",)),
    "train-vae": StageSpec("meduet.stages.train_vae", "vae", "train (or load) the 3-D KL-VAE on Ray Train",
                           extra=("ray",)),
    "encode-latents": StageSpec("meduet.stages.encode_latents", "encode_latents",
                                "encode harmonized volumes into the latent cache on Ray", extra=("ray",)),
    "pretrain": StageSpec("meduet.stages.pretrain", "pretrain",
                          "MeDUET disentangled self-supervised pretraining on the latent cache (Ray Train)",
                          extra=("ray",)),
    "pretrain-mae": StageSpec("meduet.stages.pretrain", "pretrain_mae",
                              "the masked-autoencoder baseline of the same network (Ray Train): the pretrain section "
                              "with mixing, site heads, MFTD and SiQC off", extra=("ray",)),
    "extract-factors": StageSpec("meduet.stages.extract_factors", "extract_factors",
                                 "whole-volume content and style vectors from the pretrained model (Ray tasks)",
                                 extra=("ray",)),
    "evaluate-disentanglement": StageSpec("meduet.stages.evaluate_disentanglement", "evaluate_disentanglement",
                                          "linear site probes on content and style, and a swap test"),
    "finetune": StageSpec("meduet.stages.finetune", "finetune",
                          "organ segmentation on the MeDUET encoder over latents, scored on held-out sites (Ray Train)",
                          extra=("ray", "harmonize")),
    "finetune-sweep": StageSpec("meduet.stages.finetune_sweep", "finetune_sweep",
                                "label efficiency and leave-one-site-out fine-tuning per init (scratch, mae, meduet) "
                                "and seed (Ray Train)", extra=("ray", "finetune", "harmonize")),
    "train-diffusion": StageSpec("meduet.stages.train_diffusion", "train_diffusion",
                                 "latent DiT conditioned on MeDUET content and style (Ray Train)", extra=("ray",)),
    "synthesize": StageSpec("meduet.stages.synthesize", "synthesize",
                            "translate held-out scans into other sites' styles and generate crops (Ray tasks)",
                            extra=("ray",)),
    "train-evaluator": StageSpec("meduet.stages.train_evaluator", "train_evaluator",
                                 "the synthesis evaluator: site and organ heads on real harmonized images (Ray Train)",
                                 extra=("ray",)),
    "evaluate-synthesis": StageSpec("meduet.stages.evaluate_synthesis", "evaluate_synthesis",
                                    "synthesized images against real ones through the frozen evaluator"),
}
