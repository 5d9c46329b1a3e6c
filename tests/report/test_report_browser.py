"""The results report as a browser shows it: headless Chromium loads ``reports/index.html``.

A copy of the page, beside it (so relative links resolve the same way), gets a script that
runs on ``load`` and writes what the browser saw into the DOM: each image's natural width,
each table's body rows and rendered height, every resource fetched. ``--dump-dom`` prints
that DOM. A deliberately broken image in the copy checks that a failed load is seen as one.

Chromium is the Debian package ``chromium``; ``.ci/run`` installs it when missing. Without
it the test is skipped, except in CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from meduet.report import build_report, sources

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROKEN = "does-not-exist.png"
CHECK_SCRIPT = """
<img id="broken-sentinel" src="%s" alt="sentinel">
<script>
window.addEventListener("load", () => {
  const images = [...document.images].map((img) => ({
    id: img.id, src: img.getAttribute("src").slice(0, 48), loaded: img.complete && img.naturalWidth > 0,
  }));
  const tables = [...document.querySelectorAll("table")].map((table) => ({
    rows: table.tBodies.length ? table.tBodies[0].rows.length : 0,
    cells: table.querySelectorAll("tbody td").length,
    height: table.getBoundingClientRect().height,
  }));
  const resources = performance.getEntriesByType("resource").map((entry) => entry.name);
  const out = document.createElement("pre");
  out.id = "report-check";
  out.textContent = JSON.stringify({images, tables, resources});
  document.body.appendChild(out);
});
</script>
""" % BROKEN


def _browser() -> str:
    found = os.environ.get("MEDUET_CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI: headless Chromium is required for the report test (.ci/run installs the Debian "
                        "package 'chromium')")
        pytest.skip("Chromium not installed (apt-get install chromium); CI installs it and runs this test")
    return found


def browser_check(browser: str, page: Path, profile: Path) -> dict:
    """Open ``page`` in headless Chromium; return what the check script recorded."""
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
            f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r'<pre id="report-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"no check output from {browser} (exit {done.returncode}):\n{done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def test_every_image_loads_and_every_table_renders(synthetic_project: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    browser = _browser()
    # One figure embedded as a data: URI, the larger one linked by a relative path: both ways are checked.
    monkeypatch.setattr(sources, "MAX_EMBEDDED_IMAGE_BYTES",
                        (synthetic_project / "reports/make_data/curve.png").stat().st_size)
    report = build_report(synthetic_project).html_path
    checked = report.with_name("index.check.html")
    checked.write_text(report.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))

    seen = browser_check(browser, checked, tmp_path / "chromium-profile")

    *images, sentinel = seen["images"]
    assert sentinel == {"id": "broken-sentinel", "src": BROKEN, "loaded": False}  # a failed load is detected
    assert [image["src"][:22] for image in images] == ["data:image/png;base64,", "evaluate/scatter.png"]
    assert all(image["loaded"] for image in images), images
    expected_tables = report.read_text().count("<table>")
    assert len(seen["tables"]) == expected_tables >= 4  # headline, timing, versions, two metrics tables
    for table in seen["tables"]:
        assert table["rows"] >= 1 and table["cells"] >= 2 and table["height"] > 0, table
    assert all(url.startswith(("file:", "data:")) for url in seen["resources"]), seen["resources"]
