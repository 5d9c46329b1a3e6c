"""The DVC remote: configured from params/env into .dvc/config.local; push/pull through S3."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from flows.pipeline import stage_env
from meduet.config import ConfigError, StorageConfig
from meduet.dvc_graph import load_stages
from meduet.dvc_remote import remote_settings

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLEKEY", "AWS_SECRET_ACCESS_KEY": "s3cr3t-never-written"}


def test_environment_overrides_params() -> None:
    storage = StorageConfig(dvc_remote_url="s3://params-bucket/meduet", s3_endpoint_url="http://params:9000")
    assert remote_settings(StorageConfig(), environ={}) is None
    from_params = remote_settings(storage, environ={})
    assert (from_params.url, from_params.endpoint_url) == ("s3://params-bucket/meduet", "http://params:9000")
    from_env = remote_settings(storage, environ={"MEDUET_DVC_REMOTE_URL": "s3://env/x", "MEDUET_S3_ENDPOINT_URL": ""})
    assert (from_env.url, from_env.endpoint_url) == ("s3://env/x", None)
    assert remote_settings(storage, environ={"MEDUET_DVC_REMOTE_URL": ""}) is None
    with pytest.raises(ConfigError, match="MEDUET_DVC_REMOTE_URL"):
        remote_settings(storage, environ={"MEDUET_DVC_REMOTE_URL": "not-a-url"})


def _configure(project: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["meduet", "remote", "configure", "--params", "params.yaml"], cwd=project,
        env={**stage_env(project), **env}, capture_output=True, encoding="utf-8", check=True,
    )


def test_remote_configure_writes_only_local_config(project_copy, dvc) -> None:
    project = project_copy({"storage.dvc_remote_url": "s3://params-bucket/meduet"})
    committed = (project / ".dvc" / "config").read_text()
    env = {"MEDUET_S3_ENDPOINT_URL": "http://127.0.0.1:9", **CREDENTIALS}
    done = _configure(project, env)

    local = (project / ".dvc" / "config.local").read_text()
    assert "s3://params-bucket/meduet" in local and "http://127.0.0.1:9" in local
    assert (project / ".dvc" / "config").read_text() == committed
    assert dvc(project, "remote", "default").stdout.strip() == "meduet"
    assert subprocess.run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=project).returncode == 0
    for secret in CREDENTIALS.values():
        assert secret not in local and secret not in done.stdout + done.stderr

    # The environment wins over params, and rerunning replaces the remote.
    _configure(project, {"MEDUET_DVC_REMOTE_URL": "s3://env-bucket/other", **env})
    assert "s3://env-bucket/other" in (project / ".dvc" / "config.local").read_text()


@pytest.mark.services
def test_push_wipe_pull_is_byte_identical(reproduced_copy: Path, s3_server, dvc, tree_digest) -> None:
    project = reproduced_copy
    env = {**s3_server.env, "MEDUET_DVC_REMOTE_URL": f"s3://{s3_server.bucket}/roundtrip",
           "MEDUET_S3_ENDPOINT_URL": s3_server.endpoint_url}
    _configure(project, env)
    dvc(project, "push", env=env)
    assert s3_server.filesystem().find(f"{s3_server.bucket}/roundtrip"), "nothing reached the bucket"

    # Everything DVC caches (cache: false metrics/plots stay in git, not in the remote).
    cached = [rel for stage in load_stages(project) for rel in stage.outs]
    before = tree_digest(project, cached)
    shutil.rmtree(project / ".dvc" / "cache")
    for rel in cached:
        path = project / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    dvc(project, "pull", env=env)
    assert tree_digest(project, cached) == before
