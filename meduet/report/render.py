"""The report as HTML (``reports/index.html``) and as markdown (the Prefect artifact).

Both show the same sections in the same order: headline, timing, versions, then each
stage's metrics tables and figures. The HTML is static: no scripts, no fonts or styles from
elsewhere; images are embedded as ``data:`` URIs, or linked by a path relative to the
report when too large to embed.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meduet.report.headline import GOAL_SOURCES, MISSING_TEXT
from meduet.report.sources import ReportData, StageSection, data_uri, flatten_metrics

TITLE = "MeDUET results"
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
caption { text-align: left; font-weight: 600; padding: 0.3em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.met { color: #11691f; font-weight: 600; } .missed { color: #a40e0e; font-weight: 600; }
.note { color: #555; } code { font-size: 0.92em; }
figure { margin: 0.5em 0 1.5em; } figure img { max-width: 100%; border: 1px solid #ddd; }
section { border-top: 2px solid #ddd; margin-top: 1.5em; }
"""


# --------------------------------------------------------------------------- shared pieces
def format_value(value: Any) -> str:
    """A metric value as text: floats to 6 significant digits, ``None`` as "—"."""
    if value is None:
        return MISSING_TEXT
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def format_bytes(size: int | None) -> str:
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


HEADLINE_HEADER = ("metric", "value", "goal", "goal from", "goal met")


def goal_note() -> str:
    sources = "; ".join(f"{key}: {text}" for key, text in GOAL_SOURCES.items())
    return (f"Goals from {sources}. {MISSING_TEXT}: the stage has not written this metric; no verdict: no goal, "
            "or its bound was not computed.")


def timing_rows(data: ReportData) -> list[list[str]]:
    """``stage, this run, wall time, finished, result`` per stage, plus a sum when any stage was timed."""
    rows, total = [], 0.0
    for stage in data.stages:
        timing = stage.timing
        if timing is not None:
            total += timing.seconds
        rows.append([stage.name, stage.outcome or "",
                     format_seconds(timing.seconds) if timing else MISSING_TEXT,
                     timing.finished if timing else "", ("ok" if timing.ok else "failed") if timing else ""])
    if any(stage.timing for stage in data.stages):
        rows.append(["sum", "", format_seconds(total), "", ""])
    return rows


def version_rows(data: ReportData) -> list[list[str]]:
    """``stage, output, md5, size, files`` for every DVC ``outs`` entry (none without a ``dvc.lock``)."""
    if not data.has_lock:
        return []
    return [[stage.name, out.path, out.md5 or "not in dvc.lock", format_bytes(out.size),
             "" if out.nfiles is None else str(out.nfiles)]
            for stage in data.stages for out in stage.outputs]


def no_versions_text(data: ReportData) -> str:
    if not data.has_lock:
        return "No dvc.lock: no output is versioned yet (dvc repro writes it)."
    return "No stage in dvc.yaml declares outs."


def git_text(data: ReportData) -> str:
    if data.git is None:
        return "git commit: unknown (not a git work tree, or no commit yet)"
    state = f"dirty: {data.git.changed_files} tracked file(s) changed" if data.git.dirty else "clean"
    return f"git commit {data.git.commit} ({state})"


def _metric_rows(document: Any) -> list[list[str]]:
    return [[name, format_value(value)] for name, value in flatten_metrics(document)]


# --------------------------------------------------------------------------- HTML
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "",
                numeric: Sequence[int] = ()) -> str:
    """A table of already-escaped cells; columns in ``numeric`` are right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "\n".join(
        "<tr>" + "".join(f"<td class=\"num\">{c}</td>" if i in numeric else f"<td>{c}</td>"
                         for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    cap = f"<caption>{caption}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>"


def _relative(data: ReportData, rel: str) -> str:
    """A project-relative path as a link relative to the report's folder."""
    return Path(os.path.relpath(data.project_dir / rel, data.reports_dir)).as_posix()


def _html_stage(data: ReportData, stage: StageSection) -> str:
    parts = [f"<section id=\"{_e(stage.name)}\"><h3>{_e(stage.name)}</h3>"]
    if stage.timing:
        result = "" if stage.timing.ok else ", <span class=\"missed\">failed</span>"
        parts.append(f"<p class=\"note\">last run: {_e(format_seconds(stage.timing.seconds))}, "
                     f"finished {_e(stage.timing.finished)}{result}</p>")
    for rel, document in stage.metrics.items():
        rows = [[_e(name), _e(value)] for name, value in _metric_rows(document)]
        if rows:
            parts.append(_html_table(("metric", "value"), rows, caption=f"<code>{_e(rel)}</code>", numeric=(1,)))
        else:
            parts.append(f"<p class=\"note\"><code>{_e(rel)}</code> holds no metrics.</p>")
    for rel in stage.figures:
        src = data_uri(data.project_dir / rel) or _relative(data, rel)
        parts.append(f"<figure><img src=\"{_e(src)}\" alt=\"{_e(rel)}\">"
                     f"<figcaption><code>{_e(rel)}</code></figcaption></figure>")
    for rel in stage.data_plots:
        parts.append(f"<p>Plot data: <a href=\"{_e(_relative(data, rel))}\"><code>{_e(rel)}</code></a></p>")
    if stage.missing:
        listed = ", ".join(f"<code>{_e(rel)}</code>" for rel in stage.missing)
        parts.append(f"<p class=\"missed\">Declared in dvc.yaml but not written: {listed}</p>")
    parts.append("</section>")
    return "\n".join(parts)


