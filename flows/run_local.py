"""``make run``: the whole pipeline through a real, local Prefect deployment.

1. start a Prefect server on 127.0.0.1 (SQLite under ``.work/prefect``),
2. serve the ``meduet`` flow as its deployment (``python -m flows.serve``),
3. ``prefect deployment run meduet/<deployment> --watch`` (its event stream goes to
   ``watch.log``; the terminal shows the stages' progress from the flow's log, :mod:`flows.follow`),
4. stop the served deployment and the server (by process group),
5. report the flow run's final state, where the outputs are, the headline metrics and the
   path of the results report (``reports/index.html``, written by the flow); exit 1 on failure.

DVC decides what actually runs, so a second ``make run`` skips stages that are up to date.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from flows.follow import LogFollower
from flows.local import ServiceError, prefect_server, served_deployment, tool
from flows.pipeline import DVC_PARAMS_FILE
from meduet.config import ConfigError, Paths, load_config
from meduet.dvc_graph import load_stages
from meduet.env import apply_offline_env
from meduet.report import REPORT_FILE, collect_report, headline_text

DEFAULT_PREFECT_HOME = Path(".work") / "prefect"


def report_outputs(project_dir: Path) -> None:
    """Print every output dvc.yaml declares, stage by stage, and whether it exists."""
    for stage in load_stages(project_dir):
        print(f"  {stage.name}:")
        for rel in stage.outputs:
            mark = "ok" if (project_dir / rel).exists() else "MISSING"
            print(f"    [{mark:>7}] {project_dir / rel}")


def report_results(project_dir: Path, params: str) -> None:
    """Print the headline table and where the results report is."""
    try:
        reports = Paths.resolve(load_config(project_dir / params), project_dir).reports
    except ConfigError as error:
        print(f"No results report: {error}")
        return
    print("\nHeadline:")
    print(headline_text(collect_report(project_dir, reports_dir=reports).headline))
    html = reports / REPORT_FILE
    print(f"\nResults report: {html}" if html.is_file() else f"\nResults report: not written ({html} is missing)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.run_local", description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", type=Path, default=Path.cwd(), help="folder with dvc.yaml (default: here)")
    parser.add_argument("--params", default=DVC_PARAMS_FILE, help="params file in the project (default: %(default)s)")
    parser.add_argument("--prefect-home", type=Path, default=None,
                        help=f"Prefect's home, database and logs (default: <project>/{DEFAULT_PREFECT_HOME})")
    args = parser.parse_args(argv)
    apply_offline_env()
    project_dir = args.project_dir.resolve()
    home = (args.prefect_home or project_dir / DEFAULT_PREFECT_HOME).resolve()

    run = None
    watch_code = 1
    try:
        with prefect_server(home) as server:
            print(f"Prefect server: {server.api_url} (home {home}, log {server.service.log_path})", flush=True)
            # An on-demand run: serve without the cron (see flows.serve.serve).
            with served_deployment(server, project_dir, args.params, log_path=home / "serve.log",
                                   schedule=False) as deployment:
                watch_log = home / "watch.log"
                print(f"Serving {deployment.name} (flow logs in {deployment.service.log_path}, "
                      f"Prefect's events in {watch_log})", flush=True)
                with LogFollower(deployment.service.log_path), open(watch_log, "ab") as events:
                    watch = subprocess.run(
                        [tool("prefect"), "deployment", "run", deployment.name, "--watch"],
                        env=server.client_env(), cwd=project_dir, stdout=events, stderr=subprocess.STDOUT,
                        check=False,
                    )
                watch_code = watch.returncode
                run = server.latest_flow_run(deployment.id)
                if watch_code != 0:
                    print(f"\nLast lines of {deployment.service.log_path}:\n{deployment.service.log_tail(30)}\n"
                          f"(Prefect's events of the run: {watch_log})")
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; services stopped", file=sys.stderr)
        return 130

    state = run["state"]["type"] if run and run.get("state") else "UNKNOWN"
    name = run["name"] if run else "?"
    print(f"\nFlow run '{name}': {state}")
    print(f"Outputs under {project_dir}:")
    report_outputs(project_dir)
    print(f"Prefect database and logs: {home}")
    report_results(project_dir, args.params)
    return 0 if watch_code == 0 and state == "COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(main())
