"""``prefect deploy --all``: the work-pool deployment's settings, read from params.yaml.

``prefect.yaml`` runs :func:`deployment_settings` as its build step, so the schedule
(``orchestration.cron``, ``orchestration.timezone``) and the project folder come from the same
params file that ``flows.serve`` reads, not from a second copy in YAML. The deployment's name
is written in ``prefect.yaml`` (Prefect matches ``prefect deploy -n`` against it before any
step runs); this step refuses to deploy it when it differs from ``orchestration.deployment_name``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.pipeline import DVC_PARAMS_FILE
from meduet.config import OrchestrationConfig, load_config


def schedule_spec(orchestration: OrchestrationConfig) -> dict[str, Any]:
    """The deployment's one schedule: ``orchestration.cron``, or with none the default cron made inactive.

    ``prefect.yaml`` cannot template the length of its ``schedules`` list, only the values in
    it, so a null cron is an inactive schedule rather than no schedule (it never fires).
    """
    default = OrchestrationConfig.model_fields["cron"].default
    return {"cron": orchestration.cron or default, "timezone": orchestration.timezone,
            "scheduled": orchestration.cron is not None}


def deployment_settings(deployment_name: str, params: str = DVC_PARAMS_FILE, project_dir: str = ".") -> dict[str, Any]:
    """A ``prefect.yaml`` build step: what the deployment takes from params.

    Args:
        deployment_name: the name ``prefect.yaml`` gives the deployment.
        params: params file, relative to ``project_dir``.
        project_dir: the project folder (default: where ``prefect deploy`` runs).

    Returns:
        ``{"project_dir": absolute path, "params": params, "cron", "timezone", "scheduled": bool}``
        (:func:`schedule_spec`), referenced in ``prefect.yaml`` as ``{{ <step id>.<key> }}``.

    Raises:
        ValueError: ``deployment_name`` is not ``orchestration.deployment_name``.
    """
    root = Path(project_dir).resolve()
    orchestration = load_config(root / params).orchestration
    if deployment_name != orchestration.deployment_name:
        raise ValueError(f"prefect.yaml deploys '{deployment_name}' but {root / params} names the deployment "
                         f"'{orchestration.deployment_name}' (orchestration.deployment_name); make them agree")
    return {"project_dir": str(root), "params": params, **schedule_spec(orchestration)}
