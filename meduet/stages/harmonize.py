"""Stage ``harmonize``: raw multi-center datasets → one harmonized, versioned dataset.

Outputs (``paths.harmonized``): ``<dataset>/imagesTr|imagesTs|labelsTr/<case>.nii.gz``,
``records/<dataset>__<case>.json`` (per-case resume records) and ``manifest.csv``.
Reports (``paths.reports/harmonize``): ``metrics.json``, ``fingerprint.json``,
``montage.png``, ``report.md``.

Every case is independent: a bad one is quarantined and reported, the others finish.
Finished cases are reused by a rerun when their inputs and settings are unchanged, so an
interrupted run resumes where it stopped. Cases run on a local process pool, or as Ray tasks
across a cluster's nodes (``harmonize.executor``; a case whose task process dies is
quarantined like one that crashes a pool worker).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from meduet.config import HarmonizeConfig, Paths, RayConfig
from meduet.harmonize import qa
from meduet.harmonize.case import CaseSettings, harmonize_case, input_hash
from meduet.harmonize.datasets import CaseSpec, DatasetInfo, discover, unlisted
from meduet.harmonize.manifest import CaseRecord, write_manifest
from meduet.harmonize.settings import case_settings
from meduet.io.atomic import write_json
from meduet.io.exchange import Exchange, ExchangeError, Packed
from meduet.io.locks import output_lock
from meduet.io.prune import prune_unowned
from meduet.io.storage import is_remote, mirror
from meduet.parallel import process_pool
from meduet.stages import StageError, StageResult

log = logging.getLogger(__name__)


class HarmonizeError(StageError):
    """The stage as a whole failed (nothing usable, or ``fail_fast`` hit a bad case)."""


def discover_all(cfg: HarmonizeConfig, paths: Paths) -> list[CaseSpec]:
    specs: list[CaseSpec] = []
    for source in cfg.datasets:
        root = paths.local(source.root)
        info = DatasetInfo(source.name, Path(root), source.domain, source.body_part, source.layout,
                           source.include_unlabeled)
        if is_remote(root):
            try:
                info = replace(info, root=Path(mirror(str(root), paths.work / "s3-mirror", paths.s3_options)))
            except Exception as error:  # network/credentials/bucket errors come in many types
                specs.append(unlisted(info, f"{source.root}: cannot mirror remote dataset ({error})"))
                continue
            mirrored = (str(info.root.resolve()), str(root))  # cluster tasks read these files from the source
            specs.extend(replace(spec, mirrored_from=mirrored) for spec in discover(info))
            continue
        specs.extend(discover(info))
    return specs


# --------------------------------------------------------------------------- resume
def _record_path(out_dir: Path, key: str) -> Path:
    return out_dir / "records" / f"{key}.json"


def _reusable(out_dir: Path, spec: CaseSpec, digest: str, settings: CaseSettings) -> CaseRecord | None:
    """The earlier record of this case if it is still valid for these inputs and settings."""
    path = _record_path(out_dir, spec.key)
    if spec.problem or not digest or not path.is_file():
        return None
    try:
        record = CaseRecord.model_validate_json(path.read_text())
    except (ValidationError, OSError):
        return None
    if record.input_sha256 != digest or record.settings_hash != settings.settings_hash:
        return None
    outputs = [record.image, record.label] if record.status == "ok" else []
    if any(rel and not (out_dir / rel).is_file() for rel in outputs):
        return None
    return record


def _earlier_records(out_dir: Path, datasets: set[str]) -> list[CaseRecord]:
    """The last run's records of ``datasets`` (their outputs stay until the dataset can be listed again)."""
    records = []
    for path in sorted((out_dir / "records").glob("*.json")):
        try:
            record = CaseRecord.model_validate_json(path.read_text())
        except (ValidationError, OSError):
            continue
        if record.dataset in datasets and record.case_id != "dataset.json":
            records.append(record)
    return records


def _prune(out_dir: Path, records: list[CaseRecord]) -> int:
    """Remove outputs no current case owns (cases dropped from the inputs, temp files of a killed run)."""
    keep = {out_dir / "manifest.csv"}
    for record in records:
        keep.add(_record_path(out_dir, record.key))
        keep.update(out_dir / rel for rel in (record.image, record.label) if rel and record.status == "ok")
    return prune_unowned(out_dir, keep)


