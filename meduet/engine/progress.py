"""Progress of long work as steady plain log lines: done/total, rate, time left, the main numbers.

A line every ``every_fraction`` of the work or every ``every_s`` seconds, whichever comes first,
and at the end. Plain log lines (not a redrawn bar) because training runs inside Ray workers
and DVC subprocesses whose output reaches a terminal, a file and Prefect's logs alike.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping

log = logging.getLogger("meduet.progress")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Reports ``name: 120/600 steps (20%), 3.1 steps/s, 2m35s left, loss 0.123`` at a steady pace.

    Args:
        name: what is progressing (a stage name).
        total: units of work in all.
        start: units already done (a resumed run); the rate counts only this run's work.
        unit: what one unit is called (``steps``, ``cases``).
        every_fraction: report after each such share of ``total``.
        every_s: and at least this often (seconds).
        enabled: False on ranks other than 0, so one worker speaks for the run.
    """

    def __init__(self, name: str, total: int, *, start: int = 0, unit: str = "steps", every_fraction: float = 0.05,
                 every_s: float = 30.0, enabled: bool = True) -> None:
        self.name, self.total, self.unit, self.enabled = name, total, unit, enabled
        self._start_done, self._start_time = start, time.monotonic()
        self._stride = max(1, round(total * every_fraction))
        self._every_s = every_s
        self._last_time = self._start_time
        self._last_done = start

    def update(self, done: int, values: Mapping[str, float] | None = None) -> str | None:
        """Record that ``done`` units are finished; return (and log) a line when one is due."""
        now = time.monotonic()
        due = done >= self.total or done // self._stride > self._last_done // self._stride \
            or now - self._last_time >= self._every_s
        if not (self.enabled and due):
            return None
        self._last_time, self._last_done = now, done
        rate = (done - self._start_done) / max(now - self._start_time, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        parts = [f"{self.name}: {done}/{self.total} {self.unit} ({100 * done / max(self.total, 1):.0f}%)",
                 f"{rate:.2f} {self.unit}/s"]
        parts.append("done" if done >= self.total else f"{_duration(left)} left" if left != float("inf") else "")
        parts += [f"{key} {value:.4g}" for key, value in (values or {}).items()]
        line = ", ".join(p for p in parts if p)
        if log.hasHandlers():
            log.info(line)
        else:  # a Ray worker: no logging set up there, but its stderr reaches the driver
            print(line, file=sys.stderr, flush=True)
        return line
