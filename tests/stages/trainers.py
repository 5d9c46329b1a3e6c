"""The training stages as the tests drive them: inputs, params, outputs, and an uninterrupted run.

One configuration per trainer, shared by every test that needs a finished run of it: the
stage tests (tests/stages/test_vae_stages.py, test_train_diffusion.py) read its outputs, the
kill/resume tests (test_kill_resume.py) and the cluster test (tests/test_ray_cluster.py)
compare a killed and resumed run against it. The uninterrupted run is made once per session
(the ``uninterrupted_run`` fixture, tests/conftest.py) by the stage's CLI code in the test
process, on its local Ray: ``meduet <stage> --params params.yaml`` without a new interpreter
and a new Ray, which is all that would differ.
"""

from __future__ import annotations

import contextlib
import csv
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from meduet.artifacts.vae import save_vae
from meduet.config import MeduetConfig, Paths
from meduet.data.latents import read_scale
from meduet.models.architectures import VAE_PRESETS
from meduet.models.vae import build_vae
from meduet.stages import encode_latents, harmonize
from tests.harmonize.synth import phantom, write_msd
from tests.stages.test_factors import _save_tiny_model
from tests.stages.test_pretrain import _write_cache

HARMONIZE = {"target_spacing": [2.0, 2.0, 2.0], "min_size": [16, 16, 16], "divisible_by": 16, "workers": 1}


def _harmonized(root: Path) -> None:
    """Two sites of two small phantoms each, harmonized to 2 mm (the VAE's training set)."""
    datasets = []
    for site, seed in (("site_a", 0), ("site_b", 10)):
        write_msd(root / "raw" / site, {f"{site}_{i}": phantom(seed=seed + i) for i in range(2)})
        datasets.append({"name": site, "root": f"raw/{site}", "domain": site})
    cfg = MeduetConfig.model_validate({"harmonize": {**HARMONIZE, "datasets": datasets}})
    harmonize.run(cfg.harmonize, Paths.resolve(cfg, root))


def _latents_and_meduet(root: Path) -> None:
    """The synthetic latent cache (4 train and 2 held-out (4, 12, 12, 12) latents) and a tiny saved
    MeDUET (the DiT's conditioning teacher)."""
    paths = Paths.resolve(MeduetConfig(), root)
    _write_cache(paths.latents, per_domain=3)
    _save_tiny_model(paths, ["site_a", "site_b"], read_scale(paths.latents))


FINETUNE_SITES = ("site_a", "site_b")
FINETUNE_PARAMS = {"harmonize": {**HARMONIZE, "datasets": [{"name": s, "root": f"raw/{s}", "domain": s}
                                                           for s in FINETUNE_SITES]},
                   "encode_latents": {"workers": 1}}


def _segmentation_inputs(root: Path) -> None:
    """Per site 3 labelled phantoms harmonized to 2 mm (32^3), a random tiny VAE holding out the last of
    each site, its latents, and a tiny saved MeDUET."""
    for index, site in enumerate(FINETUNE_SITES):
        write_msd(root / "raw" / site, {f"{site}_{i}": phantom(seed=10 * index + i) for i in range(3)})
    cfg = MeduetConfig.model_validate(FINETUNE_PARAMS)
    paths = Paths.resolve(cfg, root)
    harmonize.run(cfg.harmonize, paths)
    torch.manual_seed(0)
    save_vae(paths.models / "vae" / "vae.pt", state=build_vae(VAE_PRESETS["tiny"]).state_dict(),
             architecture=VAE_PRESETS["tiny"], config={}, train_cases=[],
             held_out_cases=[f"{site}__{site}_2" for site in FINETUNE_SITES])
    encode_latents.run(cfg.encode_latents, paths, ray=cfg.ray)
    _save_tiny_model(paths, list(FINETUNE_SITES), read_scale(paths.latents))


