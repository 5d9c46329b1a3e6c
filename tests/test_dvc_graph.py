"""meduet.dvc_graph: execution order and artifact discovery, from dvc.yaml alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from meduet.dvc_graph import DagError, execution_order, load_stages, parse_stages

REPO_ROOT = Path(__file__).resolve().parents[1]


def _dvc_yaml(**stages: dict) -> str:
    return yaml.safe_dump({"stages": stages}, sort_keys=False)


def test_repo_pipeline_order_and_artifacts() -> None:
    stages = {s.name: s for s in load_stages(REPO_ROOT)}
    assert list(stages) == ["demo_data", "harmonize", "train_vae", "encode_latents", "pretrain",
                            "extract_factors", "evaluate_disentanglement", "finetune", "pretrain_mae",
                            "train_diffusion", "synthesize", "finetune_sweep", "train_evaluator", "evaluate_synthesis"]
    assert "data/synthesis" in stages["finetune_sweep"].deps  # its synthetic arm trains on style-swapped scans
    assert "data/latents/manifest.csv" in stages["train_evaluator"].deps  # the split, inside an out folder
    assert stages["demo_data"].metrics == ("reports/demo_data/metrics.json",)
    assert stages["demo_data"].plots == ("reports/demo_data/sites.png",)
    assert stages["harmonize"].metrics == ("reports/harmonize/metrics.json",)
    assert stages["harmonize"].plots == ("reports/harmonize/montage.png",)
    assert "data/harmonized" in stages["harmonize"].outs  # {path: {persist: true}} entry
    assert "reports/train_vae/reconstructions.png" in stages["train_vae"].plots
    assert stages["encode_latents"].metrics == ("reports/encode_latents/metrics.json",)


def test_order_follows_data_not_file_order() -> None:
    text = _dvc_yaml(
        report={"cmd": "r", "deps": ["reports/train/metrics.json"]},  # dep on another stage's metrics
        train={"cmd": "t", "deps": ["data/harmonized/manifest.csv"],  # inside an out folder
               "metrics": [{"reports/train/metrics.json": {"cache": False}}]},
        harmonize={"cmd": "h", "deps": ["data"], "outs": [{"data/harmonized": {"persist": True}}]},
        demo={"cmd": "d", "outs": ["data/demo"]},
    )
    # harmonize's dep `data` contains demo's out `data/demo`, so demo must run first.
    assert [s.name for s in execution_order(parse_stages(text))] == ["demo", "harmonize", "train", "report"]


def test_independent_stages_keep_file_order() -> None:
    text = _dvc_yaml(b={"cmd": "b", "outs": ["b"]}, a={"cmd": "a", "outs": ["a"]}, c={"cmd": "c", "deps": ["a"]})
    assert [s.name for s in execution_order(parse_stages(text))] == ["b", "a", "c"]


def test_stage_added_to_dvc_yaml_joins_the_flow(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    doc["stages"]["probe"] = {"cmd": "meduet probe", "deps": ["data/latents"], "outs": ["data/probe"],
                              "plots": [{"reports/probe/umap.png": {"cache": False}}]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    stages = load_stages(tmp_path)
    assert [s.name for s in stages] == ["demo_data", "harmonize", "train_vae", "encode_latents", "pretrain",
                                     "extract_factors", "evaluate_disentanglement", "finetune", "pretrain_mae",
                                     "train_diffusion", "synthesize", "finetune_sweep", "train_evaluator",
                                     "evaluate_synthesis", "probe"]
    assert stages[-1].plots == ("reports/probe/umap.png",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_dvc_yaml(a={"cmd": "a", "deps": ["y"], "outs": ["x"]}, b={"cmd": "b", "deps": ["x"], "outs": ["y"]}), "cycle"),
        (_dvc_yaml(a={"foreach": [1, 2], "do": {"cmd": "a ${item}"}}), "foreach"),
        (_dvc_yaml(a={"deps": ["x"]}), "no cmd"),
        ("stages: [a, b]", "'stages' mapping"),
    ],
)
def test_unusable_dvc_yaml_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(DagError, match=message):
        execution_order(parse_stages(text))
