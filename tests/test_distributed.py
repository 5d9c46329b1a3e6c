"""meduet.distributed: Ray Train runs of a toy loop (2 CPU workers, gloo), checkpoints,
kill-and-resume, refused checkpoints, metric history; plus the helpers outside Ray.

One local Ray serves the whole module (started once: ~10 s). The toy loop is a tiny
linear regression; its inputs get RNG noise each step so a resume that did not restore
the generators (or the optimizer, or the LR schedule) would not repeat the losses.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
from torch.utils.data import DataLoader, TensorDataset

from meduet import distributed as dist
from meduet.config import MeduetConfig, Paths, RayConfig
from meduet.distributed.driver import TRAIN_POLL_ENV, _ray_temp_dir
from meduet.engine.checkpoint import (CHECKPOINT_FORMAT, STATE_FILE, CheckpointError, ConfigMismatchError,
                                      read_checkpoint)
from meduet.engine.history import write_history_csv
from meduet.engine.rng import capture_rng, restore_rng
from meduet.engine.runs import RUN_MARKER, RunSpec, Scaling

STEPS = 16  # 4 epochs of 4 steps per worker (64 samples, batch 8, 2 workers)
EVERY = 4


# --------------------------------------------------------------------------- the toy loop
def toy_loop(**config: Any) -> None:
    """Linear regression with SGD + momentum + StepLR.

    ``crash_at``: raise before reporting that step, in a run started from scratch only (so
    a retry that resumed from a checkpoint gets past it); ``kill_at``: rank 0's process
    SIGKILLs itself there instead.
    """
    torch.manual_seed(config["seed"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)  # (N, 4)
    y = x @ torch.tensor([[1.5], [-2.0], [0.5], [3.0]]) + 0.25  # (N, 1)
    shuffled = torch.Generator().manual_seed(config["seed"])
    loader = dist.prepare_loader(DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=shuffled))
    model = dist.prepare_model(torch.nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=6, gamma=0.5)

    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    start = dist.resume(**parts)
    Path(config["marker_dir"], f"rank{dist.world_rank()}").write_text(str(dist.world_size()))
    Path(config["marker_dir"], f"threads{dist.world_rank()}").write_text(str(torch.get_num_threads()))

    steps_per_epoch = len(loader)
    step = start
    while step < config["steps"]:
        epoch, skip = divmod(step, steps_per_epoch)
        dist.set_epoch(loader, epoch)
        for i, (xb, yb) in enumerate(loader):
            if i < skip:  # batches this epoch already trained on before the resume
                continue
            xb = xb + 0.05 * torch.randn_like(xb)
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            if step == config.get("crash_at") and start == 0:
                raise RuntimeError(f"simulated crash at step {step}")
            if step == config.get("kill_at") and start == 0 and dist.world_rank() == 0:
                os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies; the driver lives on
            due = dist.checkpoint_due(step, config["steps"])
            checkpoint = dist.training_state(step, **parts) if due else None
            dist.report({"step": step, "loss": loss, "lr": lr, "start_step": start,
                         "world_size": dist.world_size()}, checkpoint)
            if step == config["steps"]:
                break


def loop_config(tmp: Path, **extra: Any) -> dict[str, Any]:
    marker_dir = tmp / "markers"
    marker_dir.mkdir(parents=True, exist_ok=True)
    return {"seed": 7, "steps": STEPS, "marker_dir": str(marker_dir), **extra}


def spec(storage: Path | str, config_hash: str, tmp: Path, **overrides: Any) -> RunSpec:
    fields = dict(stage="toy", config_hash=config_hash, storage=str(storage), checkpoint_every=EVERY,
                  keep_checkpoints=2, max_failures=0, temp_dir=tmp / "ray", local_num_cpus=2,
                  metrics_csv=tmp / "history.csv")
    return RunSpec(**{**fields, **overrides})


TWO_CPU_WORKERS = Scaling(num_workers=2, use_gpu=False, cpus_per_worker=1)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One local Ray (2 CPUs) for the module, stopped at the end."""
    tmp = tmp_path_factory.mktemp("ray")
    dist.ensure_ray(spec(tmp / "results", "unused", tmp))
    yield
    dist.shutdown_ray()


