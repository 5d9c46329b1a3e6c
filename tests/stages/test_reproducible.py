"""Same machine, same params, same inputs: pretrain → extract-factors → evaluate-disentanglement twice, bit for bit.

Two fresh project folders get byte-identical latent caches; every output that carries a
result (weights, factors, metrics) must be identical, so a number that moves between runs
can only come from a change of code, params, data or machine.
"""

import json

import numpy as np
import pytest
import torch

from meduet.config import MeduetConfig, Paths
from meduet.stages import evaluate_disentanglement, extract_factors, pretrain
from tests.stages.test_pretrain import _write_cache


def _run(root) -> Paths:
    cfg = MeduetConfig.model_validate({
        "pretrain": {"steps": 12, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "log_every": 1,
                     "mftd_start_fraction": 0.0, "method": {"recipe": "all"}},
        "extract_factors": {"batch_size": 5},
        "evaluate_disentanglement": {"folds": 3, "permutations": 10, "curve_permutations": 0, "curve_draws": 2,
                                     "window_counts": [1], "swap_pairs": 2, "counterfactual_pairs": 2,
                                     "subject_pattern": r"case(\d+)$", "jobs": 1},
        "ray": {"checkpoint_every": 6, "local_num_cpus": 2, "max_failures": 0},
    })
    paths = Paths.resolve(cfg, root)
    _write_cache(paths.latents, per_domain=3)
    pretrain.run(cfg.pretrain, paths, ray=cfg.ray)
    extract_factors.run(cfg.extract_factors, paths, ray=cfg.ray)
    evaluate_disentanglement.run(cfg.evaluate_disentanglement, paths)
    return paths


@pytest.mark.services
def test_two_runs_in_fresh_folders_are_bit_identical(tmp_path) -> None:
    first, second = _run(tmp_path / "one"), _run(tmp_path / "two")
    saved = [torch.load(p.models / "pretrain" / "meduet.pt", weights_only=True) for p in (first, second)]
    for which in ("student", "teacher"):
        for name, tensor in saved[0][which].items():
            assert torch.equal(tensor, saved[1][which][name]), (which, name)
    factors = [np.load(p.factors / "factors.npz") for p in (first, second)]
    assert set(factors[0].files) == set(factors[1].files)
    for name in factors[0].files:
        np.testing.assert_array_equal(factors[0][name], factors[1][name], err_msg=name)
    for stage in ("pretrain", "evaluate_disentanglement"):
        metrics = [json.loads((p.reports / stage / "metrics.json").read_text()) for p in (first, second)]
        assert metrics[0] == metrics[1], stage
    history = (first.reports / "pretrain" / "history.csv").read_text()
    assert history == (second.reports / "pretrain" / "history.csv").read_text()
    # Every change of pretrain.method ran: its site-free terms are in the history and not zero.
    header, *rows = [line.split(",") for line in history.splitlines()]
    for term in ("clean_content", "clean_style", "decorrelation", "site_alignment"):
        assert any(float(row[header.index(term)]) > 0 for row in rows), term