# --------------------------------------------------------------------------- parallel execution
# Where cases run: a local process pool, or Ray tasks (a cluster's nodes) of the ray section.
Executor = tuple[str, RayConfig | None, Paths | None]


def _run_pool(jobs: list[tuple[CaseSpec, str]], settings: CaseSettings, out_dir: Path,
              workers: int) -> Iterator[tuple[CaseSpec, CaseRecord | None]]:
    """Yield ``(spec, record)`` as cases finish; ``record`` is None if the worker died."""
    with process_pool(workers) as pool:
        futures: dict[Future, CaseSpec] = {
            pool.submit(harmonize_case, spec, settings, out_dir, digest): spec for spec, digest in jobs
        }
        for future in as_completed(futures):
            try:
                yield futures[future], future.result()
            except BrokenProcessPool:
                yield futures[future], None


@dataclass(frozen=True)
class Handover:
    """A case's input files for a task on a node that cannot open the driver's paths: in the
    exchange, or (a remote dataset) at their own URIs (``image_source``, ``label_source``)."""

    exchange: Exchange
    image: Packed | None = None
    label: Packed | None = None
    image_source: str | None = None
    label_source: str | None = None


def hand_over(spec: CaseSpec, exchange: Exchange, digest: str = "") -> tuple[CaseSpec, Handover]:
    """Upload a case's inputs (driver side); a file that cannot be read makes the case a quarantined one.

    The files of a remote dataset are not uploaded again: the task reads them where the driver's
    mirror got them, checked against the hashes of the mirror's copies. ``digest`` (the case's
    :func:`input_hash`, the hashes of its image and label joined by ``-``) spares reading a file
    input again to hash it; a file changed since then fails the task's check of its bytes.
    """
    if spec.problem:
        return spec, Handover(exchange)
    inputs = [path for path in (spec.image, spec.label) if path is not None]
    hashes = digest.split("-") if digest else []
    known = dict(zip(inputs, hashes)) if len(hashes) == len(inputs) else {}  # else a file vanished: hash anew

    def ship(path: Path | None) -> tuple[Packed | None, str | None]:
        if path is None:
            return None, None
        sha = known.get(path) if path.is_file() else None  # a folder's digest is one over all its files
        source = spec.source_uri(path)
        return (exchange.describe(path, sha), source) if source else (exchange.pack(path, sha), None)

    try:
        (image, image_source), (label, label_source) = ship(spec.image), ship(spec.label)
        return spec, Handover(exchange, image, label, image_source, label_source)
    except OSError as error:
        return replace(spec, problem=f"{spec.image}: cannot hand it over to the cluster's exchange ({error})"), \
            Handover(exchange)


def _harmonize_handed_over(spec: CaseSpec, settings: CaseSettings, digest: str, handover: Handover) -> CaseRecord:
    """Harmonize in a scratch folder from the exchange's copies; the outputs go back to the exchange.

    The record names the driver's files, as a local run's does (its messages included).
    """
    exchange = handover.exchange
    with tempfile.TemporaryDirectory(prefix="meduet-harmonize-") as scratch:
        inputs, out_dir = Path(scratch) / "in", Path(scratch) / "out"
        local = spec
        if handover.image and spec.image:  # a case with a problem is recorded without reading it
            label = exchange.unpack(handover.label, inputs / "label" / spec.label.name, handover.label_source) \
                if handover.label and spec.label else None
            local = replace(spec, label=label, image=exchange.unpack(handover.image, inputs / "image" / spec.image.name,
                                                                     handover.image_source))
        record = harmonize_case(local, settings, out_dir, digest)
        for relative, sha in ((record.image, record.image_sha256), (record.label, record.label_sha256)):
            if relative:
                exchange.put_file(out_dir / relative, sha)
    for copy, original in ((local.image, spec.image), (local.label, spec.label)):
        if copy is not None and original is not None:
            record.reason = record.reason.replace(str(copy), str(original))
    record.source_image, record.source_label = str(spec.image or ""), str(spec.label or "")
    return record


def harmonize_job(job: tuple[CaseSpec, CaseSettings, Path, str, Handover | None]) -> CaseRecord:
    """One case as a Ray task (a module-level function: Ray ships it by reference).

    With a handover the task opens no path of the driver's: it reads the case from the
    exchange and leaves its outputs there for the driver to fetch.
    """
    spec, settings, out_dir, digest, handover = job
    if handover is None:
        return harmonize_case(spec, settings, out_dir, digest)
    return _harmonize_handed_over(spec, settings, digest, handover)