@pytest.fixture(scope="module")
def uninterrupted(ray_local: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[dist.FitResult, Path]:
    """The reference run: STEPS steps without a crash."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    result = dist.fit(toy_loop, loop_config(tmp), TWO_CPU_WORKERS, spec(tmp / "results", "ref0001", tmp))
    return result, tmp


@pytest.fixture(scope="module")
def crashed(ray_local: Any, tmp_path_factory: pytest.TempPathFactory) -> RunSpec:
    """The reference's config crashed at step 10 (no retry): checkpoints 4 and 8 written. Copy it to resume."""
    tmp = tmp_path_factory.mktemp("crashed")
    run = spec(tmp / "results", "ref0001", tmp)
    with pytest.raises(dist.TrainingError, match="simulated crash at step 10"):
        dist.fit(toy_loop, loop_config(tmp, crash_at=10), TWO_CPU_WORKERS, run)
    return run


def _copy_of_crashed(crashed: RunSpec, tmp_path: Path) -> RunSpec:
    """A run of the crashed run's config whose folder is a copy of it (each test resumes its own)."""
    run = spec(tmp_path / "results", crashed.config_hash, tmp_path)
    shutil.copytree(crashed.run_dir, run.run_dir)
    return run


# --------------------------------------------------------------------------- Ray runs
@pytest.mark.services
def test_two_workers_train_report_and_checkpoint(uninterrupted: tuple[dist.FitResult, Path]) -> None:
    result, tmp = uninterrupted
    assert sorted(p.name for p in (tmp / "markers").glob("rank*")) == ["rank0", "rank1"]
    assert all((tmp / "markers" / f"rank{r}").read_text() == "2" for r in (0, 1))
    assert all((tmp / "markers" / f"threads{r}").read_text() == "1" for r in (0, 1))  # one CPU each, one thread

    steps = [row["step"] for row in result.history]
    assert steps == list(range(1, STEPS + 1))
    losses = [row["loss"] for row in result.history]
    assert np.mean(losses[-4:]) < 0.2 * np.mean(losses[:4])
    assert result.metrics["step"] == STEPS

    # Checkpoints every EVERY steps, the last keep_checkpoints=2 kept, named by step.
    run_dir = Path(result.run.run_dir)
    kept = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert kept == [f"checkpoint_{s:09d}" for s in (STEPS - EVERY, STEPS)]
    assert result.checkpoint == str(run_dir / f"checkpoint_{STEPS:09d}")
    state = result.load_state()
    assert state["step"] == STEPS and set(state["model"]) == {"weight", "bias"}
    assert len(state["rng"]["per_rank"]) == 2

    with open(tmp / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == steps
    assert list(rows[0]) == ["step", "loss", "lr", "start_step", "world_size"]
    assert float(rows[-1]["loss"]) == pytest.approx(losses[-1])


@pytest.mark.services
def test_crash_then_resume_repeats_uninterrupted_run(
    uninterrupted: tuple[dist.FitResult, Path], crashed: RunSpec, tmp_path: Path
) -> None:
    reference, _ = uninterrupted
    run = _copy_of_crashed(crashed, tmp_path)  # crashed at step 10 (the fixture checks the TrainingError)

    resumed = dist.fit(toy_loop, loop_config(tmp_path), TWO_CPU_WORKERS, run)
    rows = resumed.history
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    # Steps 1-8 come from the checkpoint's history, 9-16 were run again from step 8.
    assert {row["start_step"] for row in rows[:8]} == {0}
    assert {row["start_step"] for row in rows[8:]} == {8}
    for got, want in zip(rows, reference.history):
        assert got["lr"] == want["lr"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-7)

    got, want = resumed.load_state(), reference.load_state()
    assert got["step"] == want["step"] == STEPS
    for key in ("weight", "bias"):
        torch.testing.assert_close(got["model"][key], want["model"][key], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["optimizer"], want["optimizer"], rtol=1e-6, atol=1e-7)  # momentum buffers
    assert got["scheduler"] == want["scheduler"]


def _assert_repeats(result: dist.FitResult, reference: dist.FitResult) -> None:
    """Every step once, with the uninterrupted run's losses, ending at its weights."""
    assert [row["step"] for row in result.history] == list(range(1, STEPS + 1))
    for got, want in zip(result.history, reference.history, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-7)
    torch.testing.assert_close(result.load_state()["model"], reference.load_state()["model"], rtol=1e-6, atol=1e-7)


def _copy_of_run(reference: dist.FitResult, tmp_path: Path) -> RunSpec:
    """A run of the reference's config whose folder is a copy of the finished reference run."""
    run = spec(tmp_path / "results", reference.run.config_hash, tmp_path)
    shutil.copytree(reference.run.run_dir, run.run_dir)
    return run


@pytest.mark.services
def test_corrupted_checkpoint_is_a_checkpoint_error_naming_the_file(
    uninterrupted: tuple[dist.FitResult, Path], tmp_path: Path
) -> None:
    reference, _ = uninterrupted
    run = _copy_of_run(reference, tmp_path)
    state_file = Path(run.run_dir) / f"checkpoint_{STEPS:09d}" / STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:100])  # truncated mid-write

    with pytest.raises(CheckpointError, match="corrupted or truncated") as error:
        dist.fit(toy_loop, loop_config(tmp_path), Scaling(num_workers=1), run)
    assert str(state_file) in str(error.value)


