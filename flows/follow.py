"""What ``make run`` shows on the terminal: the stages' progress, read from the served flow's log.

The served deployment writes every log line of the flow and its stages (DVC's output, each
stage's own log, Ray workers' lines) to one file. The terminal gets the lines a person
watching a run needs: a stage starting and finishing, its progress lines (steps or cases
done, rate, time left, losses), the flow's own messages, and every warning or error. DVC's
chatter and the stages' JSON summaries stay in the file.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

# "17:32:05.107 | INFO    | Task run 'dvc-repro-train_vae' - <message>" (Prefect's console format)
_PREFECT_LINE = re.compile(r"^(?P<time>\d\d:\d\d:\d\d)\.\d+ \| (?P<level>\w+)\s*\| "
                           r"(?P<kind>Flow run|Task run) '(?P<name>[^']*)' - (?P<message>.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_PREFIX = re.compile(r"^\((?:\w+) pid=\d+(?:, ip=[\d.]+)?\)\s*")  # "(RayTrainWorker pid=21314) "
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(?P<level>[A-Z]+)\s+\S+:?\s+(?:-- )?")
_PROGRESS = re.compile(r"^[\w-]+: (?:\d+/\d+ \w+ \(\d+%\)|\s*\d+%\|)")  # meduet's Progress, or a tqdm bar
_STAGE_TASK = "dvc-repro-"
_LOUD_LEVELS = {"WARNING", "ERROR", "CRITICAL"}
# Warnings every stage gets that need nothing from the user (they stay in the file).
_ROUTINE = ("Token authentication is enabled for this Ray cluster",)


def terminal_line(raw: str) -> str | None:
    """The text to show for one line of the served flow's log, or None to leave it in the file."""
    match = _PREFECT_LINE.match(_ANSI.sub("", raw.rstrip("\n")))
    if match is None:
        return None  # a continuation line (a traceback, a JSON dump): the file has it
    time, level, kind, name = match["time"], match["level"], match["kind"], match["name"]
    message = _RAY_PREFIX.sub("", match["message"].strip())
    inner = _LOG_PREFIX.match(message)  # a stage's own logging line, forwarded by DVC
    if inner is not None:
        level = inner["level"] if inner["level"] in _LOUD_LEVELS else level
        message = message[inner.end():]
    if message.startswith(_ROUTINE):
        return None
    loud = f"{level}: " if level in _LOUD_LEVELS else ""
    if kind == "Flow run":
        return f"{time} {loud}{message}"
    if not name.startswith(_STAGE_TASK):
        return f"{time} {loud}{name}: {message}" if loud else None  # artifact publishing and other helpers
    stage = name.removeprefix(_STAGE_TASK)
    if message.startswith("Running stage "):
        return f"{time} {stage}: started"
    if message.startswith("Finished in state "):
        return f"{time} {loud}{stage}: {message.removeprefix('Finished in state ').removesuffix('()')}"
    if loud:
        return f"{time} {loud}{stage}: {message}"
    return f"{time} {message}" if _PROGRESS.match(message) else None


def print_now(line: str) -> None:
    print(line, flush=True)  # shown as it happens, also when the terminal output is piped (tee)


class LogFollower:
    """Context manager: while open, a thread prints the shown lines that ``path`` gains.

    Reads from the file's end at entry (earlier runs' lines stay unshown), every ``poll_s``
    seconds, whole lines only; at exit it reads what is left, so a run's last lines appear (a
    line still without its newline then is not shown).
    """

    def __init__(self, path: Path, show: Callable[[str], None] = print_now, poll_s: float = 0.5) -> None:
        self.path, self.show, self.poll_s = path, show, poll_s
        self._offset = path.stat().st_size if path.exists() else 0
        self._pending = b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="log-follower", daemon=True)

    def __enter__(self) -> LogFollower:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._read_new()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._read_new()

    def _read_new(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        self._offset += len(data)
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()  # a line still being written
        for line in lines:
            shown = terminal_line(line.decode("utf-8", errors="replace"))
            if shown is not None:
                self.show(shown)
