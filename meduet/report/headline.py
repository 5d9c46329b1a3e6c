"""The headline table: a few metrics by name, each with its goal where one is written down.

``HEADLINES`` is the declarative list: ``(stage, key path into the stage's metrics file,
label, goal)``. A key a stage does not (yet) write shows as "—" and is not judged, so the
list may name metrics before every stage reports them. A goal's bound is a number, or
another metric of the same stage plus an offset (a permutation null's 95th percentile,
chance + 0.10); a bound the stage did not compute leaves the row unjudged. Goals are only
those written down, each with where: ``GOAL_SOURCES``. A metric without one is context.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MISSING_TEXT = "—"
GOAL_SOURCES = {
    "README": "README.md, 'Disentanglement on the demo data'",
    "issue": "the disentanglement issue's targets",
    "analysis": "the analysis issue's goals (all labels: large organs; one labelled subject per site; unseen sites)",
    "synthesis": "the synthesis issue's goals on the demo",
}


@dataclass(frozen=True)
class Goal:
    """``value <op> bound``: ``Goal(">=", 0.9)``, or ``Goal("<=", ref="null_p95", ref_label="null p95")``.

    Args:
        op: ``">="`` or ``"<="``.
        threshold: a fixed bound; or
        ref: a dotted key of the same stage's metrics whose value, plus ``offset``, is the bound.
        ref_label: how the goal names ``ref`` (``"chance"``).
        source: a key of ``GOAL_SOURCES``: where the goal is written.
    """

    op: str
    threshold: float | None = None
    ref: str | None = None
    offset: float = 0.0
    ref_label: str = ""
    source: str = "README"

    def __post_init__(self) -> None:
        if self.op not in (">=", "<="):
            raise ValueError(f"goal op must be '>=' or '<=', got {self.op!r}")
        if (self.threshold is None) == (self.ref is None):
            raise ValueError("a goal needs exactly one of threshold or ref")
        if self.source not in GOAL_SOURCES:
            raise ValueError(f"goal source must be one of {sorted(GOAL_SOURCES)}, got {self.source!r}")

    def bound(self, documents: Sequence[Any]) -> float | None:
        """The number to compare with; None when ``ref`` is not in ``documents`` as a number."""
        if self.threshold is not None:
            return self.threshold
        value = _first(documents, self.ref or "")
        return float(value) + self.offset if _is_number(value) and not math.isnan(value) else None

    def met(self, value: float, bound: float) -> bool:
        return value >= bound if self.op == ">=" else value <= bound

    def describe(self, bound: float | None) -> str:
        """``≥ 0.90``; ``≤ null p95 (0.41)``; ``≤ chance + 0.10 (not computed)``."""
        sign = "≥" if self.op == ">=" else "≤"
        if self.threshold is not None:
            return f"{sign} {self.threshold:.2f}"
        offset = f" {'+' if self.offset >= 0 else '-'} {abs(self.offset):.2f}" if self.offset else ""
        name = self.ref_label or self.ref
        return f"{sign} {name}{offset} ({'not computed' if bound is None else f'{bound:.2f}'})"


@dataclass(frozen=True)
class Headline:
    """One headline metric: ``key`` is a dotted path into ``stage``'s metrics (``overall.psnr``)."""

    stage: str
    key: str
    label: str
    goal: Goal | None = None
    digits: int = 3
    interval: str | None = None  # dotted key of its 95 % interval [low, high], shown after the value


