"""The fine-tuning sweep's results as Markdown tables, from its ``metrics.json`` alone.

``finetune-sweep`` writes them next to its metrics (``tables.md``) and
``benchmarks/finetune_sweep.py`` prints them, so the README's tables and a reader's check
of them come from one function. Per protocol point (labelled subjects per site, or the
unseen site) and arm: mean ± sd over seeds of Dice, the large organs' Dice (n/a in sweeps
written before it was), surface Dice and HD95; then each MeDUET arm's paired Dice difference
against its baselines (mean, 95 % bootstrap interval, per-seed means); with both protocols,
what leaving a site out costs its held-out cases; then the goals; then time per cell where
the sweep recorded it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

SCORE_COLUMNS = (("dice", "mean Dice", 3), ("large_organ_dice", "large-organ Dice", 3),
                 ("surface_dice", "surface Dice (2 mm)", 3), ("hd95", "HD95 (mm)", 1))


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _mean_sd(score: Mapping[str, Any], digits: int) -> str:
    """``mean ± sd (n seeds)``; the sd only where more than one seed scored."""
    text = _number(score.get("mean"), digits)
    if score.get("sd") is not None:
        text += f" ± {score['sd']:.{digits}f}"
    return f"{text} ({score.get('seeds', 0)})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def _arms(entry: Mapping[str, Any]) -> list[str]:
    return [arm for arm in entry if not arm.endswith("_minus")]


def scores_table(protocol: Mapping[str, Any], point_label: str) -> str:
    """One row per point and arm: each score's mean ± sd over seeds (seeds in brackets)."""
    header = [point_label, "arm", *(f"{label}, mean ± sd (seeds)" for _, label, _ in SCORE_COLUMNS)]
    rows = [[point, arm, *(_mean_sd(entry[arm].get(key, {}), digits) for key, _, digits in SCORE_COLUMNS)]
            for point, entry in protocol.items() for arm in _arms(entry)]
    return _table(header, rows)


def paired_table(protocol: Mapping[str, Any], point_label: str) -> str:
    """One row per point, MeDUET arm and baseline: the paired Dice difference over (seed, case, organ)."""
    header = [point_label, "difference", "mean", "95 % interval", "sd of pairs (n)", "per-seed means (sd)"]
    rows = []
    for point, entry in protocol.items():
        for key in (k for k in entry if k.endswith("_minus")):
            for baseline, diff in entry[key].items():
                if diff is None:
                    continue
                interval = diff.get("ci95")
                seeds = ", ".join(_signed(v) for v in diff.get("seed_means", []))
                seed_sd = "" if diff.get("seed_sd") is None else f" (sd {diff['seed_sd']:.3f})"
                rows.append([point, f"{key.removesuffix('_minus')} − {baseline}", _signed(diff["mean"]),
                             "n/a" if interval is None else f"{interval[0]:+.3f} to {interval[1]:+.3f}",
                             f"{_number(diff.get('sd'), 3)} ({diff['n']})", seeds + seed_sd])
    return _table(header, rows)


def unseen_site_table(cost: Mapping[str, Any]) -> str:
    """Per left-out site and arm: its held-out Dice with every site's labels, left out, and the difference."""
    header = ["unseen site", "arm", "score", "all sites trained", "site left out", "difference", "per seed (sd)"]
    rows = []
    for site, arms in cost.items():
        for arm, scores in arms.items():
            for key, label in (("dice", "mean Dice"), ("large_organ_dice", "large-organ Dice")):
                score = scores[key]
                sd = "" if score.get("sd") is None else f" (sd {score['sd']:.3f})"
                rows.append([site, arm, label, _number(score["seen"], 3), _number(score["unseen"], 3),
                             _signed(score["difference"]),
                             ", ".join(_signed(v) for v in score["seed_differences"]) + sd])
    return _table(header, rows)


def goals_table(goals: Mapping[str, Any]) -> str:
    """Each goal the sweep judges: the measured value (or per-site verdicts) and met / missed."""
    rows = []
    for name, verdict in goals.items():
        if not isinstance(verdict, Mapping):
            rows.append([name, "", str(verdict)])
            continue
        measured = ((_number(verdict["value"], 3) if "target" in verdict else _signed(verdict["value"]))
                    if "value" in verdict else
                    ", ".join(f"{site}: {'yes' if won else 'no'}" for site, won in verdict.get("sites", {}).items()))
        rows.append([name, measured, "met" if verdict.get("met") else "missed"])
    return _table(["goal", "measured", "verdict"], rows)


def timing_table(per_cell: Sequence[Mapping[str, Any]]) -> str | None:
    """Cells and seconds per protocol and arm, where the cells recorded their time (None otherwise)."""
    timed = [c for c in per_cell if c.get("seconds") is not None]
    if not timed:
        return None
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for cell in timed:
        groups[(cell["protocol"], cell["arm"])].append(float(cell["seconds"]))
    rows = [[protocol, arm, str(len(times)), f"{sum(times) / len(times):.0f}", f"{min(times):.0f}–{max(times):.0f}",
             f"{sum(times) / 60:.1f}"] for (protocol, arm), times in groups.items()]
    total = sum(float(c["seconds"]) for c in timed)
    rows.append(["all", "", str(len(timed)), f"{total / len(timed):.0f}", "", f"{total / 60:.1f}"])
    return _table(["protocol", "arm", "cells", "s per cell (mean)", "range", "minutes"], rows)


def sweep_tables(metrics: Mapping[str, Any]) -> str:
    """Every table of one sweep's ``metrics.json``, as Markdown with a heading each."""
    parts = [f"Held-out cases: {metrics.get('held_out_cases')}; fine-tuning steps per cell: {metrics.get('steps')}; "
             f"cells: {metrics.get('cells')}."]
    protocols = (("label_efficiency", "Label efficiency", "labelled subjects per site"),
                 ("leave_one_site_out", "Leave one site out", "unseen site"))
    for key, title, point_label in protocols:
        protocol = metrics.get(key)
        if not protocol:
            continue
        parts += [f"## {title}", scores_table(protocol, point_label),
                  f"### {title}: paired Dice differences", paired_table(protocol, point_label)]
    if metrics.get("unseen_site_cost"):
        parts += ["### Leave one site out: what the unseen site costs (its held-out Dice left out minus with all "
                  "sites' labels; the left-out runs also train on one site fewer)",
                  unseen_site_table(metrics["unseen_site_cost"])]
    if metrics.get("goals"):
        parts += ["## Goals", goals_table(metrics["goals"])]
    timing = timing_table(metrics.get("per_cell", []))
    if timing:
        parts += ["## Time per cell", timing]
    return "\n\n".join(parts) + "\n"
