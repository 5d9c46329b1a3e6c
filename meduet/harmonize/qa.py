"""Quality assurance of a harmonized dataset: per-site fingerprint, montage, report."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from meduet.harmonize.manifest import CaseRecord
from meduet.io.atomic import write_text
from meduet.io.figures import plt, save_figure


def _summary(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"min": float(arr.min()), "median": float(np.median(arr)), "max": float(arr.max())}


def fingerprint(records: list[CaseRecord]) -> dict[str, dict]:
    """Per-domain statistics of the usable cases: spacing, sizes, raw foreground intensity."""
    by_domain: dict[str, list[CaseRecord]] = defaultdict(list)
    for record in records:
        if record.status == "ok":
            by_domain[record.domain].append(record)
    result = {}
    for domain, rows in sorted(by_domain.items()):
        spacing = np.array([r.orig_spacing for r in rows])
        entry = {
            "cases": len(rows),
            "datasets": sorted({r.dataset for r in rows}),
            "orientations": sorted({r.orig_orientation for r in rows}),
            "spacing_x_mm": _summary(spacing[:, 0].tolist()),
            "spacing_y_mm": _summary(spacing[:, 1].tolist()),
            "spacing_z_mm": _summary(spacing[:, 2].tolist()),
            "out_voxels": _summary([float(np.prod(r.out_size)) for r in rows]),
        }
        for key in ("intensity_mean", "intensity_std", "intensity_p01", "intensity_p50", "intensity_p99"):
            values = [getattr(r, key) for r in rows if getattr(r, key) is not None]
            if values:
                entry[key] = _summary(values)
        result[domain] = entry
    return result


def _overlay(ax: plt.Axes, image: np.ndarray, label: np.ndarray | None, title: str,
             value_range: tuple[float, float]) -> None:
    """Image in grey over its harmonized range, each label's outline in its own colour (outlines keep it readable)."""
    ax.imshow(image, cmap="gray", vmin=value_range[0], vmax=value_range[1], interpolation="nearest")
    if label is not None:
        colours = plt.get_cmap("tab20")
        for value in np.unique(label):
            if value:
                ax.contour(label == value, levels=[0.5], colors=[colours(int(value) % 20)], linewidths=0.7)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def montage(records: list[CaseRecord], harmonized_dir: Path, target: Path) -> Path | None:
    """PNG with one case per domain: axial and coronal mid slices with the label overlaid.

    Slices are shown in radiological convention (patient's right on the viewer's left,
    anterior / superior at the top).
    """
    first: dict[str, CaseRecord] = {}
    for record in sorted(records, key=lambda r: r.key):
        if record.status == "ok":
            first.setdefault(record.domain, record)
    if not first:
        return None
    fig, axes = plt.subplots(2, len(first), figsize=(3.0 * len(first), 6.0), squeeze=False)
    for column, (domain, record) in enumerate(sorted(first.items())):
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(harmonized_dir / record.image)))  # (D, H, W)
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(harmonized_dir / record.label))) if record.label else None
        z, y = image.shape[0] // 2, image.shape[1] // 2
        # RAS arrays: axis order (z, y, x) with x → right, y → anterior; flip both in-plane
        # axes for radiological display, and z so superior is at the top of the coronal view.
        axial = image[z][::-1, ::-1]
        coronal = image[:, y, :][::-1, ::-1]
        value_range = (record.window[2], record.window[3]) if record.window else (0.0, 1.0)
        _overlay(axes[0, column], axial, None if label is None else label[z][::-1, ::-1],
                 f"{domain}\n{record.case_id} axial", value_range)
        _overlay(axes[1, column], coronal, None if label is None else label[:, y, :][::-1, ::-1], "coronal",
                 value_range)
    fig.tight_layout()
    return save_figure(fig, target)


def report(records: list[CaseRecord], metrics: dict, target: Path) -> Path:
    """Markdown report: counts per dataset and every quarantined case with its reason."""
    lines = ["# Harmonization report", "",
             f"{metrics['ok']} of {metrics['cases']} case(s) harmonized, {metrics['quarantined']} quarantined, "
             f"{metrics['reused']} reused from an earlier run.", "",
             "| dataset | domain | ok | quarantined |", "|---|---|---|---|"]
    per_dataset: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for record in records:
        per_dataset[(record.dataset, record.domain)][record.status != "ok"] += 1
    for (dataset, domain), (ok, bad) in sorted(per_dataset.items()):
        lines.append(f"| {dataset} | {domain} | {ok} | {bad} |")
    quarantined = [r for r in records if r.status != "ok"]
    if quarantined:
        lines += ["", "## Quarantined", "", "| case | reason |", "|---|---|"]
        lines += [f"| {r.key} | {r.reason.replace('|', '/')} |" for r in sorted(quarantined, key=lambda r: r.key)]
    return write_text(target, "\n".join(lines) + "\n")
