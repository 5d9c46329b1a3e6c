"""Which style the DiT is trained on, against how well its samples take a site's style.

``synthesize`` conditions every sample on a *site* style: the mean teacher style of the
site's training volumes, each a mean over the volume's windows (``extract-factors``). The
DiT can be trained on the crop's own style (``train_diffusion.style_condition: crop``, the
sample's own factors, as the authors) or on its whole volume's (``volume``, the vectors that
site styles average). For each condition and seed the stage trains the DiT
(``meduet.stages.train_diffusion.run``, Ray Train) into ``<work>/style_condition/<condition>-
seed<seed>/`` (latent cache, MeDUET, VAE and evaluator shared), then ``synthesize`` and
``evaluate-synthesis`` score it: the evaluator's site head on the generated crops (style
accuracy, Wilson interval), their evaluator-space Fréchet and kernel distances, and with
``--translations N`` also N whole-volume translations of held-out scans (style accuracy,
organ Dice against the round trip's, the counterfactual MAE to the real s@B). Prints a row per
run and the per-condition mean; writes ``results.json`` beside the runs.

First it prints where the two conditions point (the style embedder reads a style's direction
only): the share of styles whose nearest site style (cosine) is their own site's, for training
crops' own styles, training volumes' styles and held-out volumes' styles, and the mean cosine of
each to its own and to the other sites' styles.

    python benchmarks/style_condition.py [--params params.yaml] [--seeds 0 1 2] [--translations 12]
        [--conditions crop volume] [--set train_diffusion.steps=1500 ...]

Needs the latent cache, the pretrained MeDUET, the teacher factors, the VAE and the synthesis
evaluator (``dvc repro extract_factors train_evaluator``, or ``make run``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from machine import cpu_name  # benchmarks/machine.py (this script's folder)
from synthesis_scoring import generation_scores, link_models, mean_sd, score_samples, translation_scores

from meduet.artifacts.factors import load_factors
from meduet.artifacts.pretrained import load_meduet, meduet_path
from meduet.config import Paths, load_config
from meduet.data.latent_crops import LatentCropSampler
from meduet.data.latents import read_manifest, read_scale
from meduet.engine.diffusion_training import teacher_factors
from meduet.io.atomic import write_json
from meduet.stages import train_diffusion
from meduet.stages.synthesize import site_styles

CONDITIONS = ("crop", "volume")


def _nearest_site(styles: torch.Tensor, sites: torch.Tensor, centres: torch.Tensor) -> dict:
    """``styles (n, S)`` of sites ``(n,)`` against the site styles ``centres (K, S)``, by cosine."""
    cosine = F.normalize(styles, dim=-1) @ F.normalize(centres, dim=-1).T  # (n, K)
    own = cosine.gather(1, sites[:, None])[:, 0]
    others = (cosine.sum(1) - own) / (len(centres) - 1)
    return {"n": len(styles), "nearest_is_own_site": float((cosine.argmax(1) == sites).float().mean()),
            "cosine_own": float(own.mean()), "cosine_other": float(others.mean())}


@torch.no_grad()
def style_geometry(paths: Paths, crop: int, seed: int, crops: int = 256) -> dict:
    """Training crops' own styles and whole volumes' styles against the site styles ``synthesize`` uses."""
    arrays, records, meta = load_factors(paths.factors)
    sites = list(meta["domains"])
    centres = torch.from_numpy(np.stack([site_styles(arrays, records, sites)[s] for s in sites]))  # (K, S)
    teacher = load_meduet(meduet_path(paths), "teacher")[0]
    train = [r for r in read_manifest(paths.latents) if r.split == "train"]
    sampler = LatentCropSampler([paths.latents / r.latent for r in train], [sites.index(r.domain) for r in train],
                                crop, read_scale(paths.latents), seed)
    own, own_sites = [], []
    for step in range(crops // 32):
        x0, site = sampler.batch(step, 32)  # (32, C, c, c, c), (32,)
        own.append(teacher_factors(teacher, x0)[2])
        own_sites.append(site)
    result = {"training crops (own style)": _nearest_site(torch.cat(own), torch.cat(own_sites), centres)}
    for split in ("train", "held_out"):
        chosen = [r for r in records if r.split == split]
        result[f"{split} volumes"] = _nearest_site(torch.from_numpy(arrays["teacher_style"][[r.row for r in chosen]]),
                                                   torch.tensor([sites.index(r.domain) for r in chosen]), centres)
    return result


def run_condition(params: Path, overrides: list[str], condition: str, seed: int, translations: int) -> dict:
    """Train with one style condition and seed, then score its samples; one result row."""
    base = load_config(params, overrides)
    shared = Paths.resolve(base, params.resolve().parent)
    folder = shared.work / "style_condition" / f"{condition}-seed{seed}"
    link_models(folder, shared, ("pretrain", "vae", "evaluator"))
    cfg = load_config(params, [*overrides, f"train_diffusion.style_condition={condition}",
                               f"train_diffusion.seed={seed}", f"paths.models_dir={folder / 'models'}",
                               f"paths.reports_dir={folder / 'reports'}", f"paths.work_dir={folder / 'work'}"])
    paths = Paths.resolve(cfg, params.resolve().parent)
    start = time.perf_counter()
    trained = train_diffusion.run(cfg.train_diffusion, paths, ray=cfg.ray)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = score_samples(cfg, paths, folder / "samples", sampling={"translations": translations})
    row = {"condition": condition, "seed": seed, "train_seconds": seconds, "score_seconds": time.perf_counter() - start,
           "val_loss": trained.metrics["val_loss"], **generation_scores(metrics)}
    return row | translation_scores(metrics) if translations else row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--translations", type=int, default=0, help="whole-volume translations to score (0: none)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.params, args.overrides)
    shared = Paths.resolve(cfg, args.params.resolve().parent)
    geometry = style_geometry(shared, cfg.train_diffusion.crop, cfg.train_diffusion.seed)
    print(f"CPU: {cpu_name()}")
    print(f"{'styles':<28}{'n':>5}{'nearest site style is own':>27}{'cosine to own site':>20}{'to others':>11}")
    for name, g in geometry.items():
        print(f"{name:<28}{g['n']:>5}{g['nearest_is_own_site']:>27.2f}{g['cosine_own']:>20.3f}"
              f"{g['cosine_other']:>11.3f}")
    rows = [run_condition(args.params, args.overrides, condition, seed, args.translations)
            for seed in args.seeds for condition in args.conditions]
    write_json(shared.work / "style_condition" / "results.json",
               {"cpu": cpu_name(), "overrides": args.overrides, "geometry": geometry, "rows": rows})
    print(f"{cfg.train_diffusion.steps} training steps; {rows[0]['samples'] if rows else 0} generated crops per run")
    header = (f"{'condition':<10}{'seed':>5}{'val loss':>10}{'gen. style acc. (95 % CI)':>28}{'Fréchet':>9}"
              f"{'x floor':>9}")
    if args.translations:
        header += f"{'transl. style acc. (95 % CI)':>31}{'Dice / round trip':>19}{'cf. won':>9}{'cf. MAE HU':>12}"
    print(header + f"{'s':>6}")
    for r in rows:
        lo, hi = r["style_accuracy_ci95"]
        line = (f"{r['condition']:<10}{r['seed']:>5}{r['val_loss']:>10.4f}{r['style_accuracy']:>14.2f} "
                f"({lo:.2f}-{hi:.2f}){r['fd']:>13.1f}{r['ratio']:>9.1f}")
        if args.translations:
            tlo, thi = r["translation_style_accuracy_ci95"]
            line += (f"{r['translation_style_accuracy']:>17.2f} ({tlo:.2f}-{thi:.2f})"
                     f"{r['dice_ratio_to_roundtrip']:>19.2f}{r['counterfactual_closer']:>9.2f}"
                     f"{r['counterfactual_mae_hu']:>12.1f}")
        print(line + f"{r['train_seconds'] + r['score_seconds']:>6.0f}")
    if len(args.seeds) > 1:
        print("mean ± sd over seeds:")
        for condition in args.conditions:
            runs = [r for r in rows if r["condition"] == condition]
            print(f"  {condition:<8} generated style accuracy {mean_sd(runs, 'style_accuracy')}, Fréchet "
                  f"x floor {mean_sd(runs, 'ratio')}, translation style accuracy "
                  f"{mean_sd(runs, 'translation_style_accuracy')}, Dice / round trip "
                  f"{mean_sd(runs, 'dice_ratio_to_roundtrip')}")


if __name__ == "__main__":
    main()
