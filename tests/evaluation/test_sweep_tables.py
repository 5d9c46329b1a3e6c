"""The sweep's Markdown tables say what its metrics say (a hand-made metrics document: no training)."""

from __future__ import annotations

from meduet.evaluation.sweep_tables import sweep_tables


def _score(mean: float | None, sd: float | None, seeds: int) -> dict:
    return {"mean": mean, "sd": sd, "seeds": seeds}


def _arm(dice: float, sd: float | None, seeds: int = 3) -> dict:
    return {"dice": _score(dice, sd, seeds), "large_organ_dice": _score(dice * 2, sd, seeds),
            "surface_dice": _score(dice / 2, sd, seeds), "hd95": _score(None, None, 0)}


METRICS = {
    "cells": 8, "steps": 300, "held_out_cases": 4,
    "label_efficiency": {"1": {
        "scratch": _arm(0.3371, 0.093), "meduet": _arm(0.3432, 0.0881),
        "meduet_minus": {"scratch": {"mean": 0.0061, "sd": 0.058, "n": 144, "ci95": [-0.0031, 0.0163],
                                     "seed_means": [0.005, 0.013, 0.001], "seed_sd": 0.006},
                         "mae": None}}},
    "leave_one_site_out": {"site_a": {
        "scratch": _arm(0.24, None, 1), "meduet+style": _arm(0.255, None, 1),
        "meduet+style_minus": {"scratch": {"mean": 0.015, "sd": 0.05, "n": 12, "seed_means": [0.015],
                                           "seed_sd": None}}}},
    "unseen_site_cost": {"site_a": {"meduet": {
        "dice": {"seen": 0.6, "unseen": 0.55, "difference": -0.05, "seed_differences": [-0.04, -0.06], "sd": 0.0141},
        "large_organ_dice": {"seen": 0.8, "unseen": 0.7, "difference": -0.1, "seed_differences": [-0.1],
                             "sd": None}}}},
    "goals": {"one_label_meduet_minus_scratch_at_least_0.05": {"value": 0.0061, "met": False},
              "one_label_meduet_minus_mae_at_least_0.02": "not measured",
              "loso_meduet_beats_scratch_on_every_site": {"arm": "meduet+style", "sites": {"site_a": True},
                                                          "met": True},
              "all_labels_large_organ_dice_at_least_0.85": {"value": 0.3428, "target": 0.85, "met": False}},
    "per_cell": [{"protocol": "label_efficiency", "arm": "scratch", "seconds": 100.0},
                 {"protocol": "label_efficiency", "arm": "scratch", "seconds": 140.0},
                 {"protocol": "leave_one_site_out", "arm": "meduet+style", "seconds": 60.0}],
}


def test_tables_carry_means_sds_differences_goals_and_times() -> None:
    text = sweep_tables(METRICS)
    assert "## Label efficiency" in text and "## Leave one site out" in text
    assert "| 1 | meduet | 0.343 ± 0.088 (3) | 0.686 ± 0.088 (3) | 0.172 ± 0.088 (3) | n/a (0) |" in text
    assert "| site_a | scratch | 0.240 (1) |" in text  # one seed: no sd
    assert "| 1 | meduet − scratch | +0.006 | -0.003 to +0.016 | 0.058 (144) | +0.005, +0.013, +0.001 (sd 0.006) |" \
        in text
    assert "meduet − mae" not in text  # no MAE arm: no pair, no row
    assert "| site_a | meduet+style − scratch | +0.015 | n/a | 0.050 (12) | +0.015 |" in text
    assert "| site_a | meduet | mean Dice | 0.600 | 0.550 | -0.050 | -0.040, -0.060 (sd 0.014) |" in text
    assert "| site_a | meduet | large-organ Dice | 0.800 | 0.700 | -0.100 | -0.100 |" in text
    assert "| one_label_meduet_minus_scratch_at_least_0.05 | +0.006 | missed |" in text
    assert "| one_label_meduet_minus_mae_at_least_0.02 |  | not measured |" in text
    assert "| loso_meduet_beats_scratch_on_every_site | site_a: yes | met |" in text
    assert "| all_labels_large_organ_dice_at_least_0.85 | 0.343 | missed |" in text  # a level, not a difference
    assert "| label_efficiency | scratch | 2 | 120 | 100–140 | 4.0 |" in text
    assert "| all |  | 3 | 100 |  | 5.0 |" in text


def test_a_sweep_without_times_or_unseen_sites_leaves_their_tables_out() -> None:
    metrics = {**METRICS, "leave_one_site_out": None, "unseen_site_cost": {},
               "per_cell": [{"protocol": "label_efficiency", "arm": "scratch"}]}
    text = sweep_tables(metrics)
    assert "## Label efficiency" in text
    assert "Leave one site out" not in text and "Time per cell" not in text and "unseen site costs" not in text


def test_a_sweep_written_before_the_large_organ_column_reads_it_as_not_measured() -> None:
    old = {**METRICS, "label_efficiency": {"1": {"meduet": {k: v for k, v in _arm(0.3, None, 1).items()
                                                               if k != "large_organ_dice"}}}}
    assert "| 1 | meduet | 0.300 (1) | n/a (0) | 0.150 (1) | n/a (0) |" in sweep_tables(old)
