"""Point DVC at the remote named in ``params.yaml`` (or the environment), machine-locally.

The remote URL and S3 endpoint come from ``storage.dvc_remote_url`` /
``storage.s3_endpoint_url`` (and ``storage.s3_region``), overridden by the environment
variables ``MEDUET_DVC_REMOTE_URL`` / ``MEDUET_S3_ENDPOINT_URL`` / ``MEDUET_S3_REGION``
(set but empty means "none"). They are written to ``.dvc/config.local``, which DVC keeps
out of git, so nothing machine-specific is committed. Credentials are never written
anywhere: DVC's S3 client reads ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` from the
environment of the ``dvc push``/``dvc pull`` process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from meduet.config import ConfigError, StorageConfig, format_validation_error
from meduet.env import offline_env

REMOTE_NAME = "meduet"
ENV_OVERRIDES: dict[str, str] = {
    "dvc_remote_url": "MEDUET_DVC_REMOTE_URL",
    "s3_endpoint_url": "MEDUET_S3_ENDPOINT_URL",
    "s3_region": "MEDUET_S3_REGION",
}


@dataclass(frozen=True)
class RemoteSettings:
    """The effective DVC remote: where it is and how to reach it (no secrets)."""

    name: str
    url: str
    endpoint_url: str | None = None
    region: str | None = None

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")


def effective_storage(storage: StorageConfig, environ: Mapping[str, str] | None = None) -> StorageConfig:
    """``storage`` with the ``MEDUET_*`` environment overrides applied and validated."""
    environ = os.environ if environ is None else environ
    data = storage.model_dump()
    for key, var in ENV_OVERRIDES.items():
        if var in environ:
            data[key] = environ[var] or None
    try:
        return StorageConfig.model_validate(data)
    except ValidationError as error:
        names = ", ".join(f"{k} (env {v})" for k, v in ENV_OVERRIDES.items())
        raise ConfigError(format_validation_error(f"storage after environment overrides [{names}]", error, data)) from None


def remote_settings(
    storage: StorageConfig, environ: Mapping[str, str] | None = None, name: str = REMOTE_NAME
) -> RemoteSettings | None:
    """The remote to configure, or None when neither params nor environment name one."""
    effective = effective_storage(storage, environ)
    if effective.dvc_remote_url is None:
        return None
    return RemoteSettings(
        name=name, url=effective.dvc_remote_url,
        endpoint_url=effective.s3_endpoint_url, region=effective.s3_region,
    )


def dvc_executable() -> str:
    """``dvc`` beside the running interpreter (the project's venv), else from PATH."""
    beside = Path(sys.executable).parent / "dvc"
    return str(beside) if beside.is_file() else (shutil.which("dvc") or "dvc")


def _dvc(project_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dvc_executable(), *args], cwd=project_dir, env=offline_env(),
        capture_output=True, encoding="utf-8", errors="replace", check=False,
    )


def _dvc_checked(project_dir: Path, *args: str) -> None:
    done = _dvc(project_dir, *args)
    if done.returncode != 0:
        # Only the command and DVC's message: neither ever contains a credential.
        raise RuntimeError(f"dvc {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")


def configure_remote(
    project_dir: str | os.PathLike[str],
    storage: StorageConfig,
    environ: Mapping[str, str] | None = None,
    name: str = REMOTE_NAME,
) -> RemoteSettings | None:
    """Write the remote to ``<project_dir>/.dvc/config.local`` as the default remote.

    Returns the settings written, or None (and changes nothing) when no remote is named.
    """
    settings = remote_settings(storage, environ, name)
    if settings is None:
        return None
    project_dir = Path(project_dir)
    _dvc_checked(project_dir, "remote", "add", "--local", "--default", "--force", name, settings.url)
    if settings.is_s3:
        for option, value in (("endpointurl", settings.endpoint_url), ("region", settings.region)):
            if value:
                _dvc_checked(project_dir, "remote", "modify", "--local", name, option, value)
            else:  # --force keeps old options; drop one that params no longer set
                _dvc_checked(project_dir, "remote", "modify", "--local", "--unset", name, option)
    return settings


def default_remote(project_dir: str | os.PathLike[str]) -> str | None:
    """Name of the default DVC remote at any config level, or None when there is none."""
    done = _dvc(Path(project_dir), "remote", "default")
    name = done.stdout.strip()
    return name if done.returncode == 0 and name else None