EVAL = "evaluate_disentanglement"
SWEEP = "finetune_sweep"
SYNTHESIS = "evaluate_synthesis"
HEADLINES: tuple[Headline, ...] = (
    Headline("train_vae", "overall.psnr", "VAE reconstruction PSNR (dB)", digits=1, interval="overall.psnr_ci95"),
    Headline("train_vae", "overall.ssim", "VAE reconstruction SSIM", digits=2, interval="overall.ssim_ci95"),
    Headline("train_vae", "overall.mae_raw", "VAE reconstruction MAE (raw units, HU for CT)", digits=1,
             interval="overall.mae_raw_ci95"),
    Headline(EVAL, "style_accuracy", "site from style (probe accuracy)", Goal(">=", 0.95, source="issue"),
             interval="style_ci95"),
    Headline(EVAL, "content_accuracy", "site from content (probe accuracy)",
             Goal("<=", ref="content_null_p95", ref_label="permutation null p95", source="issue"),
             interval="content_ci95"),
    Headline(EVAL, "content_p_value", "site from content: permutation p-value"),
    Headline(EVAL, "region_content_accuracy", "site from content, shared anatomical region",
             Goal("<=", ref="region_content_null_p95", ref_label="permutation null p95", source="issue"),
             interval="region_content_ci95"),
    Headline(EVAL, "retrieval_content_top1", "same subject across sites by content (top-1)",
             Goal(">=", 0.90, source="issue"), interval="retrieval_content_ci95"),
    Headline(EVAL, "retrieval_style_top1", "same subject across sites by style (top-1)",
             Goal("<=", ref="probes.retrieval_style.chance", offset=0.10, ref_label="chance", source="issue")),
    Headline(EVAL, "swap_accuracy", "swap: style nearer B's round trip than A's", Goal(">=", 0.80)),
    Headline(EVAL, "swap.content_closer_to_a_roundtrip", "swap: content stays nearer A's round trip"),
    Headline(EVAL, "counterfactual_closer_than_a", "counterfactual: swap nearer B's scan than A's",
             Goal(">=", 0.80, source="issue"), interval="counterfactual_closer_than_a_ci95"),
    Headline(EVAL, "counterfactual_closer_than_roundtrip",
             "counterfactual: swap nearer B's scan than A's own decoder round trip"),
    Headline(EVAL, "latent_statistics_accuracy", "site from latent mean/std (input baseline)"),
    Headline(EVAL, "chance", "chance (1 / sites)"),
    Headline("finetune", "dice.mean", "segmentation: held-out mean Dice (all labels, MeDUET init)",
             interval="dice.ci95"),
    Headline("finetune", "hd95.mean", "segmentation: held-out mean HD95 (mm)", digits=1, interval="hd95.ci95"),
    Headline("finetune", "large_organ_dice_all_labels", "segmentation: large organs' mean Dice (all labels)",
             Goal(">=", 0.85, source="analysis"), interval="large_organs.ci95"),
    Headline(SWEEP, "label_efficiency.1.meduet_minus.scratch.mean", "1 label per site: Dice MeDUET - scratch",
             Goal(">=", 0.05, source="analysis"), interval="label_efficiency.1.meduet_minus.scratch.ci95"),
    Headline(SWEEP, "label_efficiency.1.meduet_minus.mae.mean", "1 label per site: Dice MeDUET - MAE",
             Goal(">=", 0.02, source="analysis"), interval="label_efficiency.1.meduet_minus.mae.ci95"),
    Headline(SWEEP, "label_efficiency.1.meduet+synth_minus.meduet.mean",
             "1 label per site: Dice with style-swapped translations - without (synthetic arm)",
             interval="label_efficiency.1.meduet+synth_minus.meduet.ci95"),
    Headline(SWEEP, "goals.loso_meduet_beats_scratch_on_every_site.won",
             "unseen sites where MeDUET (with the style bank) beats scratch (leave one site out)",
             Goal(">=", ref="goals.loso_meduet_beats_scratch_on_every_site.of", ref_label="every site",
                  source="analysis")),
    Headline(SYNTHESIS, "content.ratio_to_roundtrip", "synthesis: translations' organ Dice / A's VAE round trip's",
             Goal(">=", 0.9, source="synthesis"), interval="content.ratio_to_roundtrip_ci95"),
    Headline(SYNTHESIS, "translation_style_accuracy", "synthesis: translations read as the target site",
             Goal(">=", 0.9, source="synthesis"), interval="translation_style_accuracy_ci95"),
    Headline(SYNTHESIS, "counterfactual.closer_than_baselines",
             "synthesis: translations nearer the real s@B than s@A and s@A histogram-matched",
             Goal(">=", 0.8, source="synthesis"), interval="counterfactual.closer_than_baselines_ci95"),
    Headline(SYNTHESIS, "generation.frechet_distance.overall.ratio",
             "synthesis: generated crops' Fréchet distance / the real-vs-real floor",
             Goal("<=", 2.0, source="synthesis"), digits=1,
             interval="generation.frechet_distance.overall.ratio_ci95"),
    # the bound on the row above: a generator that reproduced the real latents would score this
    Headline(SYNTHESIS, "generation.frechet_distance_vae_roundtrip.overall.ratio",
             "synthesis: the VAE's round trips of real crops, Fréchet distance / floor", digits=1),
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


def _first(documents: Sequence[Any], dotted: str) -> Any:
    """The value at ``dotted`` in the first of ``documents`` that has it, else ``MISSING``."""
    return next((v for v in (lookup(doc, dotted) for doc in documents) if v is not MISSING), MISSING)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class HeadlineRow:
    """A headline metric as found: ``value`` is ``MISSING`` when the stage did not write it,
    ``bound`` None when the goal's bound could not be computed (or there is no goal)."""

    headline: Headline
    value: Any
    bound: float | None = None
    interval: Any = None  # [low, high] or None

    @property
    def status(self) -> str:
        """``met`` / ``missed`` against the goal; empty without a goal, a bound or a numeric value."""
        goal, value = self.headline.goal, self.value
        if goal is None or self.bound is None or not _is_number(value) or math.isnan(value):
            return ""
        return "met" if goal.met(float(value), self.bound) else "missed"

    @property
    def value_text(self) -> str:
        if self.value is MISSING or self.value is None:
            return MISSING_TEXT
        if isinstance(self.value, float):
            text = f"{self.value:.{self.headline.digits}f}"
            if isinstance(self.interval, list) and len(self.interval) == 2 and all(map(_is_number, self.interval)):
                text += f" [{self.interval[0]:.{self.headline.digits}f}, {self.interval[1]:.{self.headline.digits}f}]"
            return text
        return str(self.value)

    @property
    def goal_text(self) -> str:
        return self.headline.goal.describe(self.bound) if self.headline.goal else ""

    @property
    def source(self) -> str:
        return self.headline.goal.source if self.headline.goal else ""


def headline_rows(metrics: Mapping[str, Sequence[Any]],
                  headlines: Sequence[Headline] = HEADLINES) -> list[HeadlineRow]:
    """Each headline's value, looked up in its stage's metrics documents (first one that has the key).

    Args:
        metrics: stage name -> the parsed metrics files ``dvc.yaml`` declares for it.
        headlines: what to show, in order.
    """
    rows = []
    for headline in headlines:
        documents = metrics.get(headline.stage, ())
        bound = headline.goal.bound(documents) if headline.goal else None
        interval = _first(documents, headline.interval) if headline.interval else None
        rows.append(HeadlineRow(headline, _first(documents, headline.key), bound,
                                None if interval is MISSING else interval))
    return rows


def headline_text(rows: Sequence[HeadlineRow]) -> str:
    """The headline as an aligned plain-text table, for a terminal."""
    table = [("metric", "value", "goal", "status")]
    table += [(r.headline.label, r.value_text, r.goal_text, r.status) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
