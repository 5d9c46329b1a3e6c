"""The ``meduet`` Prefect flow: run the DVC stages in dependency order, publish what they report, push.

Orchestration only. The stage graph belongs to ``dvc.yaml`` (read by ``meduet.dvc_graph``);
each stage runs as ``dvc repro --single-item <stage>`` so DVC's cache, not Prefect,
decides whether it reruns. Prefect adds what DVC lacks: retries, schedules, logs in one
place, and the stages' metrics and plots as artifacts of the run. The run ends with the
results report (``meduet.report``): ``reports/index.html`` and the markdown artifact
``results-report``.

Served as the deployment ``meduet/<orchestration.deployment_name>`` by ``flows.serve`` (one
process), or registered on a process work pool by ``prefect deploy --all`` (``prefect.yaml``).

One run per project at a time. Two runs interleaving stages would each ``dvc repro`` and
push while the other rewrites the same outputs. Runs of one deployment queue in Prefect
(``serve(limit=1)``; ``concurrency_limit`` 1 with ENQUEUE in ``prefect.yaml``): a scheduled
run firing during a manual one waits for it. What Prefect cannot see, a run of another
deployment or server on the same project (``make run`` beside a cluster worker) or a flow
called by hand, meets the project lock (``meduet.io.locks``, under ``<work>/locks``) and
fails at once, naming the run that holds it; nothing of the holder's is touched.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.runtime import flow_run

from meduet.config import MeduetConfig, Paths, StorageConfig, load_config
from meduet.dvc_graph import Stage, StageQueue, load_stages
from meduet.dvc_remote import configure_remote, default_remote, dvc_executable
from meduet.env import offline_env
from meduet.io.locks import output_lock
from meduet.report import build_report, flatten_metrics, read_metrics
from meduet.report.sources import data_uri, is_image

FLOW_NAME = "meduet"
DVC_PARAMS_FILE = "params.yaml"  # what every cmd in dvc.yaml passes and DVC tracks
REPORT_ARTIFACT_KEY = "results-report"


# --------------------------------------------------------------------------- subprocesses
def stage_env(project_dir: Path) -> dict[str, str]:
    """Offline environment with the project's venv first on PATH (DVC runs ``meduet ...``)."""
    env = offline_env()
    bins = [project_dir / ".venv" / "bin", Path(sys.executable).parent]
    path = [str(b) for b in bins if b.is_dir()] + [env.get("PATH", os.defpath)]
    env["PATH"] = os.pathsep.join(path)
    env["PYTHONUNBUFFERED"] = "1"  # stage logs arrive line by line, not at exit
    env.setdefault("TQDM_MININTERVAL", "5")  # progress bars: a log line every 5 s, not per item
    return env


