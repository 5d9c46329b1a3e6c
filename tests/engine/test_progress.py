"""Progress lines: a steady pace (every 5 % or 30 s), the rate of this run's work only, time left, values."""

import pytest

from meduet.engine import progress as progress_module
from meduet.engine.loop import progress_values
from meduet.engine.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


def test_lines_every_five_percent_with_rate_time_left_and_values(clock: Clock) -> None:
    progress = Progress("pretrain", 200, start=100)  # resumed at step 100: the rate counts this run's steps
    lines = []
    for step in range(101, 201):
        clock.now += 0.5  # 2 steps/s
        line = progress.update(step, {"total": 1.23456})
        if line:
            lines.append(line)
    assert len(lines) == 10  # 100 steps left, one line per 10 steps (5 % of 200)
    assert lines[0] == "pretrain: 110/200 steps (55%), 2.00 steps/s, 45s left, total 1.235"
    assert lines[-1].startswith("pretrain: 200/200 steps (100%), 2.00 steps/s, done")


def test_a_slow_run_still_reports_every_30_seconds(clock: Clock) -> None:
    progress = Progress("train_vae", 10_000, every_s=30.0)
    clock.now += 29.0
    assert progress.update(1) is None
    clock.now += 2.0
    line = progress.update(2)
    assert line == "train_vae: 2/10000 steps (0%), 0.06 steps/s, 43h02m49s left"  # 9998 steps at 2 per 31 s


def test_other_ranks_stay_silent(clock: Clock) -> None:
    progress = Progress("pretrain", 10, enabled=False)
    assert all(progress.update(step) is None for step in range(1, 11))


def test_training_lines_show_the_total_first_then_each_loss_term_in_use(clock: Clock) -> None:
    shown = {"rec": 0.5, "domain_content": 1.25, "mftd": 0.0, "total": 2.0}  # MFTD off: its term stays 0
    values = progress_values(shown, "total")
    assert list(values) == ["total", "rec", "domain_content"]
    progress = Progress("pretrain", 1)
    clock.now += 1.0
    line = progress.update(1, values)
    assert line == "pretrain: 1/1 steps (100%), 1.00 steps/s, done, total 2, rec 0.5, domain_content 1.25"
    assert progress_values({}, "total") == {}  # before the first history row