def render_html(data: ReportData) -> str:
    """The whole report as one static HTML page."""
    headline = [[_e(r.headline.label), _e(r.value_text), _e(r.goal_text), _e(r.source),
                 f"<span class=\"{r.status}\">{r.status}</span>" if r.status else ""] for r in data.headline]
    timing = [[_e(cell) for cell in row] for row in timing_rows(data)]
    versions = [[_e(row[0]), f"<code>{_e(row[1])}</code>", f"<code>{_e(row[2])}</code>", _e(row[3]), _e(row[4])]
                for row in version_rows(data)]
    body = [
        f"<h1>{TITLE}</h1>",
        f"<p class=\"note\">Written {_e(data.created)} from <code>{_e(data.project_dir)}</code>; "
        f"{_e(git_text(data))}.</p>",
        "<h2>Headline</h2>",
        _html_table(HEADLINE_HEADER, headline, numeric=(1,)),
        f"<p class=\"note\">{_e(goal_note())}</p>",
        "<h2>Timing</h2>",
        _html_table(("stage", "this run", "wall time", "finished (UTC)", "result"), timing, numeric=(2,)),
        "<p class=\"note\">Wall time of each stage's last run through <code>meduet &lt;stage&gt;</code> "
        "(what <code>dvc repro</code> runs); <em>this run</em>: what the Prefect flow's "
        "<code>dvc repro</code> did (unchanged: up to date, not rerun).</p>",
        "<h2>Versions</h2>",
        f"<p>{_e(git_text(data))}</p>",
        (_html_table(("stage", "output", "md5 (dvc.lock)", "size", "files"), versions, numeric=(3, 4))
         if versions else f"<p class=\"note\">{_e(no_versions_text(data))}</p>"),
        "<h2>Stages</h2>",
        *(_html_stage(data, stage) for stage in data.stages),
    ]
    head = f"<meta charset=\"utf-8\">\n<title>{TITLE}</title>\n<style>{CSS}</style>"
    page = "\n".join(["<!DOCTYPE html>", "<html lang=\"en\">", f"<head>\n{head}\n</head>", "<body>", *body,
                      "</body>", "</html>"])
    return page + "\n"


# --------------------------------------------------------------------------- markdown
def _m(value: Any) -> str:
    """A markdown table cell: pipes escaped, on one line."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_m(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_m(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _md_stage(data: ReportData, stage: StageSection) -> str:
    parts = [f"### {stage.name}\n"]
    if stage.timing:
        failed = ", failed" if not stage.timing.ok else ""
        parts.append(f"last run: {format_seconds(stage.timing.seconds)}, finished {stage.timing.finished}{failed}\n")
    for rel, document in stage.metrics.items():
        rows = _metric_rows(document)
        parts.append(f"`{rel}`\n\n" + _md_table(("metric", "value"), rows) if rows else f"`{rel}` holds no metrics.\n")
    for rel in stage.figures:
        path = data.project_dir / rel
        uri = data_uri(path)
        parts.append(f"![{rel}]({uri})\n" if uri else f"`{path}` ({path.stat().st_size} bytes, too large to embed)\n")
    parts += [f"Plot data: `{data.project_dir / rel}`\n" for rel in stage.data_plots]
    if stage.missing:
        parts.append("Declared in dvc.yaml but not written: " + ", ".join(f"`{rel}`" for rel in stage.missing) + "\n")
    return "\n".join(parts)


def render_markdown(data: ReportData, html_path: Path | None = None) -> str:
    """The report as markdown (the Prefect artifact ``results-report``): the same tables and figures."""
    headline = [[r.headline.label, r.value_text, r.goal_text, r.source, r.status] for r in data.headline]
    where = f"; the HTML report is `{html_path}`" if html_path else ""
    parts = [
        f"# {TITLE}\n",
        f"Written {data.created} from `{data.project_dir}`; {git_text(data)}{where}.\n",
        "## Headline\n",
        _md_table(HEADLINE_HEADER, headline),
        f"{goal_note()}\n",
        "## Timing\n",
        _md_table(("stage", "this run", "wall time", "finished (UTC)", "result"), timing_rows(data)),
        "## Versions\n",
        f"{git_text(data)}\n",
        (_md_table(("stage", "output", "md5 (dvc.lock)", "size", "files"), version_rows(data))
         if version_rows(data) else f"{no_versions_text(data)}\n"),
        "## Stages\n",
        *(_md_stage(data, stage) for stage in data.stages),
    ]
    return "\n".join(parts)
