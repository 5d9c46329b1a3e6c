"""Synthesized images with and without the target site's fine texture (``synthesize.texture``).

The VAE's decoder draws the same ~4 HU of fine texture for every site, where the real scans
carry 15-51 HU (``benchmarks/vae_ceiling.py``). ``texture: site`` adds Gaussian noise fitted per
site to what its training volumes lose in their round trips. The same DiT (the store's), seeds
and latents are sampled with ``texture: none`` and ``site``; for each setting and seed
``synthesize`` and ``evaluate-synthesis`` run in ``<work>/texture/<setting>-seed<seed>/`` and
report what texture can change: the generated crops' Fréchet distance (overall and per site)
and style accuracy; with ``--translations N`` also the translations' style accuracy, their organ
Dice against the round trip's (the evaluator segments noisier images) and, with texture, against the
round trip's with the same texture drawn on it (the reference rendered as the translation is), and
the counterfactual MAE to the real s@B (independent noise adds error). The fitted textures come first.

    python benchmarks/texture.py [--params params.yaml] [--seeds 0 1 2] [--translations 12]

Needs the store of ``dvc repro synthesize train_evaluator`` (or ``make run``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py (this script's folder)
from synthesis_scoring import generation_scores, mean_sd, score_samples, translation_scores

from meduet.artifacts.synthesis import read_synthesis
from meduet.config import Paths, load_config
from meduet.io.atomic import write_json

SETTINGS = ("none", "site")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--translations", type=int, default=0, help="whole-volume translations to score (0: none)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.params, args.overrides)
    paths = Paths.resolve(cfg, args.params.resolve().parent)
    rows, textures = [], {}
    for seed in args.seeds:
        for setting in SETTINGS:
            folder = paths.work / "texture" / f"{setting}-seed{seed}"
            start = time.perf_counter()
            metrics = score_samples(cfg, paths, folder, sampling={"texture": setting, "seed": seed,
                                                                  "translations": args.translations})
            row = {"setting": setting, "seed": seed, "seconds": time.perf_counter() - start,
                   **generation_scores(metrics)}
            rows.append(row | translation_scores(metrics) if args.translations else row)
            textures = read_synthesis(folder / "synthesis")[1]["site_textures"] or textures
    write_json(paths.work / "texture" / "results.json",
               {"cpu": cpu_name(), "overrides": args.overrides, "textures": textures, "rows": rows})
    print(f"CPU: {cpu_name()}")
    print("fitted textures (amplitude in intensity units x 1000; correlation sigma in voxels):")
    for site, texture in sorted(textures.items()):
        print(f"  {site}: {1000 * texture['amplitude']:.1f} at sigma {texture['sigma']:.2f}")
    sites = sorted(rows[0]["fd_per_site"])
    header = f"{'texture':<8}{'seed':>5}{'Fréchet x floor':>16}" + "".join(f"{s:>9}" for s in sites) + \
        f"{'gen. style acc.':>16}"
    if args.translations:
        header += (f"{'transl. style acc.':>19}{'Dice / round trip':>19}{'/ textured':>11}{'cf. won':>9}"
                   f"{'cf. MAE HU':>12}")
    print(header + f"{'s':>6}")
    for r in rows:
        line = (f"{r['setting']:<8}{r['seed']:>5}{r['ratio']:>16.1f}"
                + "".join(f"{r['fd_per_site'][s][0]:>9.1f}" for s in sites) + f"{r['style_accuracy']:>16.2f}")
        if args.translations:
            textured = r["dice_ratio_to_textured_roundtrip"]
            line += (f"{r['translation_style_accuracy']:>19.2f}{r['dice_ratio_to_roundtrip']:>19.2f}"
                     + (f"{textured:>11.2f}" if textured is not None else f"{'-':>11}") +
                     f"{r['counterfactual_closer']:>9.2f}{r['counterfactual_mae_hu']:>12.1f}")
        print(line + f"{r['seconds']:>6.0f}")
    if len(args.seeds) > 1:
        print("mean ± sd over seeds:")
        for setting in SETTINGS:
            runs = [r for r in rows if r["setting"] == setting]
            print(f"  {setting:<5} Fréchet x floor {mean_sd(runs, 'ratio')}, generated style accuracy "
                  f"{mean_sd(runs, 'style_accuracy')}, translation style accuracy "
                  f"{mean_sd(runs, 'translation_style_accuracy')}, Dice / round trip "
                  f"{mean_sd(runs, 'dice_ratio_to_roundtrip')} (textured "
                  f"{mean_sd(runs, 'dice_ratio_to_textured_roundtrip')}), counterfactual MAE "
                  f"{mean_sd(runs, 'counterfactual_mae_hu')}")


if __name__ == "__main__":
    main()
