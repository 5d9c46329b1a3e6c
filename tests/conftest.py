"""Shared fixtures: offline environment, tiny project copies, DVC runner, an S3 endpoint.

A "project copy" is a fresh git + DVC project in a temporary folder holding what
``dvc.yaml`` needs: ``dvc.yaml``, ``params.yaml`` with TINY overrides, the DVC and git
ignore files, and the source folders ``dvc.yaml`` lists as deps (found from ``dvc.yaml``
itself, so a new stage's deps are copied without editing this file). The stage commands
still run the installed ``meduet`` package; the copied sources only feed DVC's hashes.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from meduet.dvc_graph import load_stages
from meduet.env import OFFLINE_ENV

if TYPE_CHECKING:  # Prefect and s3fs are imported only by the tests that use them
    from flows.local import S3Server

REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore")

# Two sites (two formats and orientations), coarse grids, one case each: the whole pipeline
# in seconds. Fields of view cover the body, as in tests/data/tiny_demo.py.
TINY_SITES = [
    {"name": "site_a", "spacing": [4.0, 4.0, 5.0], "fov_mm": [360, 340], "kernel": "smooth", "noise_std": 8,
     "orientation": "RAS", "file_format": "nii.gz"},
    {"name": "site_b", "spacing": [4.5, 4.5, 6.0], "fov_mm": [360, 360], "kernel": "sharp", "noise_std": 20,
     "hu_offset": 24, "hu_gain": 1.06, "bias": 0.08, "pad_value": -2048, "orientation": "LPS", "file_format": "nrrd"},
]
TINY_PARAMS: dict[str, Any] = {
    "demo_data.cases_per_site": 1,
    "demo_data.body_length_mm": 100.0,
    "demo_data.workers": 1,
    "demo_data.sites": TINY_SITES,
    "harmonize.datasets": [
        {"name": f"demo_{s['name']}", "root": f"data/demo/{s['name']}", "domain": s["name"], "body_part": "mixed"}
        for s in TINY_SITES
    ],
    "harmonize.target_spacing": [3.0, 3.0, 3.0],
    "harmonize.min_size": [16, 16, 16],
    "harmonize.divisible_by": 8,
    "harmonize.workers": 1,
    "vae.steps": 4,
    "vae.crop_size": [16, 16, 16],
    "vae.warmup_steps": 1,
    "vae.log_every": 2,
    "encode_latents.workers": 1,  # in-process: the Ray-task path has its own tests (tests/stages)
    "pretrain.preset": "tiny",
    "pretrain.crop": 8,
    "pretrain.steps": 4,
    "pretrain.batch_size": 2,
    "pretrain.warmup_steps": 1,
    "pretrain.log_every": 2,
    "finetune.steps": 4,
    "finetune.log_every": 2,
    "finetune.warmup_steps": 1,
    "finetune_sweep.inits": ["meduet"],  # one cell: each is a Ray Train run (~12 s of start-up)
    "finetune_sweep.steps": 4,
    "train_diffusion.steps": 4,
    "train_diffusion.batch_size": 2,
    "train_diffusion.warmup_steps": 1,
    "train_diffusion.log_every": 2,
    "train_diffusion.val_crops": 2,
    "synthesize.sampling_steps": 2,
    "synthesize.translations": 1,
    "synthesize.samples_per_site": 1,
    "synthesize.workers": 1,  # in-process: the Ray-task path has its own tests (tests/stages)
    "train_evaluator.channels": [4, 8],
    "train_evaluator.crop_size": [16, 16, 16],
    "train_evaluator.steps": 4,
    "train_evaluator.crops_per_site": 1,
    "train_evaluator.warmup_steps": 1,
    "train_evaluator.log_every": 2,
    "evaluate_synthesis.bootstrap": 20,
    "evaluate_synthesis.real_crops_per_volume": 2,
    "evaluate_synthesis.ms_ssim_kernel": 3,
    "evaluate_synthesis.ms_ssim_scales": 2,
    "evaluate_synthesis.ssim_window": 3,
    "ray.checkpoint_every": 2,
    "ray.local_num_cpus": 2,
    "ray.max_failures": 0,
    "orchestration.cron": None,
    "orchestration.task_retries": 0,
    "orchestration.retry_delay_s": 0,
}


# --------------------------------------------------------------------------- helpers
def set_dotted(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``tree`` with ``{"a.b.c": value}`` overrides applied (lists replaced)."""
    tree = copy.deepcopy(tree)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = copy.deepcopy(value)
    return tree


