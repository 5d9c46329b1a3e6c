"""MeDUET pipeline command line.

Usage: ``meduet <stage> [--params params.yaml] [--set key=value ...]``. Thin by design:
parse, load and validate the config once, call ``stages.<stage>.run``.
Every stage run records its wall time (``reports/<stage>/timing.json``); ``meduet report``
writes the results report (``reports/index.html``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from meduet.config import ConfigError, Paths, dump_config, load_config
from meduet.dvc_remote import configure_remote
from meduet.env import apply_offline_env
from meduet.io.locks import OutputLockedError
from meduet.stages import STAGES, StageError, StageTiming, report_dir_name

# Loaded by name, as the stage modules are: running a stage never executes the report, so
# the report's code is no dependency of any stage (tests/test_dvc_deps.py reads static imports).
REPORT_MODULE = "meduet.report"
PREDICT_MODULE = "meduet.predict"  # not a stage: loaded by name too, so no stage depends on it


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a params value, e.g. --set harmonize.workers=4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meduet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name, spec in STAGES.items():
        stage = sub.add_parser(name, help=spec.help, description=f"Run the '{name}' stage: {spec.help}.")
        _add_config_args(stage)
    config = sub.add_parser("config", help="show or validate the configuration")
    config_sub = config.add_subparsers(dest="action", required=True, metavar="<action>")
    for action, text in (("show", "print the fully resolved configuration"), ("validate", "check a params file")):
        _add_config_args(config_sub.add_parser(action, help=text, description=text))
    remote = sub.add_parser("remote", help="configure the DVC remote")
    remote_sub = remote.add_subparsers(dest="action", required=True, metavar="<action>")
    text = "write storage.dvc_remote_url / s3_endpoint_url (env MEDUET_* overrides) to .dvc/config.local"
    _add_config_args(remote_sub.add_parser("configure", help=text, description=text))
    text = "write the results report (reports/index.html) from what the stages wrote"
    _add_config_args(sub.add_parser("report", help=text, description=text))
    text = "segment scans with a fine-tuned segmenter; masks in each input's own geometry, organ volumes"
    predict = sub.add_parser("predict", help=text, description=text)
    predict.add_argument("--model", required=True, type=Path, help="segmenter file or finetune model folder")
    predict.add_argument("--input", required=True,
                         help="an image file (NIfTI, NRRD, MHA), a DICOM series folder, a folder of those or an MSD "
                         "dataset.json; local or s3://bucket/... (MEDUET_S3_ENDPOINT_URL, AWS_* from the environment)")
    predict.add_argument("--output", required=True, type=Path, help="folder for the masks and summary.json/.csv")
    return parser


# The thread pools of the numeric libraries a stage's own work may load (BLAS under numpy,
# scipy and scikit-learn; OpenMP), read when each library loads.
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def limit_threads(cpus: int, *, library_env: bool) -> None:
    """Keep this process's numeric work to ``cpus`` threads: a stage beside it has the other
    cores (unlimited, BLAS under scikit-learn's probes ran 2 threads on the demo's 2 cores).

    ``library_env``: also the BLAS/OpenMP variables, before the stage's modules load. Not for
    a stage on Ray: its workers inherit them, and Ray sets a worker's OMP_NUM_THREADS to the
    worker's own CPUs only while it is unset (a 1-CPU task would take the stage's count).
    """
    if library_env:
        for name in THREAD_ENV:
            os.environ[name] = str(cpus)
    import torch  # here: commands that compute nothing start without it

    torch.set_num_threads(cpus)


def run_stage(name: str, params: str, overrides: list[str]) -> int:
    cfg = load_config(params, overrides)
    paths = Paths.resolve(cfg, Path(params).resolve().parent)
    spec = STAGES[name]
    cpus = cfg.ray.cpus_for(report_dir_name(name))
    # The stage's local Ray gets its CPUs (ray.stage_cpus over ray.local_num_cpus), its own work the same threads.
    ray = cfg.ray.model_copy(update={"local_num_cpus": cpus})
    extra = {section: ray if section == "ray" else getattr(cfg, section) for section in spec.extra}
    if cpus:
        limit_threads(cpus, library_env="ray" not in spec.extra)
    started, ok = time.perf_counter(), False
    try:
        result = spec.load()(getattr(cfg, spec.section), paths, **extra)
        ok = result.ok
    finally:  # a failed run is timed too, so the report never shows an earlier run's time as this one's
        finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
        StageTiming(report_dir_name(name), round(time.perf_counter() - started, 3), finished, ok).write(paths.reports)
    print(json.dumps({"stage": result.stage, "ok": result.ok, "metrics": result.metrics}, indent=2, default=str))
    return 0 if result.ok else 1


def run_remote_configure(params: str, overrides: list[str]) -> int:
    cfg = load_config(params, overrides)
    settings = configure_remote(Path(params).resolve().parent, cfg.storage)
    if settings is None:
        print("no DVC remote: storage.dvc_remote_url is null and MEDUET_DVC_REMOTE_URL is unset")
    else:
        endpoint = f" via {settings.endpoint_url}" if settings.endpoint_url else ""
        print(f"DVC remote '{settings.name}' -> {settings.url}{endpoint} (default, in .dvc/config.local)")
    return 0


def run_report(params: str, overrides: list[str]) -> int:
    cfg = load_config(params, overrides)
    root = Path(params).resolve().parent
    result = importlib.import_module(REPORT_MODULE).build_report(root, reports_dir=Paths.resolve(cfg, root).reports)
    print(result.headline_text())
    print(f"Results report: {result.html_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    apply_offline_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            cfg = load_config(args.params, args.overrides)
            if args.action == "show":
                print(dump_config(cfg), end="")
            else:
                print(f"{args.params}: OK")
            return 0
        if args.command == "remote":
            return run_remote_configure(args.params, args.overrides)
        if args.command == "report":
            return run_report(args.params, args.overrides)
        if args.command == "predict":
            results = importlib.import_module(PREDICT_MODULE).predict(args.model, args.input, args.output)
            print(json.dumps([{"case": r.case, "status": r.status, "reason": r.reason, "mask": r.mask,
                               "volumes_ml": r.volumes_ml} for r in results], indent=2))
            return 0  # quarantined cases are reported, as harmonize does; none segmented raised above
        return run_stage(args.command, args.params, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (StageError, OutputLockedError) as error:
        print(f"error: {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
