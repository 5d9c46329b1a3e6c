"""meduet.dvc_graph: execution order and artifact discovery, from dvc.yaml alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from meduet.dvc_graph import DagError, StageQueue, execution_order, load_stages, parse_stages

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


def _names(stages: list) -> list[str]:
    return [s.name for s in stages]


def test_stage_queue_starts_a_stage_when_its_upstream_is_done_longest_tail_first() -> None:
    text = _dvc_yaml(
        leaf={"cmd": "l", "deps": ["a"], "outs": ["l"]},        # nothing downstream
        a={"cmd": "a", "outs": ["a"]},
        gate={"cmd": "g", "deps": ["a"], "outs": ["g"]},       # two stages downstream
        mid={"cmd": "m", "deps": ["g"], "outs": ["m"]},
        end={"cmd": "e", "deps": ["m", "l"], "outs": ["e"]},
    )
    queue = StageQueue(execution_order(parse_stages(text)))
    assert _names(queue.ready()) == ["a"]
    (a,) = queue.ready()
    queue.start(a)
    assert queue.ready() == []  # started, not finished: nothing downstream may start
    queue.finish(a)
    assert _names(queue.ready()) == ["gate", "leaf"]  # gate gates two stages, leaf one (end)
    gate, leaf = queue.ready()
    queue.start(gate)
    queue.start(leaf)
    queue.finish(leaf)
    assert queue.ready() == [] and not queue.done  # end still waits for mid
    queue.finish(gate)
    (mid,) = queue.ready()
    queue.start(mid)
    queue.finish(mid)
    (end,) = queue.ready()
    queue.start(end)
    queue.finish(end)
    assert queue.done and queue.ready() == []


def test_stage_queue_on_the_pipeline_starts_pretraining_before_the_baselines() -> None:
    stages = load_stages(REPO_ROOT)
    queue = StageQueue(stages)
    for name in ("demo_data", "harmonize", "train_vae", "encode_latents"):
        (stage,) = queue.ready()
        assert stage.name == name
        queue.start(stage)
        queue.finish(stage)
    # pretrain gates factors, synthesis and the sweep; the MAE baseline and the evaluator gate one stage each
    assert _names(queue.ready()) == ["pretrain", "pretrain_mae", "train_evaluator"]


def test_stage_queue_takes_stages_outside_the_plan_as_done() -> None:
    stages = {s.name: s for s in load_stages(REPO_ROOT)}
    queue = StageQueue([stages["finetune"], stages["evaluate_disentanglement"]])  # their upstream not selected
    assert _names(queue.ready()) == ["finetune", "evaluate_disentanglement"]  # both ready at once, in plan order