@pytest.mark.services
def test_torn_unlisted_checkpoint_is_skipped_for_the_listed_one(
    uninterrupted: tuple[dist.FitResult, Path], tmp_path: Path
) -> None:
    reference, _ = uninterrupted
    run = _copy_of_run(reference, tmp_path)
    listed = Path(run.run_dir) / f"checkpoint_{STEPS:09d}" / STATE_FILE
    torn = Path(run.run_dir) / f"checkpoint_{STEPS + EVERY:09d}" / STATE_FILE  # upload cut by a kill
    torn.parent.mkdir()
    torn.write_bytes(listed.read_bytes()[:-100])

    # cpus_per_worker None (params' "auto"): the one worker takes the cluster's 2 CPUs and runs 2 threads
    resumed = dist.fit(toy_loop, loop_config(tmp_path), Scaling(num_workers=1, cpus_per_worker=None), run)
    assert resumed.history == reference.history  # resumed at the listed final step: nothing ran again
    assert resumed.checkpoint == str(listed.parent)
    assert (tmp_path / "markers" / "threads0").read_text() == "2"


@pytest.mark.services
def test_a_killed_worker_process_is_restarted_from_the_last_checkpoint_on_s3(
    uninterrupted: tuple[dist.FitResult, Path], s3_server: Any, tmp_path: Path
) -> None:
    """SIGKILLed rank 0 at step 10, checkpoints on S3: Ray's one allowed retry resumes from step 8's there."""
    reference, _ = uninterrupted
    s3_options = {"key": s3_server.env["AWS_ACCESS_KEY_ID"], "secret": s3_server.env["AWS_SECRET_ACCESS_KEY"],
                  "client_kwargs": {"endpoint_url": s3_server.endpoint_url}}
    run = spec(f"s3://{s3_server.bucket}/runs", "ref0001", tmp_path, s3_options=s3_options, max_failures=1)
    result = dist.fit(toy_loop, loop_config(tmp_path, kill_at=10), TWO_CPU_WORKERS, run)
    _assert_repeats(result, reference)
    assert {row["start_step"] for row in result.history[:8]} == {0}
    assert {row["start_step"] for row in result.history[8:]} == {8}  # Ray's retry resumed at the last checkpoint
    assert result.checkpoint == f"s3://{s3_server.bucket}/runs/toy-ref0001/checkpoint_{STEPS:09d}"
    assert result.load_state()["step"] == STEPS
    assert s3_server.filesystem().exists(f"{s3_server.bucket}/runs/toy-ref0001/{RUN_MARKER}")


