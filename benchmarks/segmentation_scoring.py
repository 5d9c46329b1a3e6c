"""Scoring a segmented volume (Dice, HD95, surface Dice): the edge distances by KD-tree only, or as the code picks.

``meduet.engine.segmentation.organ_metrics`` finds each edge voxel's nearest edge voxel of the
other mask either by MONAI's KD-tree query or, when an edge set has many voxels for its box,
by SciPy's distance transform (``DENSE_EDGE_SHARE``). This script segments the held-out
volumes with a trained segmenter (the ``finetune`` stage's file by default), then scores each
one both ways, alternating, at 1 and 2 threads: seconds per volume (median and range over the
repeats) and whether every score is identical.

    python benchmarks/segmentation_scoring.py [--params params.yaml] [--model models/finetune/segmenter.pt]
        [--repeats 3]

Needs the store of a ``make run`` (or ``dvc repro finetune``).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from statistics import median

import numpy as np
import SimpleITK as sitk
from machine import describe  # benchmarks/machine.py (this script's folder)

from meduet.artifacts.segmenter import load_segmenter, segmenter_path
from meduet.config import Paths, load_config
from meduet.engine import segmentation
from meduet.engine.finetune_runs import segmentation_data
from meduet.engine.finetune_training import read_case

WAYS = {"kd-tree only": math.inf, "as the code picks": segmentation.DENSE_EDGE_SHARE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", type=Path, help="a segmenter file (default: the finetune stage's)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(args.params)
    paths = Paths.resolve(cfg, Path(args.params).resolve().parent)
    model, _, _ = load_segmenter(args.model or segmenter_path(paths))
    model.eval()
    section = cfg.finetune
    data = segmentation_data(paths, cfg.harmonize, section.label_names)
    classes = list(range(1, len(section.label_names)))
    cases = []
    for record in data.split("held_out"):
        files = data.files(paths, record)
        latent, image, label = read_case(files, data.scale)
        spacing = tuple(float(s) for s in reversed(sitk.ReadImage(files.image).GetSpacing()))
        cases.append((record.key, segmentation.segment_volume(model, latent, image, overlap=section.overlap,
                                                               batch_size=section.window_batch), label, spacing))
    print(describe())
    print(f"{len(cases)} held-out volumes of {cases[0][1].shape}; {len(classes)} classes; {args.repeats} repeats")
    print(f"{'threads':>7} {'edge distances':>18} {'s per volume, median (range)':>30} {'ratio':>6}  scores")
    for threads in (1, 2):
        seconds: dict[str, list[float]] = {way: [] for way in WAYS}
        scores: dict[str, list] = {way: [] for way in WAYS}
        for _ in range(args.repeats):
            for way, share in WAYS.items():
                segmentation.DENSE_EDGE_SHARE = share
                start = time.perf_counter()
                scores[way] = [segmentation.organ_metrics(pred, label, classes, spacing,
                                                          section.surface_tolerance_mm, workers=threads)
                               for _, pred, label, spacing in cases]
                seconds[way].append((time.perf_counter() - start) / len(cases))
        base = median(seconds["kd-tree only"])
        for way in WAYS:
            spread = f"{median(seconds[way]):.2f} ({min(seconds[way]):.2f}-{max(seconds[way]):.2f})"
            same = "identical" if scores[way] == scores["kd-tree only"] else "DIFFER"
            print(f"{threads:>7} {way:>18} {spread:>30} {median(seconds[way]) / base:>6.2f}  {same}")
    print(f"mean Dice of the volumes: {np.mean([v['dice'] for s in scores['kd-tree only'] for v in s.values()]):.3f}")


if __name__ == "__main__":
    main()
