"""The flow's pure pieces: artifact rendering, stage selection, DVC output reading, schedules, the report."""

from __future__ import annotations

import base64
import json
import logging
import re
import urllib.error
from pathlib import Path

import pytest

from flows import pipeline
from flows.deploy import deployment_settings
from flows.pipeline import artifact_key, metrics_table, plot_markdown, repro_outcome, select_stages
from flows.run_local import report_results
from flows.serve import schedules
from meduet.config import OrchestrationConfig
from meduet.dvc_graph import Stage
from meduet.report import build_report, sources

PNG_1x1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def test_metrics_table_flattens_nested_metrics(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"cases": 4, "qa": {"failed": 0, "sites": [{"name": "a", "snr": 3.5}]}, "ok": True}))
    assert metrics_table(path) == [
        {"metric": "cases", "value": 4},
        {"metric": "qa.failed", "value": 0},
        {"metric": "qa.sites.0.name", "value": "a"},
        {"metric": "qa.sites.0.snr", "value": 3.5},
        {"metric": "ok", "value": True},
    ]


def test_plot_markdown_embeds_small_images_and_links_large_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "montage.png"
    path.write_bytes(PNG_1x1)
    embedded = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)\)", plot_markdown(path, "montage"))
    assert embedded and base64.b64decode(embedded.group(1)) == PNG_1x1
    monkeypatch.setattr(sources, "MAX_EMBEDDED_IMAGE_BYTES", 10)
    assert "base64" not in plot_markdown(path, "montage") and str(path) in plot_markdown(path, "montage")


@pytest.mark.parametrize(
    ("stage", "path", "key"),
    [("demo_data", "reports/demo_data/metrics.json", "demo-data-metrics"),
     ("harmonize", "reports/harmonize/montage.png", "harmonize-montage")],
)
def test_artifact_keys_are_valid_prefect_keys(stage: str, path: str, key: str) -> None:
    assert artifact_key(stage, path) == key


def test_select_stages_keeps_dag_order_and_rejects_unknown_names() -> None:
    stages = [Stage(n, "true", (), (), (), ()) for n in ("a", "b", "c")]
    assert [s.name for s in select_stages(stages, ["c", "a"])] == ["a", "c"]
    assert select_stages(stages, None) == stages
    with pytest.raises(ValueError, match="unknown stage"):
        select_stages(stages, ["a", "nope"])


@pytest.mark.parametrize(
    ("output", "outcome"),
    [("Running stage 'harmonize':\n> meduet harmonize", "ran"),
     ("Stage 'harmonize' didn't change, skipping", "unchanged"),
     ("Stage 'harmonize' is cached - skipping run, checking out outputs", "restored")],
)
def test_repro_outcome(output: str, outcome: str) -> None:
    assert repro_outcome("harmonize", output.splitlines()) == outcome


def test_schedules_from_orchestration_params() -> None:
    assert schedules(OrchestrationConfig(cron=None)) == []
    (cron,) = schedules(OrchestrationConfig(cron="0 3 * * 0", timezone="Europe/Paris"))
    assert cron.cron == "0 3 * * 0" and cron.timezone == "Europe/Paris"