@dataclass(frozen=True)
class Trainer:
    """One training stage as the tests drive it."""

    cli: str
    stage: str  # its folder name under reports/ and its Ray run-name prefix
    section: str  # its params.yaml section
    settings: dict[str, Any]  # that section (steps included)
    every: int  # ray.checkpoint_every: STEPS // every checkpoints, all kept
    prepare: Callable[[Path], None]  # writes the stage's inputs under a project root
    model_file: str
    weights: tuple[str, ...]  # entries of the model file holding state dicts
    term: str  # the backpropagated loss column of history.csv
    extra: dict[str, Any] = field(default_factory=dict)  # other params sections the stage reads

    @property
    def steps(self) -> int:
        return self.settings["steps"]

    @property
    def params(self) -> dict[str, Any]:
        """params.yaml of a run on this machine's local Ray."""
        return {**self.extra, self.section: dict(self.settings),
                "ray": {"checkpoint_every": self.every, "keep_checkpoints": self.steps // self.every,
                        "local_num_cpus": 2, "max_failures": 0}}

    def write_project(self, root: Path) -> Path:
        """The stage's inputs and params.yaml under ``root``; returns the params file."""
        self.prepare(root)
        params = root / "params.yaml"
        params.write_text(yaml.safe_dump(self.params))
        return params


TRAINERS = {
    # The default recipe ("improved"): its extra state (the clean-content adversary) must resume too.
    "pretrain": Trainer(
        cli="pretrain", stage="pretrain", section="pretrain", every=10,
        settings={"steps": 60, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "log_every": 1,
                  "mftd_start_fraction": 0.0},
        prepare=lambda root: _write_cache(Paths.resolve(MeduetConfig(), root).latents, per_domain=3),
        model_file="models/pretrain/meduet.pt", weights=("student", "teacher"), term="total"),
    "train-vae": Trainer(
        cli="train-vae", stage="train_vae", section="vae", every=5,
        settings={"steps": 20, "crop_size": [16, 16, 16], "warmup_steps": 2, "log_every": 1,
                  "holdout_fraction": 0.5},
        prepare=_harmonized, model_file="models/vae/vae.pt", weights=("state_dict",), term="loss"),
    "train-diffusion": Trainer(
        cli="train-diffusion", stage="train_diffusion", section="train_diffusion", every=10,
        settings={"steps": 30, "batch_size": 4, "lr": 2e-3, "warmup_steps": 2, "log_every": 1,
                  "init": "meduet_repa", "ema_decay": 0.9, "val_crops": 8, "val_every": 10},
        prepare=_latents_and_meduet, model_file="models/diffusion/dit.pt", weights=("model", "ema"), term="total"),
    # The refining decoder (the default): the image-resolution path must resume too.
    "finetune": Trainer(
        cli="finetune", stage="finetune", section="finetune", every=10,
        settings={"steps": 20, "batch_size": 2, "lr": 3e-3, "warmup_steps": 2, "log_every": 1,
                  "label_names": ["background", "body", "liver"], "features": 8, "image_features": 4},
        prepare=_segmentation_inputs, model_file="models/finetune/segmenter.pt", weights=("model",), term="total",
        extra=FINETUNE_PARAMS),
}


def run_in_process(trainer: Trainer, root: Path) -> Path:
    """An uninterrupted run of ``trainer`` in a new project ``root``: ``meduet <stage>``'s code, here."""
    from meduet.cli import run_stage

    params = trainer.write_project(root)
    assert run_stage(trainer.cli, str(params), []) == 0
    return root


def checkpoints(root: Path, stage: str) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (root / ".work" / "ray_results").glob(f"{stage}-*/checkpoint_*/state.pt")}


def history(root: Path, stage: str) -> list[dict[str, float]]:
    with open(root / "reports" / stage / "history.csv", newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(fh)]


def kill_session(session: int) -> None:
    """SIGKILL every live process of ``session`` (Ray's processes may sit in other process groups)."""
    for _ in range(100):
        listing = subprocess.run(["ps", "-o", "pid=,stat=", "-s", str(session)], capture_output=True, text=True)
        alive = [int(pid) for pid, stat in (line.split() for line in listing.stdout.splitlines()) if "Z" not in stat]
        if not alive:
            return
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    raise AssertionError(f"processes of session {session} survive SIGKILL: {alive}")