def write_params(project: Path, overrides: dict[str, Any]) -> None:
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(set_dotted(yaml.safe_load(path.read_text()), overrides), sort_keys=False))


def make_project(dest: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Copy the project skeleton and dvc.yaml's source deps into ``dest``; git init there."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in PROJECT_FILES:
        if (REPO_ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / rel, dest / rel)
    stages = load_stages(REPO_ROOT)
    produced = {out for stage in stages for out in stage.outputs}
    # The whole package, not just the deps under it: Ray workers put the project folder
    # first on sys.path, and a partial copy of meduet/ there would shadow the installed one.
    shutil.copytree(REPO_ROOT / "meduet", dest / "meduet", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                    dirs_exist_ok=True)
    for dep in sorted({dep for stage in stages for dep in stage.deps} - produced):
        src = REPO_ROOT / dep
        if src.is_dir():
            shutil.copytree(src, dest / dep, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
        elif src.is_file():
            (dest / dep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / dep)
    write_params(dest, {**TINY_PARAMS, **(overrides or {})})
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def run_dvc(project: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``dvc <args>`` in ``project`` with the venv on PATH (stage cmds call ``meduet``)."""
    from flows.pipeline import stage_env

    done = subprocess.run(
        ["dvc", *args], cwd=project, env={**stage_env(project), **(env or {})},
        capture_output=True, encoding="utf-8", errors="replace", check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def tree_digest(root: Path, rels: list[str]) -> dict[str, str]:
    """sha256 of every file under the given paths (files or folders), keyed by path."""
    digests = {}
    for rel in rels:
        path = root / rel
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digests[file.relative_to(root).as_posix()] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session", autouse=True)
def offline_env() -> Iterator[None]:
    """No test may reach the internet: analytics, update checks and metadata probes off.

    Session-wide (and so set up first), because session fixtures start servers and clients too.
    """
    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE_ENV.items():
            patch.setenv(key, value)
        yield


@pytest.fixture(scope="session", autouse=True)
def dvc_site_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """DVC's per-repo index and lock cache in a temp folder, not in /var/tmp/dvc."""
    path = tmp_path_factory.mktemp("dvc-site-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DVC_SITE_CACHE_DIR", str(path))
        yield path


@pytest.fixture
def project_copy(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``project_copy({"harmonize.min_size": [8, 8, 8]}, name="p")`` -> project folder."""

    def factory(overrides: dict[str, Any] | None = None, name: str = "project") -> Path:
        return make_project(tmp_path / name, overrides)

    return factory


@pytest.fixture(scope="session")
def reproduced_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A tiny project after one ``dvc repro`` (shared: copy it before changing anything)."""
    project = make_project(tmp_path_factory.mktemp("reproduced") / "project")
    return project, run_dvc(project, "repro")


@pytest.fixture
def reproduced_copy(reproduced_project: tuple[Path, Any], tmp_path: Path) -> Path:
    """A private copy of ``reproduced_project`` (outputs, cache and dvc.lock included)."""
    return Path(shutil.copytree(reproduced_project[0], tmp_path / "project", symlinks=True))


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: ``uninterrupted_run("pretrain")`` -> the project of one uninterrupted run of that trainer.

    The trainers and their configurations are ``tests/stages/trainers.py``'s; each runs once per
    session, in this process, when first asked for. Shared by the stage, kill/resume and cluster
    tests: read its outputs, never change them.
    """
    from tests.stages.trainers import TRAINERS, run_in_process

    roots: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in roots:
            roots[name] = run_in_process(TRAINERS[name], tmp_path_factory.mktemp(f"uninterrupted-{name}"))
        return roots[name]

    return get


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 endpoint on 127.0.0.1 with bucket ``meduet``; ``.env`` has dummy credentials."""
    from flows.local import moto_s3

    with moto_s3(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def dvc() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``dvc(project, "status", "--json", env=..., check=True)``."""
    return run_dvc


@pytest.fixture(name="tree_digest")
def tree_digest_fixture() -> Callable[[Path, list[str]], dict[str, str]]:
    """``tree_digest(root, ["data/demo", ...])`` -> {relative file path: sha256}."""
    return tree_digest