def test_prefect_yaml_build_step_reads_the_schedule_from_params_and_checks_the_name(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(
        "orchestration: {deployment_name: nightly, cron: '0 1 * * *', timezone: Europe/Paris}\n")
    settings = deployment_settings("nightly", project_dir=str(tmp_path))
    assert settings == {"project_dir": str(tmp_path.resolve()), "params": "params.yaml", "cron": "0 1 * * *",
                        "timezone": "Europe/Paris", "scheduled": True}
    with pytest.raises(ValueError, match="names the deployment 'nightly'"):
        deployment_settings("full-pipeline", project_dir=str(tmp_path))
    (tmp_path / "params.yaml").write_text("orchestration: {deployment_name: nightly, cron: null}\n")
    assert deployment_settings("nightly", project_dir=str(tmp_path))["scheduled"] is False  # registered, inactive


def test_publish_report_writes_the_html_and_the_markdown_artifact(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    (project / "reports" / "probe").mkdir(parents=True)
    (project / "dvc.yaml").write_text(json.dumps({"stages": {"probe": {
        "cmd": "true", "metrics": ["reports/probe/metrics.json"], "plots": ["reports/probe/umap.png"]}}}))
    (project / "reports/probe/metrics.json").write_text(json.dumps({"style_accuracy": 0.5}))
    (project / "reports/probe/umap.png").write_bytes(PNG_1x1)
    published: list[dict] = []
    monkeypatch.setattr(pipeline, "create_markdown_artifact", lambda **kwargs: published.append(kwargs))
    monkeypatch.setattr(pipeline, "get_run_logger", lambda: logging.getLogger("test"))

    path = pipeline.publish_report.fn(str(project), str(project / "reports"), {"probe": "unchanged"})

    assert path == str(project / "reports" / "index.html") and Path(path).is_file()
    (artifact,) = published
    assert artifact["key"] == pipeline.REPORT_ARTIFACT_KEY == "results-report"
    markdown = artifact["markdown"]
    assert "| probe | unchanged |" in markdown and "| style_accuracy | 0.5 |" in markdown
    assert f"![reports/probe/umap.png](data:image/png;base64,{base64.b64encode(PNG_1x1).decode()})" in markdown


def test_make_run_ends_with_the_headline_and_the_report_path(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "dvc.yaml").write_text(json.dumps({"stages": {"evaluate_disentanglement": {
        "cmd": "true", "metrics": ["reports/evaluate_disentanglement/metrics.json"]}}}))
    (tmp_path / "reports/evaluate_disentanglement").mkdir(parents=True)
    (tmp_path / "reports/evaluate_disentanglement/metrics.json").write_text(json.dumps({"style_accuracy": 0.97}))
    report_results(tmp_path, "params.yaml")
    assert f"not written ({tmp_path / 'reports' / 'index.html'} is missing)" in capsys.readouterr().out

    build_report(tmp_path)
    report_results(tmp_path, "params.yaml")
    out = capsys.readouterr().out
    assert re.search(r"site from style \(probe accuracy\) +0\.970 +≥ 0\.95 +met", out)
    assert out.rstrip().endswith(f"Results report: {tmp_path / 'reports' / 'index.html'}")


def test_http_json_retries_a_busy_server_and_gives_up_on_other_errors(monkeypatch) -> None:
    import http.server
    import threading

    from flows import local

    monkeypatch.setattr(local.time, "sleep", lambda _: None)
    answers = iter([503, 503, 200, 404])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            code = next(answers)
            body = b'{"ok": true}' if code == 200 else b"{}"
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/x"
    try:
        assert local.http_json("POST", url, {}) == {"ok": True}  # two 503s, then the answer
        with pytest.raises(urllib.error.HTTPError, match="404"):
            local.http_json("POST", url, {})  # not a busy server: no retry
    finally:
        server.shutdown()


@pytest.mark.parametrize(("line", "percent"), [
    ("2026-11-26 06:51:53,720 INFO meduet.progress: synthesize: 11/44 images (25%), 0.03 images/s, 19m46s left", 25.0),
    ("\x1b[36m(RayTrainWorker pid=2797)\x1b[0m train_diffusion: 1500/1500 steps (100%), 25.47 steps/s, done, "
     "total 0.1631", 100.0),
    ("encode-latents: 0/16 cases (0%), 0.00 cases/s", 0.0),
    ("(RayTrainWorker pid=1) finetune_sweep[2/4]: 150/300 steps (50%), 4.1 steps/s", 37.5),
    ("finetune_sweep[3/3]: 300/300 steps (100%), done", 100.0),
    ("finetune_sweep: 1/3 cells (33%), 0.01 cells/s", 33.0),
    ("harmonize:  31%|███▏      | 5/16 [00:02<00:04,  2.40case/s]", 31.0),  # the data stages' tqdm bar
    ("demo-data: 100%|██████████| 16/16 [00:12<00:00,  1.30case/s]", 100.0),
    ("site_a: 12%| of the volume is lung", None),
    ("Running stage 'train_vae':", None),
    ("site_a: 12/16 ok", None),
])
def test_progress_lines_are_read_from_any_prefix(line: str, percent: float | None) -> None:
    assert pipeline.progress_percent(line) == percent


def test_stage_progress_only_moves_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    updates: list[float] = []
    monkeypatch.setattr(pipeline, "create_progress_artifact", lambda **kwargs: "id")
    monkeypatch.setattr(pipeline, "update_progress_artifact", lambda artifact, progress: updates.append(progress))
    progress = pipeline.StageProgress("train_vae")
    for line in ["train_vae: 30/600 steps (5%)", "noise", "train_vae: 60/600 steps (10%)",
                 "eval: 1/10 cases (10%)", "eval: 2/10 cases (20%)", "train_vae: 90/600 steps (15%)"]:
        progress.line(line)
    progress.finish()
    assert updates == [5.0, 10.0, 20.0, 100.0]


def test_a_stage_of_several_runs_is_not_done_when_its_first_run_is(monkeypatch: pytest.MonkeyPatch) -> None:
    updates: list[float] = []
    monkeypatch.setattr(pipeline, "create_progress_artifact", lambda **kwargs: "id")
    monkeypatch.setattr(pipeline, "update_progress_artifact", lambda artifact, progress: updates.append(progress))
    progress = pipeline.StageProgress("finetune_sweep")
    for line in ["finetune_sweep[1/2]: 150/300 steps (50%)", "finetune_sweep[1/2]: 300/300 steps (100%)",
                 "finetune_sweep: 1/2 cells (50%)", "finetune_sweep[2/2]: 30/300 steps (10%)"]:
        progress.line(line)
    assert updates == [25.0, 50.0, 55.0]
