"""What the report shows, read from the project folder; nothing here writes.

- metrics and plots: the files each stage declares in ``dvc.yaml``;
- timing: ``reports/<stage>/timing.json``, written by the CLI around every stage run;
- versions: the hashes of each stage's ``outs`` in ``dvc.lock`` and the git commit.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meduet.dvc_graph import Stage
from meduet.report.headline import HeadlineRow
from meduet.stages import StageTiming

MAX_EMBEDDED_IMAGE_BYTES = 2 * 1024 * 1024  # larger images are linked, not embedded
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}
DVC_LOCK = "dvc.lock"


# --------------------------------------------------------------------------- metrics and figures
def flatten_metrics(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted.key, value)`` for every leaf of a metrics document, in file order.

    A list of plain values stays one value (shown as JSON); a list holding mappings or lists
    is indexed (``sites.0.name``).
    """
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from flatten_metrics(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and any(isinstance(item, (Mapping, list)) for item in value):
        for index, item in enumerate(value):
            yield from flatten_metrics(item, f"{prefix}.{index}" if prefix else str(index))
    elif isinstance(value, (str, int, float, bool)) or value is None:
        yield prefix or "value", value
    else:
        yield prefix or "value", json.dumps(value, default=str)


def read_metrics(path: Path) -> Any:
    """A metrics file as DVC allows them: JSON, or YAML for any other suffix."""
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_TYPES


def data_uri(path: Path) -> str | None:
    """The image at ``path`` as a ``data:`` URI, or None when it is too large to embed."""
    if path.stat().st_size > MAX_EMBEDDED_IMAGE_BYTES:
        return None
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"data:{IMAGE_TYPES[path.suffix.lower()]};base64,{encoded}"


# --------------------------------------------------------------------------- versions
@dataclass(frozen=True)
class OutputVersion:
    """One DVC output as ``dvc.lock`` records it (``md5`` None: not in the lock file)."""

    path: str
    md5: str | None = None
    size: int | None = None
    nfiles: int | None = None


@dataclass(frozen=True)
class GitVersion:
    """The checked-out commit and how many tracked files differ from it."""

    commit: str
    changed_files: int

    @property
    def dirty(self) -> bool:
        return self.changed_files > 0


def read_lock(project_dir: Path) -> dict[str, dict[str, OutputVersion]] | None:
    """``{stage: {out path: version}}`` from ``dvc.lock``; None when there is no lock file."""
    path = project_dir / DVC_LOCK
    if not path.is_file():
        return None
    doc = yaml.safe_load(path.read_text()) or {}
    locked: dict[str, dict[str, OutputVersion]] = {}
    for stage, spec in (doc.get("stages") or {}).items():
        outs = (spec or {}).get("outs") or []
        locked[stage] = {
            out["path"]: OutputVersion(out["path"], out.get("md5") or out.get("etag") or out.get("checksum"),
                                       out.get("size"), out.get("nfiles"))
            for out in outs if isinstance(out, Mapping) and "path" in out
        }
    return locked


def git_version(project_dir: Path) -> GitVersion | None:
    """``git rev-parse HEAD`` and the count of changed tracked files; None outside a git work tree."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True, check=False)

    try:
        head = git("rev-parse", "HEAD")
    except FileNotFoundError:  # no git installed
        return None
    if head.returncode != 0:
        return None
    # Untracked files do not count: the pipeline's own outputs (reports/, dvc.lock) may be untracked.
    status = git("status", "--porcelain", "--untracked-files=no")
    return GitVersion(head.stdout.strip(), len(status.stdout.splitlines()))


# --------------------------------------------------------------------------- one stage
@dataclass(frozen=True)
class StageSection:
    """Everything the report shows for one stage; paths are relative to the project folder."""

    name: str
    metrics: dict[str, Any]  # metrics file -> parsed document, for each declared file that exists
    figures: tuple[str, ...]  # declared image plots that exist
    data_plots: tuple[str, ...]  # declared plots that are data (history.csv), shown as links
    missing: tuple[str, ...]  # declared metrics or plots not on disk
    timing: StageTiming | None
    outcome: str | None  # what the flow's ``dvc repro`` did this run (ran / unchanged / ...), if known
    outputs: tuple[OutputVersion, ...]


def stage_section(project_dir: Path, reports_dir: Path, stage: Stage,
                  lock: dict[str, dict[str, OutputVersion]] | None, outcome: str | None = None) -> StageSection:
    """Read what ``stage`` declares in ``dvc.yaml`` from ``project_dir``."""
    exists = {rel: (project_dir / rel).is_file() for rel in stage.metrics + stage.plots}
    locked = (lock or {}).get(stage.name, {})
    return StageSection(
        name=stage.name,
        metrics={rel: read_metrics(project_dir / rel) for rel in stage.metrics if exists[rel]},
        figures=tuple(rel for rel in stage.plots if exists[rel] and is_image(rel)),
        data_plots=tuple(rel for rel in stage.plots if exists[rel] and not is_image(rel)),
        missing=tuple(rel for rel, present in exists.items() if not present),
        timing=StageTiming.read(reports_dir, stage.name),
        outcome=outcome,
        outputs=tuple(locked.get(rel, OutputVersion(rel)) for rel in stage.outs),
    )


# --------------------------------------------------------------------------- the whole report
@dataclass(frozen=True)
class ReportData:
    """Everything one report shows, read once; the HTML and markdown renderings take this."""

    project_dir: Path
    reports_dir: Path
    created: str  # UTC, ISO 8601
    headline: list[HeadlineRow]
    stages: list[StageSection]
    git: GitVersion | None
    has_lock: bool
