"""Serve the ``meduet`` flow as a deployment: ``python -m flows.serve --params params.yaml``.

One long-running process, no work pool or worker: it registers the deployment
``meduet/<orchestration.deployment_name>`` with the Prefect API named by
``PREFECT_API_URL`` (with the cron schedule from params; a null cron means no schedule)
and runs the flow runs created for it until stopped (SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect.flows import EntrypointType
from prefect.schedules import Cron

from flows.pipeline import DVC_PARAMS_FILE, meduet
from meduet.config import ConfigError, OrchestrationConfig, load_config
from meduet.env import apply_offline_env


def schedules(orchestration: OrchestrationConfig) -> list:
    """The deployment's schedules: one cron in the configured timezone, or none."""
    if orchestration.cron is None:
        return []
    return [Cron(orchestration.cron, timezone=orchestration.timezone)]


def serve(project_dir: Path, params: str = DVC_PARAMS_FILE, schedule: bool = True) -> None:
    """Register the deployment and serve it until interrupted.

    ``schedule=False`` registers it without its cron (for a process that lives for one
    on-demand run, like ``make run``: it clears runs the schedule had queued, which would
    otherwise start late, beside the requested one, the next time it is served).
    """
    project_dir = project_dir.resolve()
    orchestration = load_config(project_dir / params).orchestration
    meduet.serve(
        name=orchestration.deployment_name,
        schedules=schedules(orchestration) if schedule else [],
        # One run at a time: two `dvc repro` in one project would fight over DVC's lock.
        limit=1,
        # Scheduled runs get no parameters of their own: bake in where the project is.
        parameters={"project_dir": str(project_dir), "params": params},
        description=f"MeDUET pipeline of {project_dir} (stages from dvc.yaml)",
        tags=["meduet"],
        # Load the flow by module (flows.pipeline.meduet), not by a file path relative
        # to wherever this process was started.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=DVC_PARAMS_FILE, help="params file, relative to the project (default: %(default)s)")
    parser.add_argument("--project-dir", type=Path, default=Path.cwd(), help="folder with dvc.yaml (default: the current folder)")
    parser.add_argument("--no-schedule", dest="schedule", action="store_false", help="serve without the cron schedule")
    args = parser.parse_args(argv)
    apply_offline_env()
    try:
        serve(args.project_dir, args.params, schedule=args.schedule)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
