"""The results report: one page with what the pipeline's last run produced.

``build_report(project_dir)`` reads what ``dvc.yaml`` declares (each stage's metrics and
plots), the stage timings the CLI records, ``dvc.lock`` and git, and writes
``reports/index.html`` (static, self-contained). It returns the same content as markdown
for the Prefect flow's ``results-report`` artifact, and the headline for a terminal.
The CLI (``meduet report``) and the flow's last task both call it.

Sections: a headline table (``headline.HEADLINES``: metric, value, goal, met/missed), the
wall time of each stage, the versions of the data and models (DVC hashes, git commit),
then per stage its flattened metrics and every figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from meduet.dvc_graph import load_stages
from meduet.io.atomic import write_text
from meduet.report.headline import HEADLINES, Goal, Headline, HeadlineRow, headline_rows, headline_text
from meduet.report.render import render_html, render_markdown
from meduet.report.sources import ReportData, flatten_metrics, git_version, read_lock, read_metrics, stage_section

__all__ = ["HEADLINES", "REPORT_FILE", "Goal", "Headline", "HeadlineRow", "ReportData", "ReportResult",
           "build_report", "collect_report", "flatten_metrics", "headline_text", "read_metrics"]

REPORT_FILE = "index.html"


@dataclass(frozen=True)
class ReportResult:
    """Where the HTML went, its markdown twin and the headline rows."""

    html_path: Path
    markdown: str
    headline: list[HeadlineRow]

    def headline_text(self) -> str:
        return headline_text(self.headline)


def collect_report(project_dir: str | Path, *, reports_dir: str | Path | None = None,
                   outcomes: Mapping[str, str] | None = None,
                   headlines: Sequence[Headline] = HEADLINES) -> ReportData:
    """Read everything the report shows; writes nothing.

    Args:
        project_dir: folder holding ``dvc.yaml``; the paths it declares are relative to it.
        reports_dir: where the stages' timings are and the report goes (default ``<project>/reports``).
        outcomes: stage -> what this run's ``dvc repro`` did (``ran``, ``unchanged``, ...), if known.
        headlines: the headline metrics to show.
    """
    project = Path(project_dir).resolve()
    reports = Path(reports_dir).resolve() if reports_dir is not None else project / "reports"
    lock = read_lock(project)
    stages = [stage_section(project, reports, stage, lock, (outcomes or {}).get(stage.name))
              for stage in load_stages(project)]
    return ReportData(
        project_dir=project,
        reports_dir=reports,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        headline=headline_rows({s.name: list(s.metrics.values()) for s in stages}, headlines),
        stages=stages,
        git=git_version(project),
        has_lock=lock is not None,
    )


def build_report(project_dir: str | Path, *, reports_dir: str | Path | None = None,
                 outcomes: Mapping[str, str] | None = None,
                 headlines: Sequence[Headline] = HEADLINES) -> ReportResult:
    """Write ``<reports_dir>/index.html`` atomically; see ``collect_report`` for the arguments."""
    data = collect_report(project_dir, reports_dir=reports_dir, outcomes=outcomes, headlines=headlines)
    html_path = write_text(data.reports_dir / REPORT_FILE, render_html(data))
    return ReportResult(html_path, render_markdown(data, html_path), data.headline)
