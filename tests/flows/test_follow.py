"""What ``make run`` prints from the served flow's log (flows/follow.py); lines in Prefect's format."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from flows.follow import LogFollower, terminal_line

RAY = "\x1b[36m(RayTrainWorker pid=21314)\x1b[0m "


@pytest.mark.parametrize("raw, shown", [
    ("17:30:41.153 | INFO    | Flow run 'fortunate-dodo' - stages in order: demo_data, harmonize",
     "17:30:41 stages in order: demo_data, harmonize"),
    ("17:31:23.652 | INFO    | Task run 'dvc-repro-train_vae' - Running stage 'train_vae':",
     "17:31:23 train_vae: started"),
    (f"17:32:05.107 | INFO    | Task run 'dvc-repro-train_vae' - {RAY}train_vae: 30/600 steps (5%), 4.27 steps/s, "
     "2m13s left, loss 0.2647", "17:32:05 train_vae: 30/600 steps (5%), 4.27 steps/s, 2m13s left, loss 0.2647"),
    ("17:35:09.834 | INFO    | Task run 'dvc-repro-encode_latents' - 2026-11-27 17:35:09,833 INFO meduet.progress: "
     "encode-latents: 1/16 cases (6%), 0.05 cases/s, 4m52s left",
     "17:35:09 encode-latents: 1/16 cases (6%), 0.05 cases/s, 4m52s left"),
    ("17:31:19.446 | INFO    | Task run 'dvc-repro-harmonize' - harmonize:  31%|███▏      | 5/16 [00:02<00:04,  "
     "2.40case/s]", "17:31:19 harmonize:  31%|███▏      | 5/16 [00:02<00:04,  2.40case/s]"),
    ("17:34:42.763 | INFO    | Task run 'dvc-repro-train_vae' - Finished in state Completed()",
     "17:34:42 train_vae: Completed"),
    ("17:40:01.000 | ERROR   | Task run 'dvc-repro-pretrain' - Finished in state Failed('Task run encountered an "
     "exception')", "17:40:01 ERROR: pretrain: Failed('Task run encountered an exception')"),
    # a stage's own warning, forwarded at Prefect's INFO level, keeps its level
    ("17:35:01.000 | INFO    | Task run 'dvc-repro-harmonize' - 2026-11-27 17:35:01,000 WARNING meduet.harmonize: "
     "quarantined raw/case_3.nii.gz: not a NIfTI file",
     "17:35:01 WARNING: harmonize: quarantined raw/case_3.nii.gz: not a NIfTI file"),
    ("17:41:00.000 | WARNING | Task run 'publish-pretrain' - no metrics file",
     "17:41:00 WARNING: publish-pretrain: no metrics file"),
])
def test_the_terminal_gets_stage_events_progress_and_warnings(raw: str, shown: str) -> None:
    assert terminal_line(raw) == shown


@pytest.mark.parametrize("raw", [
    "17:30:43.708 | INFO    | Task run 'dvc-repro-demo_data' - > meduet demo-data --params params.yaml",
    "17:35:44.852 | INFO    | Task run 'dvc-repro-encode_latents' -     \"encoded\": 16,",
    "17:31:10.792 | INFO    | Task run 'publish-demo_data' - Finished in state Completed()",
    f"17:32:09.829 | INFO    | Task run 'dvc-repro-train_vae' - {RAY}Checkpoint successfully created at: x",
    "17:31:30.355 | INFO    | Task run 'dvc-repro-train_vae' - 2026-11-27 17:31:30,355       WARNING "
    "authentication_token_setup.py:85 -- Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE",
    "Traceback (most recent call last):",
    "To trigger a run for this flow, use the following command:",
])
def test_chatter_stays_in_the_file(raw: str) -> None:
    assert terminal_line(raw) is None


def _line(step: int) -> str:
    return (f"17:32:{step:02d}.000 | INFO    | Task run 'dvc-repro-pretrain' - {RAY}pretrain: {step}/40 steps "
            f"({100 * step // 40}%), 1.00 steps/s, 1s left\n")


def test_follower_shows_lines_added_while_open_and_the_rest_at_exit(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    log.write_text(_line(1))  # an earlier run's line: not shown
    shown: list[str] = []
    first_shown = threading.Event()

    def show(line: str) -> None:
        shown.append(line)
        first_shown.set()

    with LogFollower(log, show=show, poll_s=0.01):
        with open(log, "a") as handle:
            handle.write(_line(2))
        assert first_shown.wait(60), "a line written while following was not shown"
        with open(log, "a") as handle:
            handle.write(_line(3)[:30])  # half a line: held back until its end arrives
            handle.flush()
            handle.write(_line(3)[30:] + _line(4) + _line(5)[:10])
    assert [line.split()[2] for line in shown] == ["2/40", "3/40", "4/40"]
