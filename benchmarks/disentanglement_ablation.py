"""Ablation of MeDUET's parts on the project's latent cache: full, no MFTD, no SiQC, no GRL.

Each variant is the params file's ``pretrain`` section plus one switch, trained, its
factors extracted and evaluated with the same stage functions the pipeline runs, each into
its own folders under ``<work>/ablation/<variant>-seed<seed>`` (the latent cache is shared).
Prints one row per run: the last logged loss terms, the probe accuracies (site from content,
from style, from the latents' own statistics) and the swap test.

    python benchmarks/disentanglement_ablation.py [--params params.yaml] [--variants full no_grl]
        [--seeds 0 1] [--set pretrain.steps=1500 ...]

Needs the latent cache (``dvc repro encode_latents`` or ``make run`` first).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from meduet.config import Paths, load_config
from meduet.stages import evaluate_disentanglement, extract_factors, pretrain

VARIANTS = {
    "full": [],
    "no_mftd": ["pretrain.use_mftd=false"],
    "no_siqc": ["pretrain.use_siqc=false"],
    "no_grl": ["pretrain.use_grl=false"],
}


def run_variant(params: Path, overrides: list[str], variant: str, seed: int) -> dict:
    name = f"{variant}-seed{seed}"
    base = load_config(params, overrides)
    folder = Path(base.paths.work_dir) / "ablation" / name
    cfg = load_config(params, [*overrides, *VARIANTS[variant], f"pretrain.seed={seed}",
                               f"paths.models_dir={folder / 'models'}", f"paths.reports_dir={folder / 'reports'}",
                               f"paths.factors_dir={folder / 'factors'}"])
    paths = Paths.resolve(cfg, params.resolve().parent)
    start = time.perf_counter()
    trained = pretrain.run(cfg.pretrain, paths, ray=cfg.ray)
    seconds = time.perf_counter() - start
    extract_factors.run(cfg.extract_factors, paths)
    metrics = evaluate_disentanglement.run(cfg.evaluate_disentanglement, paths).metrics
    swap = metrics.get("swap", {})
    return {"run": name, "seconds": seconds, **trained.metrics["final"], "content": metrics["content_accuracy"],
            "style": metrics["style_accuracy"], "latent_stats": metrics["latent_statistics_accuracy"],
            "swap": swap.get("style_closer_to_b_roundtrip", float("nan")),
            "content_kept": swap.get("content_closer_to_a_roundtrip", float("nan")),
            "chance": metrics["chance"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    rows = [run_variant(args.params, args.overrides, variant, seed) for seed in args.seeds for variant in args.variants]
    columns = [("run", "run", 0), ("seconds", "train s", 0), ("rec", "rec", 3), ("domain_content", "dom_c", 3),
               ("domain_style", "dom_s", 3), ("mftd", "mftd", 3), ("siqc", "siqc", 2), ("content", "content", 2),
               ("style", "style", 2), ("latent_stats", "stats", 2), ("swap", "swap", 2), ("content_kept", "kept", 2)]
    print(f"\n{'run':<16}" + "".join(f"{header:>9}" for _, header, _ in columns[1:]))
    for row in rows:
        print(f"{row['run']:<16}" + "".join(f"{row[key]:>9.{digits}f}" for key, _, digits in columns[1:]))
    print(f"\ncontent/style/stats: cross-validated site-probe accuracy from the content factor, the style factor "
          f"and the latents' per-channel mean/std (chance {rows[0]['chance']:.2f}); swap: pairs whose swapped "
          f"style is nearer B's round trip than A's; kept: pairs whose content stays nearer A's round trip. "
          f"Loss terms: the last logged interval.")


if __name__ == "__main__":
    main()
