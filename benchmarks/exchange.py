"""What the cluster exchange (``ray.exchange``) costs: data stages with their files handed over vs opened in place.

    python benchmarks/exchange.py [--params params.yaml] [--repeats 3]

Runs ``harmonize`` (as Ray tasks) and ``encode-latents`` on a local Ray, over the configured
datasets and the demo run's VAE (``models/vae/vae.pt``: run ``make run`` first), each run in a
fresh project folder: ``shared`` with the tasks opening the project folder (one machine, or a
shared file system) and ``exchange`` with every file handed over through a moto S3 server on
127.0.0.1, a fresh prefix per run (a first run: nothing there to reuse). Arms alternate; each
stage's seconds are the median of ``--repeats``. Loopback S3 carries no network: what the ratio
shows is the exchange's own work on the node and the driver (hashing, copies, requests, with
moto's CPU on the same cores), and MB per volume is what a real cluster's links would carry.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from machine import describe  # benchmarks/machine.py (this script's folder)

from flows.local import moto_s3
from meduet.config import MeduetConfig, Paths, load_config
from meduet.stages import encode_latents, harmonize

REPO = Path(__file__).resolve().parents[1]


def _project(cfg: MeduetConfig, root: Path, exchange: str | None, endpoint: str) -> tuple[MeduetConfig, Paths]:
    """``cfg`` for a fresh project at ``root``: the datasets where they are, the demo VAE copied in."""
    source = Paths.resolve(cfg, REPO)
    datasets = [d.model_copy(update={"root": str(source.local(d.root))}) for d in cfg.harmonize.datasets]
    cfg = cfg.model_copy(update={
        "harmonize": cfg.harmonize.model_copy(update={"datasets": datasets, "executor": "ray", "workers": 2}),
        "encode_latents": cfg.encode_latents.model_copy(update={"workers": 2}),
        "ray": cfg.ray.model_copy(update={"exchange": exchange, "local_num_cpus": None, "stage_cpus": {}}),
        "storage": cfg.storage.model_copy(update={"s3_endpoint_url": endpoint}),
    })
    paths = Paths.resolve(cfg, root)
    (paths.models / "vae").mkdir(parents=True)
    shutil.copy(source.models / "vae" / "vae.pt", paths.models / "vae" / "vae.pt")
    return cfg, paths


def _run(cfg: MeduetConfig, paths: Paths) -> dict[str, float]:
    seconds = {}
    start = time.perf_counter()
    harmonize.run(cfg.harmonize, paths, cfg.ray)
    seconds["harmonize"] = time.perf_counter() - start
    start = time.perf_counter()
    encode_latents.run(cfg.encode_latents, paths, cfg.ray)
    seconds["encode_latents"] = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(args.params)
    if not (Paths.resolve(cfg, REPO).models / "vae" / "vae.pt").is_file():
        raise SystemExit("models/vae/vae.pt is missing: run `make run` (or the demo stages up to train_vae) first")
    print(f"machine: {describe()}")
    with tempfile.TemporaryDirectory(prefix="meduet-bench-exchange-") as folder, moto_s3(Path(folder)) as s3:
        os.environ.update(s3.env)
        fs = s3.filesystem()
        times: dict[str, dict[str, list[float]]] = {"shared": {}, "exchange": {}}
        sent: list[tuple[int, int]] = []  # (objects, bytes) per exchange run
        cases = 0
        for repeat in range(-1, args.repeats):  # run -1 warms Ray up and is not counted
            for arm in ("shared", "exchange"):
                prefix = f"{s3.bucket}/run{repeat}"
                exchange = f"s3://{prefix}" if arm == "exchange" else None
                arm_cfg, paths = _project(cfg, Path(folder) / f"{arm}{repeat}", exchange, s3.endpoint_url)
                seconds = _run(arm_cfg, paths)
                cases = sum(1 for _ in (paths.latents).rglob("*.npy"))
                if repeat >= 0:
                    for stage, value in seconds.items():
                        times[arm].setdefault(stage, []).append(value)
                    if exchange:
                        found = fs.find(prefix, detail=True)
                        sent.append((len(found), sum(info["size"] for info in found.values())))
                for produced in (paths.harmonized, paths.latents):  # the Ray session files stay
                    shutil.rmtree(produced)
    print(f"\n{cases} volumes, harmonize as Ray tasks (2 workers), encode-latents (2 workers); "
          f"median of {args.repeats} runs per arm, arms alternating")
    print(f"{'stage':<16} {'shared FS s (range)':>22} {'exchange s (range)':>22} {'ratio':>6}")
    for stage in times["shared"]:
        shared, through = times["shared"][stage], times["exchange"][stage]
        cells = [f"{statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f})" for t in (shared, through)]
        ratio = statistics.median(through) / statistics.median(shared)
        print(f"{stage:<16} {cells[0]:>22} {cells[1]:>22} {ratio:>5.2f}×")
    objects, size = sent[0]
    print(f"exchange per run: {objects} objects, {size / 1e6:.1f} MB ({size / 1e6 / cases:.2f} MB per volume: "
          "raw case, harmonized volume and its label, latent, once each; the VAE once)")


if __name__ == "__main__":
    main()
