"""A tiny synthetic project for the report: two stages in dvc.yaml, their metrics, real PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from meduet.io.figures import plt, save_figure
from meduet.stages import StageTiming

DVC_YAML = {"stages": {
    "make_data": {
        "cmd": "true",
        "outs": ["data/a"],
        "metrics": [{"reports/make_data/metrics.json": {"cache": False}}],
        "plots": [{"reports/make_data/curve.png": {"cache": False}},
                  {"reports/make_data/history.csv": {"cache": False, "x": "step", "y": "loss"}}],
    },
    "evaluate": {
        "cmd": "true",
        "deps": ["data/a"],
        "metrics": ["reports/evaluate/metrics.json"],
        "plots": ["reports/evaluate/scatter.png", "reports/evaluate/never_written.png"],
    },
}}
DVC_LOCK = {"schema": "2.0", "stages": {"make_data": {"cmd": "true", "outs": [
    {"path": "data/a", "hash": "md5", "md5": "0123456789abcdef0123456789abcdef.dir", "size": 3 * 1024 * 1024,
     "nfiles": 7},
    {"path": "reports/make_data/metrics.json", "hash": "md5", "md5": "ffffffffffffffffffffffffffffffff", "size": 40},
]}}}
MAKE_DATA_METRICS = {"cases": 4, "overall": {"psnr": 21.25, "ssim": 0.5}, "sites": ["a", "b"]}
EVALUATE_METRICS = {"style_accuracy": 0.95, "content_accuracy": 0.5,
                    "probes": [{"fold": 0, "acc": 0.75, "null_p95": 0.55}],
                    "note": "a|b <i>"}


def _png(path: Path, width_in: float, points: int) -> None:
    fig = plt.figure(figsize=(width_in, 1.5))
    fig.gca().plot(range(points), [i * i for i in range(points)])
    save_figure(fig, path)


@pytest.fixture
def synthetic_project(tmp_path: Path) -> Path:
    """``<tmp>/project`` as two stages left it: metrics, figures, a history CSV, dvc.lock, one timing."""
    root = tmp_path / "project"
    (root / "reports" / "make_data").mkdir(parents=True)
    (root / "reports" / "evaluate").mkdir(parents=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (root / "dvc.lock").write_text(yaml.safe_dump(DVC_LOCK, sort_keys=False))
    (root / "params.yaml").write_text("{}\n")
    (root / "reports/make_data/metrics.json").write_text(json.dumps(MAKE_DATA_METRICS))
    (root / "reports/evaluate/metrics.json").write_text(json.dumps(EVALUATE_METRICS))
    (root / "reports/make_data/history.csv").write_text("step,loss\n1,2.0\n2,1.5\n")
    _png(root / "reports/make_data/curve.png", 3.0, 5)
    _png(root / "reports/evaluate/scatter.png", 6.0, 50)  # the larger of the two files
    StageTiming("make_data", 312.5, "2026-11-25T10:00:00+00:00", True).write(root / "reports")
    return root