@pytest.mark.services
def test_complete_checkpoint_ray_had_not_listed_is_resumed_from(
    uninterrupted: tuple[dist.FitResult, Path], crashed: RunSpec, tmp_path: Path
) -> None:
    """Killed between a checkpoint reaching storage and Ray listing it: resume from it, not the one before."""
    reference, _ = uninterrupted
    run = _copy_of_crashed(crashed, tmp_path)
    listed = sorted(p.name for p in Path(run.run_dir).glob("checkpoint_*") if p.is_dir())
    assert listed == [f"checkpoint_{s:09d}" for s in (4, 8)]
    unlisted = f"checkpoint_{12:09d}"  # written by an identical run, never listed in this run's snapshot
    shutil.copytree(Path(reference.run.run_dir) / unlisted, Path(run.run_dir) / unlisted)

    resumed = dist.fit(toy_loop, loop_config(tmp_path), TWO_CPU_WORKERS, run)
    _assert_repeats(resumed, reference)
    assert {row["start_step"] for row in resumed.history[12:]} == {12}  # the unlisted checkpoint, not step 8's


@pytest.mark.services
def test_run_folder_of_another_config_is_refused(uninterrupted: tuple[dist.FitResult, Path], tmp_path: Path) -> None:
    reference, _ = uninterrupted
    run = spec(tmp_path / "results", "other0002", tmp_path)
    shutil.copytree(reference.run.run_dir, run.run_dir)  # e.g. a folder renamed by hand
    with pytest.raises(ConfigMismatchError, match="ref0001.*other0002"):
        dist.fit(toy_loop, loop_config(tmp_path), TWO_CPU_WORKERS, run)


def report_poll_interval() -> None:
    """A loop that reports the Ray Train poll interval its worker process was started with."""
    dist.report({"poll": float(os.environ[TRAIN_POLL_ENV])}, {"step": 1})


def test_the_run_specs_poll_interval_reaches_ray_trains_workers(ray_local: Any, tmp_path: Path) -> None:
    # ray.train_poll_s -> RunSpec -> fit's environment -> Ray Train's controller and workers (which
    # wait for its polls); nothing else in the test session sets the variable.
    cfg = MeduetConfig.model_validate({"ray": {"train_poll_s": 0.5}})
    run = RunSpec.from_config(cfg.ray, Paths.resolve(cfg, tmp_path), "toy", "poll0001")
    assert run.train_poll_s == 0.5
    result = dist.fit(report_poll_interval, {}, Scaling(num_workers=1, cpus_per_worker=1), run)
    assert [row["poll"] for row in result.history] == [0.5]
    # for that run only: the next fit (another stage's interval) or a process started later does not inherit it
    assert TRAIN_POLL_ENV not in os.environ
    with pytest.raises(ValueError, match="train_poll_s"):
        spec(tmp_path, "x", tmp_path, train_poll_s=0.0)


def report_niceness() -> None:
    """A loop that reports its worker process's niceness."""
    dist.report({"nice": float(os.nice(0))}, {"step": 1})


def _preemption_watchers() -> int:
    """Ray Train preemption-watcher actors this Ray has had, dead or alive (the State API)."""
    from ray.util.state import list_actors

    return len(list_actors(filters=[("class_name", "=", "PreemptionWatcher")], limit=10_000))


