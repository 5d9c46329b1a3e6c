"""Process environment for running anything of the pipeline without outbound traffic."""

from __future__ import annotations

import os
import socket

# Analytics, update checks and cloud metadata probes all reach out to the internet;
# hospitals' clusters and CI have no route there, and we never want to leak usage data.
OFFLINE_ENV: dict[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def offline_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Return ``base`` (default: ``os.environ``) with the offline settings added."""
    env = dict(os.environ if base is None else base)
    env.update(OFFLINE_ENV)
    return env


def apply_offline_env() -> None:
    """Set the offline settings in this process (called by entry points, never at import)."""
    os.environ.update(OFFLINE_ENV)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
