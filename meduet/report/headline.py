"""The headline table: a few metrics by name, each with its goal where one is written down.

``HEADLINES`` is the declarative list: ``(stage, key path into the stage's metrics file,
label, goal)``. A key a stage does not (yet) write shows as "—" and is not judged, so the
list may name metrics before every stage reports them. Goals are only those written in
``README.md`` ("Disentanglement on the demo data"); a metric without one is shown for
context, not judged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MISSING_TEXT = "—"
GOAL_SOURCE = "README.md, 'Disentanglement on the demo data'"


@dataclass(frozen=True)
class Goal:
    """``value <op> threshold`` is the goal, e.g. ``Goal(">=", 0.9)``."""

    op: str
    threshold: float

    def __post_init__(self) -> None:
        if self.op not in (">=", "<="):
            raise ValueError(f"goal op must be '>=' or '<=', got {self.op!r}")

    def met(self, value: float) -> bool:
        return value >= self.threshold if self.op == ">=" else value <= self.threshold

    def __str__(self) -> str:
        return f"{'≥' if self.op == '>=' else '≤'} {self.threshold:.2f}"


@dataclass(frozen=True)
class Headline:
    """One headline metric: ``key`` is a dotted path into ``stage``'s metrics (``overall.psnr``)."""

    stage: str
    key: str
    label: str
    goal: Goal | None = None
    digits: int = 3


HEADLINES: tuple[Headline, ...] = (
    Headline("train_vae", "overall.psnr", "VAE reconstruction PSNR (dB)", digits=1),
    Headline("train_vae", "overall.ssim", "VAE reconstruction SSIM", digits=2),
    Headline("train_vae", "overall.mae_raw", "VAE reconstruction MAE (raw units, HU for CT)", digits=1),
    Headline("evaluate_disentanglement", "style_accuracy", "site from style (probe accuracy)", Goal(">=", 0.90)),
    Headline("evaluate_disentanglement", "content_accuracy", "site from content (probe accuracy)", Goal("<=", 0.40)),
    Headline("evaluate_disentanglement", "swap_accuracy", "swap: style nearer B's round trip than A's",
             Goal(">=", 0.80)),
    Headline("evaluate_disentanglement", "swap.content_closer_to_a_roundtrip",
             "swap: content stays nearer A's round trip"),
    Headline("evaluate_disentanglement", "latent_statistics_accuracy",
             "site from latent mean/std (input baseline)"),
    Headline("evaluate_disentanglement", "chance", "chance (1 / sites)"),
)


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def lookup(tree: Any, dotted: str) -> Any:
    """``tree["a"]["b"][0]`` for ``"a.b.0"``; ``MISSING`` when any step is absent."""
    node = tree
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return MISSING
    return node


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class HeadlineRow:
    """A headline metric as found: ``value`` is ``MISSING`` when the stage did not write it."""

    headline: Headline
    value: Any

    @property
    def status(self) -> str:
        """``met`` / ``missed`` against the goal; empty without a goal or a numeric value."""
        goal, value = self.headline.goal, self.value
        if goal is None or not _is_number(value) or math.isnan(value):
            return ""
        return "met" if goal.met(float(value)) else "missed"

    @property
    def value_text(self) -> str:
        if self.value is MISSING or self.value is None:
            return MISSING_TEXT
        if isinstance(self.value, float):
            return f"{self.value:.{self.headline.digits}f}"
        return str(self.value)

    @property
    def goal_text(self) -> str:
        return str(self.headline.goal) if self.headline.goal else ""


def headline_rows(metrics: Mapping[str, Sequence[Any]],
                  headlines: Sequence[Headline] = HEADLINES) -> list[HeadlineRow]:
    """Each headline's value, looked up in its stage's metrics documents (first one that has the key).

    Args:
        metrics: stage name -> the parsed metrics files ``dvc.yaml`` declares for it.
        headlines: what to show, in order.
    """
    rows = []
    for headline in headlines:
        found = (lookup(doc, headline.key) for doc in metrics.get(headline.stage, ()))
        rows.append(HeadlineRow(headline, next((v for v in found if v is not MISSING), MISSING)))
    return rows


def headline_text(rows: Sequence[HeadlineRow]) -> str:
    """The headline as an aligned plain-text table, for a terminal."""
    table = [("metric", "value", "goal", "status")]
    table += [(r.headline.label, r.value_text, r.goal_text, r.status) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
