"""Compositional guidance scales against the quality of generated crops.

For each ``(content_scale, style_scale)`` of the grid, the store's trained DiT
(``models/diffusion/dit.pt``) samples ``synthesize.samples_per_site`` crops per site through the
``synthesize`` stage (generated crops only) and ``evaluate-synthesis`` scores them: the overall
evaluator-space Fréchet distance (with its bootstrap interval, in multiples of the real-vs-real
floor), the kernel distance (interval; its real-vs-real floor) and the style accuracy (the
evaluator's site head on each crop, against its target site; Wilson interval). Every setting
samples with the same seeds, so the rows differ by the scales alone. Folders:
``<work>/guidance/c<content>-s<style>/``; table also in ``results.json``.

    python benchmarks/guidance_scales.py [--params params.yaml] [--content 1 2] [--style 1 2 4]
        [--set synthesize.samples_per_site=16 ...]

Needs a store with the trained DiT, the teacher factors and the evaluator (``make run``, or
``dvc repro train_diffusion extract_factors train_evaluator``).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py (this script's folder)
from synthesis_scoring import generation_scores, score_samples

from meduet.config import Paths, load_config
from meduet.io.atomic import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--content", nargs="+", type=float, default=[1.0], help="content_scale values")
    parser.add_argument("--style", nargs="+", type=float, default=[1.0, 2.0, 4.0], help="style_scale values")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.params, args.overrides)
    paths = Paths.resolve(cfg, args.params.resolve().parent)
    rows = []
    for content, style in itertools.product(args.content, args.style):
        start = time.perf_counter()
        metrics = score_samples(cfg, paths, paths.work / "guidance" / f"c{content:g}-s{style:g}",
                                sampling={"content_scale": content, "style_scale": style})
        rows.append({"content_scale": content, "style_scale": style, **generation_scores(metrics),
                     "seconds": time.perf_counter() - start})
    write_json(paths.work / "guidance" / "results.json", {"cpu": cpu_name(), "overrides": args.overrides,
                                                          "rows": rows})
    print(f"CPU: {cpu_name()}; {rows[0]['samples'] if rows else 0} generated crops per setting")
    print(f"{'content':>8}{'style':>7}{'Fréchet (95 % CI)':>26}{'x floor':>9}{'kernel (95 % CI)':>28}{'floor':>8}"
          f"{'style accuracy (95 % CI)':>28}{'s':>6}")
    for r in rows:
        lo, hi = r["fd_ci95"]
        klo, khi = r["kid_ci95"]
        slo, shi = r["style_accuracy_ci95"]
        print(f"{r['content_scale']:>8g}{r['style_scale']:>7g}{r['fd']:>10.1f} ({lo:6.1f}-{hi:6.1f}){r['ratio']:>9.1f}"
              f"{r['kid']:>10.2f} ({klo:7.2f} to {khi:7.2f}){r['kid_floor']:>8.2f}"
              f"{r['style_accuracy']:>14.2f} ({slo:.2f}-{shi:.2f}){r['seconds']:>6.0f}")


if __name__ == "__main__":
    main()
