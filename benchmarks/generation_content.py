"""Which content vector a generated crop is conditioned on, against how real the crops look.

The DiT is trained on crops conditioned on each crop's own content (its teacher tokens' mean).
``synthesize`` generates a crop from a content vector of a training volume: with
``generation_content: volume`` the volume's mean over its windows (as the authors generate),
with ``window`` one of its windows that is at least ``min_body_fraction`` body (a crop's content,
drawn like the real body crops ``evaluate-synthesis`` compares with). Both sample the same DiT (the
store's) with the same seeds; for each condition and seed ``synthesize`` and ``evaluate-synthesis``
run in ``<work>/generation_content/<condition>-seed<seed>/`` (generated crops only) and report the
evaluator-space Fréchet and kernel distances against their real-vs-real floors, and the generated
crops' style accuracy. The seed is ``synthesize.seed``: the content draws and the sampling noise.

First it prints where the two kinds of vector lie against the contents the DiT was trained on
(the content embedder reads a vector's direction only): for each vector the cosine to the nearest
of 512 training crops' contents, next to the same for other training crops (leave-one-out).

    python benchmarks/generation_content.py [--params params.yaml] [--seeds 0 1 2]
        [--conditions volume window] [--set synthesize.samples_per_site=32 ...]

Needs the latent cache, the pretrained MeDUET, the teacher factors, the VAE, the trained DiT and the
synthesis evaluator (``dvc repro train_diffusion extract_factors train_evaluator``, or ``make run``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from machine import cpu_name  # benchmarks/machine.py (this script's folder)
from synthesis_scoring import generation_scores, mean_sd, score_samples

from meduet.artifacts.factors import load_factors
from meduet.artifacts.pretrained import load_meduet, meduet_path
from meduet.config import MeduetConfig, Paths, load_config
from meduet.data.latent_crops import LatentCropSampler
from meduet.data.latents import read_manifest, read_scale
from meduet.engine.diffusion_training import teacher_factors
from meduet.harmonize.intensity import range_level
from meduet.harmonize.manifest import harmonized_range
from meduet.harmonize.manifest import read_manifest as read_harmonized
from meduet.io.atomic import write_json
from meduet.stages.synthesize import content_donors

CONDITIONS = ("volume", "window")


def _nearest(vectors: torch.Tensor, reference: torch.Tensor, *, leave_one_out: bool = False) -> dict:
    """Cosine of each of ``vectors (n, E)`` to its nearest row of ``reference (m, E)``: mean and 10th percentile."""
    cosine = F.normalize(vectors, dim=-1) @ F.normalize(reference, dim=-1).T  # (n, m)
    if leave_one_out:
        cosine.fill_diagonal_(-1.0)
    best = cosine.max(dim=1).values.numpy()
    return {"n": len(vectors), "nearest_cosine_mean": float(best.mean()),
            "nearest_cosine_p10": float(np.percentile(best, 10))}


@torch.no_grad()
def content_geometry(cfg: MeduetConfig, paths: Paths, crops: int = 512) -> dict:
    """Volume and body-window content vectors against training crops' own contents."""
    arrays, records, meta = load_factors(paths.factors)
    teacher = load_meduet(meduet_path(paths), "teacher")[0]
    train = [r for r in read_manifest(paths.latents) if r.split == "train"]
    sampler = LatentCropSampler([paths.latents / r.latent for r in train], [0] * len(train),
                                cfg.train_diffusion.crop, read_scale(paths.latents), cfg.train_diffusion.seed)
    trained_on = torch.cat([teacher_factors(teacher, sampler.batch(step, 32)[0])[1] for step in range(crops // 32)])
    harmonized_records = read_harmonized(paths.harmonized / "manifest.csv")
    harmonized = {r.key: paths.harmonized / r.image for r in harmonized_records}
    level = range_level(cfg.synthesize.body_threshold,
                        harmonized_range({r.key: r.window for r in harmonized_records if r.window},
                                         paths.harmonized / "manifest.csv"))
    result = {"training crops (others)": _nearest(trained_on, trained_on, leave_one_out=True)}
    for condition in CONDITIONS:
        section = cfg.synthesize.model_copy(update={"generation_content": condition})
        donors = content_donors(section, arrays=arrays, factor_records=records, harmonized_images=harmonized,
                                window=tuple(meta["window"]), body_level=level)
        vectors = torch.from_numpy(np.stack([arrays[d.array][d.row] for d in donors])).float()
        result[f"{condition} contents"] = _nearest(vectors, trained_on)
    return result


def run_condition(cfg: MeduetConfig, paths: Paths, condition: str, seed: int) -> dict:
    """Sample and score the store's DiT with one content condition and seed; one result row."""
    folder = paths.work / "generation_content" / f"{condition}-seed{seed}"
    start = time.perf_counter()
    metrics = score_samples(cfg, paths, folder, sampling={"generation_content": condition, "seed": seed})
    return {"condition": condition, "seed": seed, "seconds": time.perf_counter() - start,
            **generation_scores(metrics)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.params, args.overrides)
    paths = Paths.resolve(cfg, args.params.resolve().parent)
    geometry = content_geometry(cfg, paths)
    print(f"CPU: {cpu_name()}")
    print(f"{'content vectors':<26}{'n':>6}{'cosine to nearest training crop: mean':>40}{'10th pct':>10}")
    for name, g in geometry.items():
        print(f"{name:<26}{g['n']:>6}{g['nearest_cosine_mean']:>40.3f}{g['nearest_cosine_p10']:>10.3f}")
    rows = [run_condition(cfg, paths, condition, seed) for seed in args.seeds for condition in args.conditions]
    write_json(paths.work / "generation_content" / "results.json",
               {"cpu": cpu_name(), "overrides": args.overrides, "geometry": geometry, "rows": rows})
    print(f"{rows[0]['samples']} generated crops per run; the same DiT (the store's), {cfg.synthesize.sampling_steps} "
          f"sampling steps")
    print(f"{'condition':<10}{'seed':>5}{'Fréchet (95 % CI)':>24}{'floor':>8}{'x floor':>9}{'KID':>9}"
          f"{'KID floor':>11}{'style acc. (95 % CI)':>24}{'s':>6}")
    for r in rows:
        lo, hi = r["fd_ci95"]
        slo, shi = r["style_accuracy_ci95"]
        print(f"{r['condition']:<10}{r['seed']:>5}{r['fd']:>10.1f} ({lo:.1f}-{hi:.1f}){r['floor']:>8.1f}"
              f"{r['ratio']:>9.1f}{r['kid']:>9.3f}{r['kid_floor']:>11.3f}{r['style_accuracy']:>10.2f} "
              f"({slo:.2f}-{shi:.2f}){r['seconds']:>6.0f}")
    sites = sorted(rows[0]["fd_per_site"])
    print("Fréchet per target site (its floor) and the VAE's ceiling (held-out real crops' round trips):")
    print(f"{'condition':<10}{'seed':>5}" + "".join(f"{s:>16}" for s in sites) + f"{'overall':>10}")
    ceiling = rows[0]["vae_ceiling_fd"]
    print(f"{'VAE round trip':<15}" + "".join(f"{ceiling.get(s, float('nan')):>16.1f}" for s in sites)
          + f"{ceiling.get('overall', float('nan')):>10.1f}")
    for r in rows:
        per_site = "".join(f"{r['fd_per_site'][s][0]:>9.1f} ({r['fd_per_site'][s][1]:>4.1f})" for s in sites)
        print(f"{r['condition']:<10}{r['seed']:>5}{per_site}{r['fd']:>10.1f}")
    if len(args.seeds) > 1:
        print("mean ± sd over seeds:")
        for condition in args.conditions:
            runs = [r for r in rows if r["condition"] == condition]
            print(f"  {condition:<8} Fréchet x floor {mean_sd(runs, 'ratio')}, KID {mean_sd(runs, 'kid')}, generated "
                  f"style accuracy {mean_sd(runs, 'style_accuracy')}")


if __name__ == "__main__":
    main()