def collect_outputs(record: CaseRecord, out_dir: Path, exchange: Exchange) -> None:
    """Fetch a handed-over case's outputs into the output folder (before its record marks it done)."""
    for relative, sha in ((record.image, record.image_sha256), (record.label, record.label_sha256)):
        if relative and record.status == "ok":
            exchange.get_file(sha, out_dir / relative)


def _run_ray(jobs: list[tuple[CaseSpec, str]], settings: CaseSettings, out_dir: Path, workers: int,
             ray: RayConfig, paths: Paths) -> Iterator[tuple[CaseSpec, CaseRecord | None]]:
    """Like :func:`_run_pool` on Ray: a task that fails (its process died: Ray retries such a
    task, then gives up) yields ``None`` for its case; the other cases go on.

    With ``ray.exchange`` the cases travel through it (see :mod:`meduet.io.exchange`).
    """
    # Ray (and torch, for the run spec) only when a cluster is used: seconds of imports otherwise,
    # which a one-machine run should not pay before it takes its output lock.
    from meduet import distributed as dist
    from meduet.engine.runs import RunSpec, Scaling

    exchange = Exchange(ray.exchange, paths.s3_options) if ray.exchange else None
    if exchange is None:
        items = [(spec, settings, out_dir, digest, None) for spec, digest in jobs]
    else:
        with ThreadPoolExecutor(max(1, workers)) as pool:  # uploads wait on the network: overlap them
            handed = list(pool.map(lambda job: hand_over(job[0], exchange, job[1]), jobs))
        items = [(spec, settings, out_dir, digest, handover)
                 for (spec, handover), (_, digest) in zip(handed, jobs, strict=True)]
    specs = {spec.key: spec for spec, _ in jobs}
    run = RunSpec.from_config(ray, paths, "harmonize", settings.settings_hash)
    for result in dist.map_tasks(harmonize_job, items, workers=workers, scaling=Scaling.for_tasks(ray), run=run,
                                 errors="yield"):
        if isinstance(result, dist.TaskError):
            spec = jobs[result.index][0]
            if isinstance(result.cause, ExchangeError):  # the storage failed, not the case: stop, resume later
                raise HarmonizeError(f"{spec.key}: {result.cause}; the finished cases are recorded, rerun to resume")
            log.warning("harmonize: %s", result)
            yield spec, None
        else:
            if exchange is not None:
                collect_outputs(result, out_dir, exchange)
            yield specs[result.key], result


def harmonize_cases(jobs: list[tuple[CaseSpec, str]], settings: CaseSettings, out_dir: Path,
                    workers: int, executor: Executor = ("pool", None, None)) -> Iterator[CaseRecord]:
    """Harmonize cases in parallel; a case that crashes its worker process is quarantined.

    A crash (e.g. a native reader segfault on a malformed file) breaks the whole pool, so
    the cases it took down are retried one per fresh pool to single out the culprit (on Ray
    only the crashed task fails, and Ray has retried it already).
    """
    kind, ray, paths = executor
    crashed: list[tuple[CaseSpec, str]] = []
    digests = {spec.key: digest for spec, digest in jobs}
    finished = _run_ray(jobs, settings, out_dir, workers, ray, paths) if kind == "ray" and ray and paths \
        else _run_pool(jobs, settings, out_dir, workers)
    for spec, record in finished:
        if record is None:
            crashed.append((spec, digests[spec.key]))
        else:
            yield record
    for spec, digest in crashed:
        record = None
        if kind != "ray":  # Ray has retried the task already; a pool retries it alone to single it out
            (_, record), = _run_pool([(spec, digest)], settings, out_dir, 1)
        if record is None:
            record = CaseRecord(key=spec.key, dataset=spec.dataset, case_id=spec.case_id, domain=spec.domain,
                                body_part=spec.body_part, split=spec.split, status="quarantined",
                                reason=f"{spec.image}: worker process crashed while reading or processing this case",
                                source_image=str(spec.image or ""), input_sha256=digest,
                                settings_hash=settings.settings_hash)
        yield record


def executor_kind(cfg: HarmonizeConfig, ray: RayConfig | None) -> str:
    """``pool`` or ``ray``: ``auto`` picks Ray when a cluster is named."""
    if cfg.executor != "auto":
        return cfg.executor
    named = os.environ.get("RAY_ADDRESS") or (ray.address if ray else None)
    return "ray" if named and named != "local" else "pool"