def stream(args: list[str], cwd: Path, log_line: Any) -> tuple[int, list[str]]:
    """Run ``args``, passing each output line (stdout and stderr) to ``log_line`` as it comes."""
    lines: list[str] = []
    with subprocess.Popen(
        args, cwd=cwd, env=stage_env(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        encoding="utf-8", errors="replace", bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                lines.append(line)
                log_line(line)
    return proc.returncode, lines


def line_logger(logger: Any) -> Any:
    """Log a subprocess line at INFO, or at ERROR/WARNING when DVC marks it so."""

    def log(line: str) -> None:
        level = "error" if line.startswith("ERROR") else "warning" if line.startswith("WARNING") else "info"
        getattr(logger, level)("%s", line)

    return log


def repro_outcome(stage: str, lines: Iterable[str]) -> str:
    """What ``dvc repro`` did with ``stage``, read from its output (informational only)."""
    text = "\n".join(lines)
    if f"Running stage '{stage}'" in text:
        return "ran"
    if f"Stage '{stage}' is cached" in text:
        return "restored"  # DVC's run cache had these exact deps and params
    if f"Stage '{stage}' didn't change" in text:
        return "unchanged"
    return "done"


# A progress line of meduet.engine.progress, wherever it comes from (a Ray worker's prefix and
# colours, a logging prefix): "train_vae: 120/600 steps (20%), ...". A stage made of several runs
# names the run's part of it: "finetune_sweep[2/3]: 150/300 steps (50%)" is half of the second third.
PROGRESS_LINE = re.compile(r"(?P<name>[A-Za-z][\w-]*)(?:\[(?P<part>\d+)/(?P<parts>\d+)\])?: "
                           r"(?P<done>\d+)/(?P<total>\d+) [a-z]+ \((?P<percent>\d+)%\)")
# The data stages' tqdm bar (harmonize, demo-data), each redraw a line of its own (the pipe is read with universal
# newlines): "harmonize:  31%|███▏      | 5/16 [00:02<00:04,  2.40case/s]".
PROGRESS_BAR = re.compile(r"(?P<name>[A-Za-z][\w-]*): +(?P<percent>\d+)%\|[^|]*\| *\d+/\d+ \[")


def progress_percent(line: str) -> float | None:
    """The share of the whole stage (percent) a progress line reports, or None for any other line."""
    match = PROGRESS_LINE.search(line)
    if match is None:
        bar = PROGRESS_BAR.search(line)
        return None if bar is None else float(bar["percent"])
    percent = float(match["percent"])
    if match["part"] is None:
        return percent
    part, parts = int(match["part"]), max(int(match["parts"]), 1)
    return round(100 * (min(part, parts) - 1 + percent / 100) / parts, 1)


class StageProgress:
    """A Prefect progress artifact per stage: 0 at the start, each progress line's share, 100 at the end."""

    def __init__(self, stage: str) -> None:
        self.stage, self.percent = stage, 0.0
        self.artifact = create_progress_artifact(progress=0.0, key=artifact_key(stage, "progress"),
                                                 description=f"{stage}: share of the stage's work done")

    def line(self, line: str) -> None:
        percent = progress_percent(line)
        if percent is not None and percent > self.percent:  # a stage with two phases never moves back
            self.percent = percent
            update_progress_artifact(self.artifact, percent)

    def finish(self) -> None:
        update_progress_artifact(self.artifact, 100.0)


# --------------------------------------------------------------------------- artifacts
def artifact_key(stage: str, path: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes: ``harmonize-montage``."""
    return re.sub(r"[^a-z0-9]+", "-", f"{stage}-{Path(path).stem}".lower()).strip("-")


def metrics_table(path: Path) -> list[dict[str, Any]]:
    """A metrics file (JSON or YAML, nested as DVC allows) as ``metric``/``value`` rows."""
    return [{"metric": name, "value": value} for name, value in flatten_metrics(read_metrics(path))]


def plot_markdown(path: Path, title: str) -> str:
    """Markdown showing a plot: an image is embedded as a data URI (so it survives the
    run's folder), a table-like file is linked; anything too large is linked by path."""
    uri = data_uri(path) if is_image(path) else None
    if uri:
        return f"### {title}\n\n![{title}]({uri})\n"
    return f"### {title}\n\n`{path}` ({path.stat().st_size} bytes)\n"


def _csv_rows(path: Path, limit: int = 200) -> list[dict[str, Any]]:
    with path.open(newline="") as fh:
        dialect = "excel-tab" if path.suffix == ".tsv" else "excel"
        return [row for _, row in zip(range(limit), csv.DictReader(fh, dialect=dialect))]


# --------------------------------------------------------------------------- tasks
@task(name="dvc-repro", cache_policy=NO_CACHE)
def run_stage(project_dir: str, stage: str, force: bool = False, wait_for_lock: bool = False) -> str:
    """``dvc repro --single-item <stage>``; returns ran / unchanged / restored / done.

    ``wait_for_lock``: another stage runs beside this one. DVC holds its repository lock while
    it checks and records a stage, not while the stage's command runs, so two stages meet
    only for those moments; the later one waits instead of failing.
    """
    logger = get_run_logger()
    args = [dvc_executable(), *(["--wait-for-lock"] if wait_for_lock else []), "repro", "--single-item",
            *(["--force"] if force else []), stage]
    logger.info("%s (in %s)", " ".join(args[1:]), project_dir)
    progress, log = StageProgress(stage), line_logger(logger)

    def on_line(line: str) -> None:
        log(line)
        progress.line(line)

    returncode, lines = stream(args, Path(project_dir), on_line)
    if returncode != 0:
        raise RuntimeError(f"dvc repro of stage '{stage}' failed with exit code {returncode}")
    progress.finish()
    return repro_outcome(stage, lines)


@task(name="publish-artifacts", cache_policy=NO_CACHE)
def publish_artifacts(project_dir: str, stage: Stage) -> list[str]:
    """Metrics as table artifacts and plots as markdown artifacts, from dvc.yaml alone."""
    logger = get_run_logger()
    root = Path(project_dir)
    published = []
    for rel in stage.metrics + stage.plots:
        path = root / rel
        if not path.is_file():
            logger.warning("%s declares %s but it does not exist", stage.name, rel)
            continue
        key, description = artifact_key(stage.name, rel), f"{stage.name}: {rel}"
        if rel in stage.metrics:
            create_table_artifact(table=metrics_table(path), key=key, description=description)
        elif path.suffix.lower() in {".csv", ".tsv"}:
            create_table_artifact(table=_csv_rows(path), key=key, description=description)
        else:
            create_markdown_artifact(markdown=plot_markdown(path, rel), key=key, description=description)
        published.append(key)
    return published


@task(name="results-report", cache_policy=NO_CACHE)
def publish_report(project_dir: str, reports_dir: str, outcomes: dict[str, str]) -> str:
    """Write ``reports/index.html`` and publish the same report as the markdown artifact ``results-report``."""
    result = build_report(project_dir, reports_dir=reports_dir, outcomes=outcomes)
    get_run_logger().info("results report: %s\n%s", result.html_path, result.headline_text())
    create_markdown_artifact(markdown=result.markdown, key=REPORT_ARTIFACT_KEY,
                             description=f"MeDUET results report ({result.html_path})")
    return str(result.html_path)


@task(name="dvc-push", cache_policy=NO_CACHE)
def push(project_dir: str, storage: StorageConfig) -> bool:
    """Configure the remote from params/env, then ``dvc push`` if any default remote exists."""
    logger = get_run_logger()
    root = Path(project_dir)
    settings = configure_remote(root, storage)
    if settings is not None:
        logger.info("DVC remote '%s' -> %s (endpoint %s)", settings.name, settings.url, settings.endpoint_url)
    remote = default_remote(root)
    if remote is None:
        logger.info("no DVC remote configured (storage.dvc_remote_url / MEDUET_DVC_REMOTE_URL); not pushing")
        return False
    returncode, _ = stream([dvc_executable(), "push"], root, line_logger(logger))
    if returncode != 0:
        raise RuntimeError(f"dvc push to remote '{remote}' failed with exit code {returncode}")
    return True


# --------------------------------------------------------------------------- flow
@dataclass(frozen=True)
class Slots:
    """What may run side by side: at most ``stages`` stages and, when they start local Rays on
    this machine (``cpus`` its CPU count), only while the CPUs they take (``demand``) fit it."""

    stages: int
    cpus: int | None
    demand: Mapping[str, int]

    def fits(self, stage: str, running: Collection[str]) -> bool:
        """Whether ``stage`` may start beside ``running`` (alone it always may)."""
        if not running:
            return True
        if len(running) >= self.stages:
            return False
        return self.cpus is None or sum(self.demand[name] for name in running) + self.demand[stage] <= self.cpus


def stage_slots(cfg: MeduetConfig, plan: list[Stage], cores: int | None = None) -> Slots:
    """``orchestration.parallel_stages`` stages at once; on one machine each takes its
    ``ray.stage_cpus`` or ``ray.local_num_cpus`` (all when null: it runs alone), so stages never
    oversubscribe the cores (two stages side by side at both of the demo's 2 cores each took
    1.45x as long as the two one after the other; at one core each, 0.70x: README, "Stage
    times of the demo run"). On a cluster (``RAY_ADDRESS``, ``ray.address``) Ray shares its own
    CPUs. ``cores``: this machine's (None: ``os.cpu_count()``); ``benchmarks/stage_schedule.py``
    replays another's."""
    if os.environ.get("RAY_ADDRESS") or cfg.ray.address:
        return Slots(cfg.orchestration.parallel_stages, None, {s.name: 0 for s in plan})
    cores = cores or os.cpu_count() or 1
    demand = {s.name: min(cfg.ray.cpus_for(s.name) or cores, cores) for s in plan}
    return Slots(cfg.orchestration.parallel_stages, cores, demand)


def run_plan(root: Path, plan: list[Stage], *, slots: Slots, force: bool, retrying: dict[str, Any],
             outcome: dict[str, str]) -> list[str]:
    """Run ``plan``'s stages side by side as ``slots`` allow, each when its upstream stages are
    done. The first ready stage (``StageQueue`` order) that does not fit waits for room: the
    ones after it do not overtake it.

    Each finished stage's outcome goes into ``outcome`` as it comes (a report written after a
    failure shows them) and its artifacts are published. After a stage fails, nothing new
    starts, the stages running beside it finish, and the first failure is raised.

    Returns:
        The published artifact keys.
    """
    queue, running = StageQueue(plan), dict[Any, Stage]()  # Prefect future -> its stage
    artifacts: list[str] = []
    failure: Exception | None = None
    while not queue.done and (running or failure is None):
        for stage in queue.ready() if failure is None else []:
            if not slots.fits(stage.name, [s.name for s in running.values()]):
                break
            queue.start(stage)
            task_run = run_stage.with_options(task_run_name=f"dvc-repro-{stage.name}", **retrying)
            running[task_run.submit(str(root), stage.name, force, slots.stages > 1)] = stage
        assert running, "a plan in execution order always has a ready stage"
        finished = next(as_completed(list(running)))
        stage = running.pop(finished)
        try:
            outcome[stage.name] = finished.result()
        except Exception as error:
            failure = failure or error
            continue
        queue.finish(stage)
        artifacts += publish_artifacts.with_options(task_run_name=f"publish-{stage.name}")(str(root), stage)
    if failure is not None:
        raise failure
    return artifacts


def select_stages(stages: list[Stage], names: list[str] | None) -> list[Stage]:
    """The stages named in ``names`` (all when None), kept in execution order."""
    if not names:
        return stages
    known = {s.name for s in stages}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {sorted(known)}")
    return [s for s in stages if s.name in names]


@flow(name=FLOW_NAME, description="MeDUET pipeline: every dvc.yaml stage in dependency order (independent ones "
      "side by side), the results report, dvc push.")
def meduet(
    project_dir: str | None = None,
    params: str = DVC_PARAMS_FILE,
    stages: list[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run the pipeline of ``project_dir`` (default: the current folder).

    Args:
        project_dir: folder holding ``dvc.yaml`` and ``params.yaml``.
        params: params file, relative to ``project_dir``, for the ``orchestration`` and
            ``storage`` settings. The stages themselves read ``params.yaml``: that is the
            file their ``dvc.yaml`` commands name and DVC tracks.
        stages: run only these stages (in dependency order among themselves, upstream not checked).
        force: rerun the stages even if DVC finds them up to date.

    Returns:
        ``{"stages": {name: ran|unchanged|restored|done}, "artifacts": [...], "report": path of
        reports/index.html, "pushed": bool}``. The report is written even when a stage fails
        (showing what exists), before the failure is raised.

    Raises:
        OutputLockedError: another run holds this project (see the module docstring).
    """
    logger = get_run_logger()
    root = Path(project_dir or Path.cwd()).resolve()
    cfg = load_config(root / params)
    paths = Paths.resolve(cfg, root)
    with output_lock(paths.work / "locks", root, owner=f"Prefect flow run '{flow_run.name}' ({flow_run.id})"):
        if Path(params).as_posix() != DVC_PARAMS_FILE:
            logger.warning("stages read %s (as dvc.yaml says); %s only sets orchestration/storage",
                           DVC_PARAMS_FILE, params)
        orchestration = cfg.orchestration
        retrying = {"retries": orchestration.task_retries, "retry_delay_seconds": orchestration.retry_delay_s}
        plan = select_stages(load_stages(root), stages)
        logger.info("stages in order: %s", ", ".join(s.name for s in plan))

        slots = stage_slots(cfg, plan)
        logger.info("stages side by side: at most %d%s", slots.stages,
                    f", while their CPUs fit this machine's {slots.cpus}: {dict(slots.demand)}" if slots.cpus else "")
        outcome: dict[str, str] = {}
        try:
            artifacts = run_plan(root, plan, slots=slots, force=force, retrying=retrying, outcome=outcome)
        finally:
            report = publish_report(str(root), str(paths.reports), outcome)
        pushed = False
        if orchestration.push:
            pushed = push.with_options(task_run_name="dvc-push", **retrying)(str(root), cfg.storage)
        logger.info("stages: %s; pushed: %s", outcome, pushed)
    return {"stages": outcome, "artifacts": artifacts, "report": report, "pushed": pushed}
