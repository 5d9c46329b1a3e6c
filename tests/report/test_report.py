"""meduet.report: the results report from a synthetic two-stage project."""

from __future__ import annotations

import base64
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from meduet import cli
from meduet.report import build_report, collect_report, sources
from meduet.report.headline import HEADLINES as HEADLINE_DEFAULTS
from meduet.report.headline import MISSING, Goal, Headline, HeadlineRow, headline_rows, headline_text, lookup
from meduet.stages import evaluate_synthesis

HEADLINES = (
    Headline("make_data", "overall.psnr", "PSNR (dB)", digits=1),
    Headline("evaluate", "style_accuracy", "site from style", Goal(">=", 0.9)),
    Headline("evaluate", "content_accuracy", "site from content", Goal("<=", 0.4)),
    Headline("evaluate", "content_accuracy", "content vs null",
             Goal("<=", ref="probes.0.null_p95", ref_label="null p95", source="issue")),
    Headline("evaluate", "content_accuracy", "content vs chance",
             Goal("<=", ref="retrieval.chance", offset=0.1, ref_label="chance", source="issue")),
    Headline("evaluate", "permutation.p_value", "not written yet", Goal("<=", 0.05)),
    Headline("no_such_stage", "x", "unknown stage"),
)


class _Page(HTMLParser):
    """The tables (rows of cell texts), image sources and link targets of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.scripts = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attributes["src"] or "")
        elif tag in ("a", "link"):
            self.links.append(attributes.get("href") or "")
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _local(url: str) -> bool:
    """A data: URI, or a relative path (no scheme, no host, not rooted)."""
    parts = urlsplit(url)
    return parts.scheme == "data" or (not parts.scheme and not parts.netloc and not url.startswith("/"))


def _page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def _table_with_header(page: _Page, first: str) -> list[list[str]]:
    return next(table for table in page.tables if table[0][0] == first)


def test_report_shows_headline_timing_versions_metrics_and_figures(synthetic_project: Path) -> None:
    result = build_report(synthetic_project, headlines=HEADLINES, outcomes={"make_data": "ran"})
    assert result.html_path == synthetic_project / "reports" / "index.html"
    page = _page(result.html_path)

    assert _table_with_header(page, "metric")[1:] == [
        ["PSNR (dB)", "21.2", "", "", ""],  # 21.25 to one digit
        ["site from style", "0.950", "≥ 0.90", "README", "met"],
        ["site from content", "0.500", "≤ 0.40", "README", "missed"],
        ["content vs null", "0.500", "≤ null p95 (0.55)", "issue", "met"],  # bound: another metric
        ["content vs chance", "0.500", "≤ chance + 0.10 (not computed)", "issue", ""],  # its bound is missing
        ["not written yet", "—", "≤ 0.05", "README", ""],
        ["unknown stage", "—", "", "", ""],
    ]
    timing = _table_with_header(page, "stage")
    assert timing[1] == ["make_data", "ran", "5 min 12 s", "2026-11-25T10:00:00+00:00", "ok"]
    assert timing[2] == ["evaluate", "", "—", "", ""]
    versions = next(table for table in page.tables if table[0][:3] == ["stage", "output", "md5 (dvc.lock)"])
    assert versions[1:] == [["make_data", "data/a", "0123456789abcdef0123456789abcdef.dir", "3.0 MiB", "7"]]

    metric_tables = [table for table in page.tables if table[0] == ["metric", "value"]]
    assert [dict(map(tuple, table[1:])) for table in metric_tables] == [
        {"cases": "4", "overall.psnr": "21.25", "overall.ssim": "0.5", "sites": '["a", "b"]'},
        {"style_accuracy": "0.95", "content_accuracy": "0.5", "probes.0.fold": "0", "probes.0.acc": "0.75",
         "probes.0.null_p95": "0.55", "note": "a|b <i>"},  # escaped in the HTML, read back as text
    ]
    assert all(len(table) > 1 for table in page.tables)

    # Both figures embedded byte for byte; the CSV linked relative to the report; nothing from the network.
    figures = [synthetic_project / "reports/make_data/curve.png", synthetic_project / "reports/evaluate/scatter.png"]
    assert [base64.b64decode(src.split(",", 1)[1]) for src in page.images] == [f.read_bytes() for f in figures]
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert page.links == ["make_data/history.csv"] and page.scripts == 0
    text = result.html_path.read_text()
    assert "reports/evaluate/never_written.png" in text.split("not written:")[1]
    assert "http://" not in text and "https://" not in text
    assert all(_local(url) for url in page.images + page.links)


def test_markdown_carries_the_same_tables_and_images(synthetic_project: Path) -> None:
    result = build_report(synthetic_project, headlines=HEADLINES)
    md = result.markdown
    assert "| site from style | 0.950 | ≥ 0.90 | README | met |" in md
    assert "| site from content | 0.500 | ≤ 0.40 | README | missed |" in md
    assert "| content vs null | 0.500 | ≤ null p95 (0.55) | issue | met |" in md
    assert "| not written yet | — | ≤ 0.05 | README |  |" in md
    assert "| note | a\\|b <i> |" in md  # a pipe in a value does not split the cell
    assert "| make_data | data/a | 0123456789abcdef0123456789abcdef.dir | 3.0 MiB | 7 |" in md
    for rel in ("reports/make_data/curve.png", "reports/evaluate/scatter.png"):
        encoded = base64.b64encode((synthetic_project / rel).read_bytes()).decode()
        assert f"![{rel}](data:image/png;base64,{encoded})" in md
    assert str(result.html_path) in md


def test_images_over_the_embedding_limit_are_linked(synthetic_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = (synthetic_project / "reports/make_data/curve.png").stat().st_size
    monkeypatch.setattr(sources, "MAX_EMBEDDED_IMAGE_BYTES", small)  # scatter.png is larger
    result = build_report(synthetic_project, headlines=HEADLINES)
    images = _page(result.html_path).images
    assert images[0].startswith("data:image/png;base64,") and images[1] == "evaluate/scatter.png"
    assert f"`{synthetic_project / 'reports/evaluate/scatter.png'}` (" in result.markdown


def test_report_dir_elsewhere_links_figures_back_to_the_project(synthetic_project: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_EMBEDDED_IMAGE_BYTES", 0)
    result = build_report(synthetic_project, reports_dir=tmp_path / "elsewhere", headlines=HEADLINES)
    assert result.html_path == tmp_path / "elsewhere" / "index.html"
    for src in _page(result.html_path).images:
        assert (result.html_path.parent / src).resolve().is_file()


def test_without_lock_git_or_timings_the_report_says_so(synthetic_project: Path) -> None:
    (synthetic_project / "dvc.lock").unlink()
    (synthetic_project / "reports/make_data/timing.json").unlink()
    page = _page(build_report(synthetic_project, headlines=HEADLINES).html_path)
    text = (synthetic_project / "reports/index.html").read_text()
    assert "No dvc.lock" in text and "not a git work tree" in text
    assert ["make_data", "", "—", "", ""] in _table_with_header(page, "stage")
    assert all(len(table) > 1 for table in page.tables)  # no empty table rendered


def test_git_commit_and_dirty_flag(synthetic_project: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=synthetic_project,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", "dvc.yaml", "params.yaml")
    git("commit", "-q", "-m", "x")
    head = git("rev-parse", "HEAD")
    clean = collect_report(synthetic_project, headlines=HEADLINES).git
    assert clean is not None and clean.commit == head and not clean.dirty  # untracked reports/ do not count
    (synthetic_project / "params.yaml").write_text("paths: {}\n")
    dirty = collect_report(synthetic_project, headlines=HEADLINES).git
    assert dirty is not None and dirty.changed_files == 1
    assert f"git commit {head} (dirty: 1 tracked file(s) changed)" in build_report(synthetic_project).markdown


def test_headline_lookup_and_goals() -> None:
    tree = {"a": {"b": [{"c": 1}]}, "flag": True}
    assert lookup(tree, "a.b.0.c") == 1 and lookup(tree, "a.b.1.c") is MISSING
    assert lookup(tree, "a.x") is MISSING and lookup(tree, "a.b.c") is MISSING
    assert Goal(">=", 0.9).met(0.9, 0.9) and not Goal(">=", 0.9).met(0.89, 0.9)
    assert Goal("<=", 0.4).met(0.4, 0.4) and not Goal("<=", 0.4).met(0.41, 0.4)
    relative = Goal("<=", ref="chance", offset=0.1, ref_label="chance")
    assert relative.bound([{"chance": 0.25}]) == pytest.approx(0.35) and relative.bound([{}]) is None
    assert relative.bound([{"chance": None}]) is None and relative.bound([{"chance": float("nan")}]) is None
    with pytest.raises(ValueError, match="goal op"):
        Goal(">", 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        Goal(">=", 0.5, ref="x")
    with pytest.raises(ValueError, match="exactly one"):
        Goal(">=")
    with pytest.raises(ValueError, match="source"):
        Goal(">=", 0.5, source="hearsay")
    # The first metrics file holding the key wins; a boolean or text value is shown but not judged.
    rows = headline_rows({"s": [{"x": 0.1}, {"x": 0.9, "y": True}]},
                         [Headline("s", "x", "x", Goal(">=", 0.5)), Headline("s", "y", "y", Goal(">=", 0.5))])
    assert [(r.value, r.status, r.value_text) for r in rows] == [(0.1, "missed", "0.100"), (True, "", "True")]
    assert HeadlineRow(Headline("s", "z", "z", Goal("<=", 1.0)), float("nan"), 1.0).status == ""


def test_headline_text_is_an_aligned_table() -> None:
    rows = [HeadlineRow(Headline("s", "x", "style", Goal(">=", 0.9)), 0.95, 0.9),
            HeadlineRow(Headline("s", "y", "a longer label"), MISSING)]
    assert headline_text(rows).splitlines() == [
        "metric          value  goal    status",
        "--------------  -----  ------  ------",
        "style           0.950  ≥ 0.90  met",
        "a longer label  —",
    ]


def test_cli_report_command(synthetic_project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", "--params", str(synthetic_project / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert (synthetic_project / "reports" / "index.html").is_file()
    assert f"Results report: {synthetic_project / 'reports' / 'index.html'}" in out
    assert out.startswith("metric") and "site from style (probe accuracy)" in out  # the default HEADLINES


def test_headline_value_carries_its_interval_when_the_stage_wrote_one() -> None:
    rows = headline_rows({"s": [{"x": 0.8125, "x_ci95": [0.57, 0.93], "y": 0.5, "y_ci95": "n/a"}]},
                         [Headline("s", "x", "x", interval="x_ci95"), Headline("s", "y", "y", interval="y_ci95"),
                          Headline("s", "y", "y", interval="absent")])
    assert [r.value_text for r in rows] == ["0.812 [0.570, 0.930]", "0.500", "0.500"]


def test_the_unseen_site_headline_counts_sites_won_against_all_sites() -> None:
    unseen = [h for h in HEADLINE_DEFAULTS if h.key.startswith("goals.loso_")]
    assert len(unseen) == 1

    def verdict(won: int) -> tuple[str, str]:
        goal = {"won": won, "of": 4, "sites": {}, "met": won == 4}
        row, = headline_rows({"finetune_sweep": [{"goals": {"loso_meduet_beats_scratch_on_every_site": goal}}]},
                             unseen)
        return row.value_text, row.status
    assert verdict(3) == ("3", "missed") and verdict(4) == ("4", "met")
    row, = headline_rows({"finetune_sweep": [{"goals": {}}]}, unseen)  # the sweep ran no unseen sites
    assert (row.value_text, row.status) == ("—", "")


def test_the_synthesis_headlines_judge_as_evaluate_synthesis_judges_its_goals() -> None:
    synthesis = [h for h in HEADLINE_DEFAULTS if h.stage == "evaluate_synthesis"]
    goal_of = {"content.ratio_to_roundtrip": "content_dice_at_least_0.9_of_roundtrip",
               "translation_style_accuracy": "style_accuracy_at_least_0.90",
               "counterfactual.closer_than_baselines": "counterfactual_closer_than_baselines_at_least_0.80",
               "generation.frechet_distance.overall.ratio": "frechet_distance_at_most_2x_floor"}
    assert {h.key for h in synthesis if h.goal} == set(goal_of)
    for good in (True, False):
        metrics = {"content": {"ratio_to_roundtrip": 0.95 if good else 0.85, "ratio_to_roundtrip_ci95": [0.8, 1.0]},
                   "translation_style_accuracy": 0.92 if good else 0.25,
                   "counterfactual": {"closer_than_baselines": 0.85 if good else 0.0},
                   "generation": {"frechet_distance": {"overall": {"ratio": 1.5 if good else 26.7}},
                                  "frechet_distance_vae_roundtrip": {"overall": {"ratio": 40.0}}}}
        metrics["goals"] = evaluate_synthesis.goals(metrics)
        rows = headline_rows({"evaluate_synthesis": [metrics]}, synthesis)
        for row in rows:
            if row.headline.goal:
                assert row.status == ("met" if metrics["goals"][goal_of[row.headline.key]]["met"] else "missed")
                assert row.status == ("met" if good else "missed")
            else:  # the VAE's own ceiling: shown, judged by nothing
                assert (row.value_text, row.status) == ("40.0", "")