def _hash_inputs(specs: Iterable[CaseSpec], workers: int) -> list[str]:
    # hashlib releases the GIL on large buffers: threads overlap disk reads and hashing.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(input_hash, specs))


# --------------------------------------------------------------------------- the stage
def run(cfg: HarmonizeConfig, paths: Paths, ray: RayConfig | None = None) -> StageResult:
    """Harmonize every configured dataset; see the module docstring for outputs.

    One run at a time per output folder: a second one is refused with a message naming the first.
    ``ray``: the cluster for ``executor: ray`` (or ``auto`` with a cluster named).
    """
    with output_lock(paths.work / "locks", paths.harmonized):
        return _run(cfg, paths, ray or RayConfig())


def _run(cfg: HarmonizeConfig, paths: Paths, ray: RayConfig) -> StageResult:
    start = time.perf_counter()
    if not cfg.datasets:
        raise HarmonizeError("harmonize.datasets is empty: list at least one dataset in params.yaml")
    out_dir, report_dir = paths.harmonized, paths.reports / "harmonize"
    settings = case_settings(cfg)
    specs = discover_all(cfg, paths)
    digests = _hash_inputs(specs, cfg.workers)

    records: list[CaseRecord] = []
    jobs: list[tuple[CaseSpec, str]] = []
    for spec, digest in zip(specs, digests):
        previous = _reusable(out_dir, spec, digest, settings)
        if previous is not None:
            records.append(previous)
        else:
            jobs.append((spec, digest))
    reused = len(records)
    kind = executor_kind(cfg, ray)
    log.info("harmonize: %d case(s), %d reused from an earlier run, %d to process with %d worker(s) (%s)",
             len(specs), reused, len(jobs), cfg.workers, "Ray tasks" if kind == "ray" else "local processes")

    progress = tqdm(total=len(jobs), desc="harmonize", unit="case", mininterval=2.0)
    for record in harmonize_cases(jobs, settings, out_dir, cfg.workers, (kind, ray, paths)):
        write_json(_record_path(out_dir, record.key), record.model_dump(mode="json"))
        records.append(record)
        progress.update()
        if record.status != "ok":
            log.warning("quarantined %s: %s", record.key, record.reason)
            if cfg.fail_fast:
                progress.close()
                raise HarmonizeError(f"fail_fast: {record.key}: {record.reason}")
    progress.close()

    # A dataset that could not be listed keeps its earlier cases, outputs and records:
    # pruning may only remove what a listed dataset no longer has.
    unreachable = {spec.dataset: spec.problem for spec in specs if spec.unlisted}
    kept = _earlier_records(out_dir, set(unreachable))
    for dataset, problem in unreachable.items():
        log.warning("harmonize: dataset %s could not be listed (%s); its %d earlier case(s) are kept as they were",
                    dataset, problem, sum(r.dataset == dataset for r in kept))
    records.extend(kept)
    pruned = _prune(out_dir, records)
    write_manifest(out_dir / "manifest.csv", records)
    ok = [r for r in records if r.status == "ok"]
    processed_seconds = time.perf_counter() - start
    metrics = {
        "cases": len(records),
        "ok": len(ok),
        "quarantined": len(records) - len(ok),
        "reused": reused,
        "processed": len(jobs),
        "pruned_files": pruned,
        "unlisted_datasets": unreachable,
        "kept_from_unlisted": len(kept),
        "seconds": round(processed_seconds, 3),
        "volumes_per_s": round(len(jobs) / processed_seconds, 3) if jobs else None,
        "ok_per_domain": dict(sorted(Counter(r.domain for r in ok).items())),
        "executor": kind,
    }
    write_json(report_dir / "metrics.json", metrics)
    write_json(report_dir / "fingerprint.json", qa.fingerprint(records))
    qa.report(records, metrics, report_dir / "report.md")
    montage = qa.montage(records, out_dir, report_dir / "montage.png")
    outputs = {"manifest": out_dir / "manifest.csv", "metrics": report_dir / "metrics.json",
               "fingerprint": report_dir / "fingerprint.json", "report": report_dir / "report.md"}
    if montage is not None:
        outputs["montage"] = montage
    log.info("harmonize: %s", json.dumps(metrics))
    if not ok:
        raise HarmonizeError(f"no usable case remains ({len(records)} quarantined); see {report_dir / 'report.md'}")
    return StageResult("harmonize", outputs, metrics)
