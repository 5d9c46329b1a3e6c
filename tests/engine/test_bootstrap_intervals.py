"""Bootstrap intervals of reported means: one value per volume, or many (organs) per volume resampled together."""

import numpy as np

from meduet.engine.finetune_runs import summarize
from meduet.engine.metrics import grouped_mean_ci95, mean_ci95


def test_a_cases_organs_are_resampled_together_not_as_independent_draws() -> None:
    case_means = [0.55, 0.62, 0.70, 0.81]
    values = [m for m in case_means for _ in range(13)]  # 13 organs per case, each at its case's mean
    cases = [f"case_{k}" for k in range(4) for _ in range(13)]
    grouped = grouped_mean_ci95(values, cases)
    per_case = mean_ci95(case_means)
    naive = mean_ci95(values)  # 52 "independent" scores: far too narrow
    assert grouped[0] <= np.mean(values) <= grouped[1]
    np.testing.assert_allclose(grouped, per_case, atol=0.02)  # equal organ counts: the mean of the case means
    assert grouped[1] - grouped[0] > 2 * (naive[1] - naive[0])


def test_intervals_need_two_groups_with_a_spread() -> None:
    assert grouped_mean_ci95([0.5, 0.7], ["a", "a"]) is None
    assert grouped_mean_ci95([0.5, 0.5], ["a", "b"]) is None
    assert grouped_mean_ci95([], []) is None
    assert mean_ci95([0.5]) is None


def test_segmentation_summary_gives_each_overall_mean_an_interval_over_cases() -> None:
    rows = [{"case": case, "site": site, "organ": organ, "dice": dice, "hd95": hd95, "surface_dice": dice}
            for case, site, shift in (("a1", "a", 0.0), ("b1", "b", 0.2), ("c1", "c", 0.1))
            for organ, dice, hd95 in (("liver", 0.6 + shift, 5.0 + 10 * shift), ("spleen", 0.3 + shift, None))]
    summary = summarize(rows)
    low, high = summary["dice"]["ci95"]
    assert low <= summary["dice"]["mean"] <= high and high - low > 0.05
    low, high = summary["hd95"]["ci95"]  # over the organs that were predicted (HD95 defined)
    assert low <= summary["hd95"]["mean"] <= high and summary["hd95"]["missed"] == 3