def test_a_local_rays_training_runs_at_the_drivers_priority_without_a_preemption_watcher(
        ray_local: Any, tmp_path: Path) -> None:
    # Ray's default (nice 15) starved a stage's training whenever other work shared the cores.
    watchers = _preemption_watchers()
    result = dist.fit(report_niceness, {}, Scaling(num_workers=1, cpus_per_worker=1),
                      spec(tmp_path / "runs", "nice0001", tmp_path))
    assert [row["nice"] for row in result.history] == [float(os.nice(0))]
    # through the local Ray's own config: processes started later (`ray start` of a test cluster) keep Ray's default
    assert "RAY_worker_niceness" not in os.environ
    # One node, the driver's: nothing to preempt, so no watcher actor (Ray Train starts one per run by default);
    # set for the run only, so a cluster started later by this process keeps Ray's default.
    assert _preemption_watchers() == watchers
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ


# Another local Ray in its own process, as another stage's beside this one in the flow; prints "up" once started.
_OTHER_RAY = ("import sys, ray; ray.init(address='local', num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1]); "
              "print('up', flush=True); sys.stdin.read()")


def test_ray_trains_placement_group_cleaner_finds_its_own_ray_beside_another(
        ray_local: Any, tmp_path: Path) -> None:
    # Two stages side by side in the flow are two local Rays on one machine. Ray Train's placement-group cleaner
    # asks the State API for the local Ray without naming it, so its monitor died with "Found multiple active Ray
    # instances" (a traceback in the stage's log, and no clean-up after a dead controller).
    from ray.util.state import get_log, list_actors

    other_dir = tempfile.TemporaryDirectory(prefix="meduet-other-ray-", ignore_cleanup_errors=True)  # short: sockets
    other = subprocess.Popen([sys.executable, "-c", _OTHER_RAY, other_dir.name],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "up"
        cleaners_before = {a.actor_id for a in _cleaners(list_actors)}
        dist.fit(report_niceness, {}, Scaling(num_workers=1, cpus_per_worker=1),
                 spec(tmp_path / "runs", "pgcl0001", tmp_path))
    finally:
        assert other.stdin is not None
        other.stdin.close()
        other.wait(timeout=120)
        other_dir.cleanup()
    cleaners = [a for a in _cleaners(list_actors) if a.actor_id not in cleaners_before]
    assert cleaners, "Ray Train started no placement-group cleaner"
    gcs = ray.get_runtime_context().gcs_address
    errors = "".join(line for a in cleaners for line in get_log(address=gcs, actor_id=a.actor_id, suffix="err"))
    assert "Traceback" not in errors and "Failed to query" not in errors, errors
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # the local Ray's processes know it; this one keeps its own


def _cleaners(list_actors: Any) -> list[Any]:
    """Ray Train's placement-group cleaner actors of this process's Ray, dead or alive (named by its address)."""
    return list_actors(address=ray.get_runtime_context().gcs_address, limit=10_000,
                       filters=[("class_name", "=", "PlacementGroupCleaner")])


# --------------------------------------------------------------------------- without Ray
def test_auto_cpus_share_the_cluster_between_workers_within_one_node() -> None:
    auto = Scaling(num_workers=1, cpus_per_worker=None)
    assert auto.with_cluster_cpus(2.0, [2.0]).cpus_per_worker == 2.0
    assert auto.with_cluster_cpus(16.0, [8.0, 8.0]).cpus_per_worker == 8.0  # one worker lives on one node
    assert Scaling(num_workers=3, cpus_per_worker=None).with_cluster_cpus(8.0, [8.0]).cpus_per_worker == 2.0
    assert Scaling(num_workers=4, cpus_per_worker=None).with_cluster_cpus(2.0, [2.0]).cpus_per_worker == 1.0
    assert Scaling(num_workers=2, cpus_per_worker=0.5).with_cluster_cpus(8.0, [8.0]).cpus_per_worker == 0.5
    assert auto.with_cluster_cpus(6.0, [6.0]).threads == 6 and Scaling(cpus_per_worker=0.5).threads == 1
    with pytest.raises(ValueError, match="decided on the cluster"):
        auto.resources_per_worker()


def test_a_trainer_builds_and_steps_where_ray_is_not_installed() -> None:
    # The step benchmarks run on lent GPU machines that have torch but no Ray: the worker helpers
    # and the trainers must not import Ray outside fit, and the driver's names load Ray on first use.
    script = """
import sys
sys.modules["ray"] = None  # import ray -> ImportError, as on a machine without it
import torch
from meduet import distributed as dist
from meduet.config import PretrainConfig
from meduet.engine.ema import build_teacher
from meduet.engine.loop import optimizer_step
from meduet.engine.pretrain_training import PretrainObjective, pretrain_trainer
from meduet.losses.mixing import random_mix_mask
from meduet.models.meduet import PRESETS, MeduetModel
import dataclasses
config = dataclasses.replace(PRESETS["tiny"], num_domains=2)
student = MeduetModel(config)
x = torch.randn(2, config.in_channels, *config.input_size)
mask = random_mix_mask(2, config.num_tokens, config.mask_ratio)
batch = (x, torch.tensor([0, 1]), mask, torch.arange(2), x, 1)
cfg = PretrainConfig(preset="tiny", crop=config.input_size[0], batch_size=2, steps=2, mftd_start_fraction=0.0)
trainer = pretrain_trainer(cfg=cfg, objective=PretrainObjective(student), teacher=build_teacher(student),
                           batches=lambda step: [batch], device=dist.device())
losses = optimizer_step(trainer, trainer.batches(1))
assert all(torch.isfinite(value) for value in losses.values()), losses
try:
    dist.fit
except ImportError:
    print("driver needs ray")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "driver needs ray"


def test_loop_runs_as_one_plain_worker_outside_fit(tmp_path: Path) -> None:
    toy_loop(**loop_config(tmp_path, steps=4))
    assert (tmp_path / "markers" / "rank0").read_text() == "1"
    assert dist.load_checkpoint() is None and not dist.checkpoint_due(4, 4)


def test_rng_capture_restore_round_trip() -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng({"per_rank": [state]})
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def _write_checkpoint(folder: Path, config_hash: str) -> Path:
    folder.mkdir(parents=True)
    envelope = {"format": CHECKPOINT_FORMAT, "stage": "toy", "config_hash": config_hash,
                "state": {"step": 3, "w": torch.ones(2), "rng": capture_rng()}, "history": []}
    torch.save(envelope, folder / STATE_FILE)
    return folder


def test_read_checkpoint_checks_file_and_config_hash(tmp_path: Path) -> None:
    folder = _write_checkpoint(tmp_path / "checkpoint_000000003", "abc")
    assert read_checkpoint(str(folder), config_hash="abc")["step"] == 3
    with pytest.raises(ConfigMismatchError, match="config hash abc.*xyz"):
        read_checkpoint(str(folder), config_hash="xyz")

    state_file = folder / STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match="corrupted or truncated") as error:
        read_checkpoint(str(folder))
    assert str(state_file) in str(error.value)
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(str(tmp_path / "missing"))


def test_specs_from_config(tmp_path: Path) -> None:
    cfg = MeduetConfig(ray=RayConfig(num_workers=2, cpus_per_worker=0.5, checkpoint_every=10, max_failures=3))
    paths = Paths.resolve(cfg, tmp_path)
    scaling = Scaling.from_config(cfg.ray)
    assert (scaling.num_workers, scaling.backend, scaling.resources_per_worker()) == (2, "gloo", {"CPU": 0.5})
    run = RunSpec.from_config(cfg.ray, paths, "vae", "0123abcd")
    assert run.name == "vae-0123abcd"
    assert run.run_dir == str(tmp_path / ".work" / "ray_results" / "vae-0123abcd")
    assert (run.checkpoint_every, run.max_failures, run.temp_dir) == (10, 3, tmp_path / ".work" / "ray")
    assert run.metrics_csv == tmp_path / "reports" / "vae" / "history.csv"
    s3 = RunSpec.from_config(cfg.ray.model_copy(update={"storage": "s3://b/p"}), paths, "vae", "0123abcd")
    assert s3.run_dir == "s3://b/p/vae-0123abcd"
    with pytest.raises(ValueError, match="stage"):
        RunSpec(stage="a/b", config_hash="x", storage=str(tmp_path))
    with pytest.raises(ValueError, match="num_workers"):
        Scaling(num_workers=0)


def test_long_ray_temp_dir_falls_back_to_a_short_one(tmp_path: Path) -> None:
    assert _ray_temp_dir(Path("/tmp/meduet-test/ray")) == Path("/tmp/meduet-test/ray")
    long = tmp_path / ("x" * 40) / "ray"
    short = _ray_temp_dir(long)
    assert short != long and len(str(short)) + 66 <= 107


def test_history_csv_has_union_of_columns(tmp_path: Path) -> None:
    path = write_history_csv(tmp_path / "h.csv", [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4, "lr": 0.1}])
    assert path.read_text().splitlines() == ["step,loss,lr", "1,0.5,", "2,0.4,0.1"]


def square_or_fail(item: int) -> int:
    if item < 0:
        raise ValueError(f"negative item {item}")
    return item * item


def square_or_die(item: tuple[int, str]) -> int:
    """Squares ``value``; its process SIGKILLs itself while ``marker`` is absent or ``"always"``."""
    value, marker = item
    if marker == "always" or (marker and not Path(marker).exists()):
        if marker != "always":
            Path(marker).write_text("died once")
        os.kill(os.getpid(), signal.SIGKILL)
    return value * value


def test_map_tasks_on_ray_and_in_process(ray_local: Any, tmp_path: Path) -> None:
    run = spec(tmp_path / "runs", "maptasks", tmp_path)
    scaling = Scaling(num_workers=1, cpus_per_worker=1.0)
    on_ray = sorted(dist.map_tasks(square_or_fail, list(range(6)), workers=2, scaling=scaling, run=run))
    in_process = list(dist.map_tasks(square_or_fail, list(range(6)), workers=1, scaling=scaling, run=run))
    assert on_ray == in_process == [i * i for i in range(6)]
    for workers in (1, 2):
        with pytest.raises(dist.TaskError, match=r"task 2 of 3 failed: ValueError: negative item -1"):
            list(dist.map_tasks(square_or_fail, [1, 2, -1], workers=workers, scaling=scaling, run=run))
        # errors="yield": the failure takes the item's place and the other items still run
        results = list(dist.map_tasks(square_or_fail, [1, -1, 3], workers=workers, scaling=scaling, run=run,
                                      errors="yield"))
        failures = [r for r in results if isinstance(r, dist.TaskError)]
        assert sorted(r for r in results if not isinstance(r, dist.TaskError)) == [1, 9]
        assert [f.index for f in failures] == [1] and "negative item -1" in str(failures[0])
        # the task's own exception, on Ray too: a caller tells the item's failure from the storage's
        assert isinstance(failures[0].cause, ValueError) and str(failures[0].cause) == "negative item -1"


@pytest.mark.services
def test_map_tasks_survives_a_killed_task_process_and_names_one_that_always_dies(ray_local: Any,
                                                                                 tmp_path: Path) -> None:
    run = spec(tmp_path / "runs", "maptasks", tmp_path)
    scaling = Scaling(num_workers=1, cpus_per_worker=1.0)
    once = [(i, str(tmp_path / f"died{i}") if i == 2 else "") for i in range(4)]
    assert sorted(dist.map_tasks(square_or_die, once, workers=2, scaling=scaling, run=run)) == [0, 1, 4, 9]
    assert (tmp_path / "died2").read_text() == "died once"  # Ray ran task 2 again in a fresh process
    with pytest.raises(dist.TaskError, match=r"task 1 of 3 failed: .*(died|crash|exit)"):
        list(dist.map_tasks(square_or_die, [(1, ""), (2, "always"), (3, "")], workers=2, scaling=scaling, run=run))
    results = list(dist.map_tasks(square_or_die, [(1, ""), (2, "always"), (3, "")], workers=2, scaling=scaling,
                                  run=run, errors="yield"))
    assert sorted(r for r in results if isinstance(r, int)) == [1, 9]
    assert [(r.index, r.cause) for r in results if isinstance(r, dist.TaskError)] == [(1, None)]  # no exception


def test_a_local_ray_start_drops_only_rays_notice_of_its_default_authentication(monkeypatch: pytest.MonkeyPatch,
                                                                                tmp_path: Path) -> None:
    """Ray's "token authentication is enabled" notice (its default, printed by every stage) is dropped; its
    warning that authentication is off still shows."""
    from ray._private.authentication import authentication_token_setup as ray_auth

    from meduet.distributed import driver

    class Seen(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(driver.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(driver.ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(driver, "_STARTED_LOCAL", False)
    seen = Seen()
    ray_auth.logger.addHandler(seen)
    try:
        for _ in range(2):  # (an earlier test's local Ray may have started already: the filter is added once)
            driver.ensure_ray(spec(tmp_path / "runs", "auth", tmp_path))
        ray_auth._warn_token_auth_enabled()
        ray_auth._warn_token_auth_disabled()
    finally:
        ray_auth.logger.removeHandler(seen)
    assert len(seen.messages) == 1 and "authentication is disabled" in seen.messages[0]
    assert ray_auth.logger.filters.count(driver._drop_auth_default_notice) == 1


def test_a_local_ray_start_that_times_out_is_tried_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Ray's own start-up timeout on a busy machine, or a dashboard port taken in the meantime: tried again (up to
    3 times); other errors are not."""
    from meduet.distributed import driver

    attempts: list[dict] = []

    def init(**kwargs: Any) -> None:
        attempts.append(kwargs)
        if len(attempts) < 3:
            raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(driver.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(driver.ray, "shutdown", lambda: None)
    monkeypatch.setattr(driver.ray, "init", init)
    monkeypatch.setattr(driver, "_STARTED_LOCAL", False)
    driver.ensure_ray(spec(tmp_path / "runs", "retry", tmp_path))
    assert len(attempts) == 3 and driver._STARTED_LOCAL
    attempts.clear()

    def taken_port(**kwargs: Any) -> None:  # the dashboard port was free when picked, taken when Ray bound it
        attempts.append({**kwargs, "api_server": os.environ[driver._API_SERVER_ENV]})
        if len(attempts) < 2:
            raise ValueError(f"Failed to bind to 127.0.0.1:{kwargs['dashboard_port']} because it's already occupied.")

    monkeypatch.setattr(driver.ray, "init", taken_port)
    driver.ensure_ray(spec(tmp_path / "runs", "retry", tmp_path))
    # each try on a port of its own, which the local Ray's processes are told (they inherit ray.init's environment)
    assert len(attempts) == 2 and attempts[0]["dashboard_port"] != attempts[1]["dashboard_port"]
    assert all(a["api_server"] == f"http://127.0.0.1:{a['dashboard_port']}" for a in attempts)
    assert driver._API_SERVER_ENV not in os.environ
    attempts.clear()
    monkeypatch.setattr(driver.ray, "init", lambda **kwargs: (_ for _ in ()).throw(RuntimeError("port in use")))
    with pytest.raises(RuntimeError, match="port in use"):
        driver.ensure_ray(spec(tmp_path / "runs", "retry", tmp_path))
