"""Stage ``demo-data``: multi-center CT-like phantoms with known ground truth.

Outputs (``paths.demo``): one Medical Segmentation Decathlon folder per site
(``<site>/dataset.json``, ``imagesTr/``, ``labelsTr/``) and ``ground_truth.json``.
Reports (``paths.reports/demo_data``): ``metrics.json`` and ``sites.png`` (case 0 at
every site, label contours). See ``meduet.data.demo`` for the layout and
``meduet.data.phantom`` for the label table and the coordinate frame.
"""

from __future__ import annotations

import logging
import time

from meduet.config import DemoDataConfig, Paths
from meduet.data.demo import generate_demo, plot_sites
from meduet.io.atomic import write_json
from meduet.stages import StageResult

log = logging.getLogger(__name__)


def run(cfg: DemoDataConfig, paths: Paths) -> StageResult:
    """Generate the demo dataset; see the module docstring for outputs."""
    start = time.perf_counter()
    log.info("demo-data: %d site(s) x %d case(s) with %d worker(s) -> %s",
             len(cfg.sites), cfg.cases_per_site, cfg.workers, paths.demo)
    summary = generate_demo(
        sites=cfg.sites, seed=cfg.seed, cases_per_site=cfg.cases_per_site, chest_fraction=cfg.chest_fraction,
        lesion_probability=cfg.lesion_probability, body_length_mm=cfg.body_length_mm, out_dir=paths.demo,
        workers=cfg.workers, compression_level=cfg.compression_level,
    )
    report_dir = paths.reports / "demo_data"
    captions = {s.name: f"{s.file_format}, {s.orientation}, {s.kernel}, {s.spacing[0]}x{s.spacing[1]}x{s.spacing[2]} mm"
                for s in cfg.sites}
    figure = plot_sites(summary.previews, report_dir / "sites.png", captions=captions)
    records = summary.records
    metrics = {
        "sites": len(cfg.sites),
        "cases_per_site": cfg.cases_per_site,
        "cases": len(records),
        "chest_cases": sum(r["body_part"] == "chest" for r in records),
        "lesion_cases": sum(r["lesion"]["present"] for r in records),
        "voxels": sum(summary.voxels_per_site.values()),
        "seconds": round(time.perf_counter() - start, 3),
        "per_site": {
            site.name: {"cases": cfg.cases_per_site, "voxels": summary.voxels_per_site[site.name],
                        "worker_seconds": round(summary.seconds_per_site[site.name], 3)}
            for site in cfg.sites
        },
    }
    write_json(report_dir / "metrics.json", metrics)
    outputs = {"demo": paths.demo, "ground_truth": paths.demo / "ground_truth.json",
               "metrics": report_dir / "metrics.json", "sites_png": figure}
    outputs.update({f"dataset_{site.name}": paths.demo / site.name / "dataset.json" for site in cfg.sites})
    log.info("demo-data: %d case(s) in %.1f s", len(records), metrics["seconds"])
    return StageResult("demo_data", outputs, metrics)
