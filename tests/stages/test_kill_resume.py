"""Every training stage, killed with SIGKILL through its CLI, resumes at its last checkpoint.

The whole process group (driver, local Ray, workers) is killed once a checkpoint exists, so
nothing gets to clean up, as when a node dies. The rerun must continue from that checkpoint
(no checkpoint up to the kill is rewritten, no step lost or repeated) and end with the
history and weights of an uninterrupted run of the same configuration. All trainers run
on the shared loop (``meduet.engine.loop``), so this is the loop's resume tested per trainer.
The uninterrupted run is the session's one of the same trainer (tests/stages/trainers.py).
"""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.stages.trainers import TRAINERS, checkpoints, history, kill_session

REPO = Path(__file__).resolve().parents[2]


def complete(found: dict[Path, int]) -> dict[Path, int]:
    """The checkpoints of ``found`` whose ``state.pt`` loads (Ray copies the file into the run's folder
    non-atomically, so it can be seen, and killed, half written)."""
    whole = {}
    for path, mtime in found.items():
        try:
            torch.load(path, weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError):  # truncated or still being copied
            continue
        whole[path] = mtime
    return whole


@pytest.mark.services
@pytest.mark.parametrize("name", list(TRAINERS))
def test_killed_training_stage_resumes_at_its_last_checkpoint_and_ends_like_an_uninterrupted_run(
    name: str, uninterrupted_run: Callable[[str], Path], tmp_path: Path
) -> None:
    trainer = TRAINERS[name]
    reference = uninterrupted_run(name)  # the same params and inputs, run start to end (tests/stages/trainers.py)
    root = tmp_path / "killed"
    params = trainer.write_project(root)
    command = [sys.executable, "-m", "meduet.cli", trainer.cli, "--params", str(params)]

    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        while not complete(checkpoints(root, trainer.stage)) and process.poll() is None:
            time.sleep(0.02)
    finally:
        kill_session(process.pid)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    # A later checkpoint the kill cut short mid-upload is torn: the rerun skips it and writes it again.
    before = complete(checkpoints(root, trainer.stage))
    kept = {int(p.parent.name.split("_")[1]) for p in before}
    assert kept and max(kept) < trainer.steps
    assert not (root / trainer.model_file).exists()

    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = history(root, trainer.stage)
    assert [int(r["step"]) for r in rows] == list(range(1, trainer.steps + 1))  # no step lost, none repeated
    after = checkpoints(root, trainer.stage)
    assert all(after[p] == mtime for p, mtime in before.items())  # resumed: checkpoints up to the kill not redone
    assert len(after) == trainer.steps // trainer.every
    for got, want in zip(rows, history(reference, trainer.stage), strict=True):
        assert got[trainer.term] == pytest.approx(want[trainer.term], rel=1e-4), got["step"]
    got = torch.load(root / trainer.model_file, weights_only=True)
    want = torch.load(reference / trainer.model_file, weights_only=True)
    for which in trainer.weights:
        assert got[which].keys() == want[which].keys()
        for key, value in want[which].items():
            torch.testing.assert_close(got[which][key], value, rtol=1e-4, atol=1e-5, msg=f"{which}.{key}")
