"""Every training stage, killed with SIGKILL through its CLI, resumes at its last checkpoint.

The whole process group (driver, local Ray, workers) is killed once a checkpoint exists, so
nothing gets to clean up, as when a node dies. The rerun must continue from that checkpoint
(no checkpoint up to the kill is rewritten, no step lost or repeated) and end with the
history and weights of an uninterrupted run of the same configuration. All trainers run
on the shared loop (``meduet.engine.loop``), so this is the loop's resume tested per trainer.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from meduet.config import MeduetConfig, Paths
from meduet.stages import harmonize
from tests.harmonize.synth import phantom, write_msd
from tests.stages.test_factors import _save_tiny_model
from tests.stages.test_pretrain import _write_cache

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 40, 10  # 4 checkpoints, all kept


def _harmonized(root: Path) -> None:
    """Two sites of two small phantoms each, harmonized to 2 mm (the VAE's training set)."""
    datasets = []
    for site, seed in (("site_a", 0), ("site_b", 10)):
        write_msd(root / "raw" / site, {f"{site}_{i}": phantom(seed=seed + i) for i in range(2)})
        datasets.append({"name": site, "root": f"raw/{site}", "domain": site})
    cfg = MeduetConfig.model_validate({"harmonize": {"datasets": datasets, "target_spacing": [2.0, 2.0, 2.0],
                                                     "min_size": [16, 16, 16], "divisible_by": 16, "workers": 1}})
    harmonize.run(cfg.harmonize, Paths.resolve(cfg, root))


def _latents_and_meduet(root: Path) -> None:
    """The synthetic latent cache and a tiny saved MeDUET (the DiT's conditioning teacher)."""
    paths = Paths.resolve(MeduetConfig(), root)
    _write_cache(paths.latents, per_domain=3)
    _save_tiny_model(paths, ["site_a", "site_b"], 1.0)


@dataclass(frozen=True)
class Trainer:
    """One training stage as the test drives it."""

    cli: str
    stage: str  # its folder name under reports/ and its Ray run-name prefix
    params: dict
    prepare: Callable[[Path], None]  # writes the stage's inputs under a project root
    model_file: str
    weights: tuple[str, ...]  # entries of the model file holding state dicts
    term: str  # the backpropagated loss column of history.csv


TRAINERS = {
    "pretrain": Trainer(
        cli="pretrain", stage="pretrain",
        params={"pretrain": {"steps": STEPS, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "log_every": 1,
                             "mftd_start_fraction": 0.0}},
        prepare=lambda root: _write_cache(Paths.resolve(MeduetConfig(), root).latents, per_domain=3),
        model_file="models/pretrain/meduet.pt", weights=("student", "teacher"), term="total"),
    "train-vae": Trainer(
        cli="train-vae", stage="train_vae",
        params={"vae": {"steps": STEPS, "crop_size": [16, 16, 16], "warmup_steps": 2, "log_every": 1,
                        "holdout_fraction": 0.5}},
        prepare=_harmonized, model_file="models/vae/vae.pt", weights=("state_dict",), term="loss"),
    "train-diffusion": Trainer(
        cli="train-diffusion", stage="train_diffusion",
        params={"train_diffusion": {"steps": STEPS, "batch_size": 4, "lr": 2e-3, "warmup_steps": 2, "log_every": 1,
                                    "init": "meduet_repa", "ema_decay": 0.9, "val_crops": 4}},
        prepare=_latents_and_meduet, model_file="models/diffusion/dit.pt", weights=("model", "ema"), term="total"),
}


def _checkpoints(root: Path, stage: str) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (root / ".work" / "ray_results").glob(f"{stage}-*/checkpoint_*/state.pt")}


def _history(root: Path, stage: str) -> list[dict[str, float]]:
    with open(root / "reports" / stage / "history.csv", newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(fh)]


def _kill_session(session: int) -> None:
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


@pytest.mark.services
@pytest.mark.parametrize("name", list(TRAINERS))
def test_killed_training_stage_resumes_at_its_last_checkpoint_and_ends_like_an_uninterrupted_run(
    name: str, tmp_path: Path
) -> None:
    trainer = TRAINERS[name]
    params = {**trainer.params, "ray": {"checkpoint_every": EVERY, "keep_checkpoints": 5, "local_num_cpus": 2,
                                        "max_failures": 0}}
    inputs = tmp_path / "inputs"
    trainer.prepare(inputs)
    roots = {}
    for run in ("reference", "killed"):
        roots[run] = Path(shutil.copytree(inputs, tmp_path / run))
        (roots[run] / "params.yaml").write_text(yaml.safe_dump(params))

    def command(root: Path) -> list[str]:
        return [sys.executable, "-m", "meduet.cli", trainer.cli, "--params", str(root / "params.yaml")]

    reference = subprocess.run(command(roots["reference"]), cwd=REPO, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-3000:]

    root = roots["killed"]
    process = subprocess.Popen(command(root), cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        while not _checkpoints(root, trainer.stage) and process.poll() is None:
            time.sleep(0.02)
    finally:
        _kill_session(process.pid)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    before = _checkpoints(root, trainer.stage)
    kept = {int(p.parent.name.split("_")[1]) for p in before}
    assert kept and max(kept) < STEPS
    assert not (root / trainer.model_file).exists()

    resumed = subprocess.run(command(root), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _history(root, trainer.stage)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))  # no step lost, none repeated
    after = _checkpoints(root, trainer.stage)
    assert all(after[p] == mtime for p, mtime in before.items())  # resumed: checkpoints up to the kill not redone
    assert len(after) == STEPS // EVERY
    for got, want in zip(rows, _history(roots["reference"], trainer.stage), strict=True):
        assert got[trainer.term] == pytest.approx(want[trainer.term], rel=1e-4), got["step"]
    got = torch.load(root / trainer.model_file, weights_only=True)
    want = torch.load(roots["reference"] / trainer.model_file, weights_only=True)
    for which in trainer.weights:
        assert got[which].keys() == want[which].keys()
        for key, value in want[which].items():
            torch.testing.assert_close(got[which][key], value, rtol=1e-4, atol=1e-5, msg=f"{which}.{key}")
