"""How real the VAE's own reconstructions look to the synthesis evaluator: the ceiling of every
synthesis goal that is read through the evaluator (Fréchet distance, style accuracy).

A generator can do no better than decoding the real latents. For the store's VAE and for VAEs
trained with other settings (``--variant name key=value ...``: each trained through the stage
into ``<work>/vae_ceiling/<name>/`` and the held-out volumes encoded there), this reads the
held-out real volumes' round trips with the store's evaluator, as ``evaluate-synthesis`` reads
generated crops: the Fréchet distance of the round trips' body crops (cut where the real crops
are) to the train split's real crops, per site and overall, against the real-vs-real floor;
the share of those crops the site head assigns to their own site; and each whole round trip's
site (the mean over its body crops); and the fine texture the site's scanner leaves (noise, kernel)
against what the decoder re-creates: the standard deviation, over body voxels, of each volume
minus its 3³ box mean, in HU (real and round trip, per site). The VAE stage's held-out
PSNR/SSIM/MAE and training time come with each row.

    python benchmarks/vae_ceiling.py [--params params.yaml] [--variant adv vae.adv_weight=0.1 ...]

Needs the harmonized images, the latent cache, the VAE, the synthesis store and the synthesis
evaluator (``dvc repro synthesize train_evaluator``, or ``make run``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_name  # benchmarks/machine.py (this script's folder)
from synthesis_scoring import link_models

from meduet.config import MeduetConfig, Paths, load_config
from meduet.io.atomic import write_json
from meduet.stages import encode_latents, evaluate_synthesis, train_vae


def fine_texture(image: torch.Tensor, body: torch.Tensor, hu_per_unit: float) -> float:
    """Standard deviation (HU) over ``body (D, H, W)`` of ``image (1, D, H, W)`` minus its 3³ box mean."""
    smooth = torch.nn.functional.avg_pool3d(image[None].float(), 3, stride=1, padding=1, count_include_pad=False)
    return float((image[0] - smooth[0, 0])[body].std()) * hu_per_unit


def ceiling(cfg: MeduetConfig, paths: Paths) -> dict:
    """The round trips of the held-out volumes of ``paths``'s latent cache through ``paths``'s VAE, read by
    the evaluator: Fréchet per site and overall (with floors) and site readings."""
    inputs = evaluate_synthesis.SynthesisInputs(cfg.evaluate_synthesis, paths)
    crops = evaluate_synthesis.crop_sets(inputs, cfg.evaluate_synthesis)
    summary = evaluate_synthesis.generation_summary(inputs, crops, cfg.evaluate_synthesis)
    fd = {site: {k: v[k] for k in ("fd", "fd_ci95", "floor", "ratio")}
          for site, v in summary["frechet_distance_vae_roundtrip"].items() if "fd" in v}
    own = {site: float((inputs.reader.crops_site(x).argmax(1) == inputs.sites.index(site)).float().mean())
           for site, x in sorted(crops["roundtrip"].items())}
    volumes = {case.key: inputs.sites[int(inputs.reader.site(inputs.roundtrip(case)).mean(0).argmax())]
               for case in inputs.cases.values() if case.split == "held_out"}
    window = cfg.harmonize.intensity
    hu_per_unit = (window.a_max - window.a_min) / (window.b_max - window.b_min)
    texture = {}
    for case in (c for c in inputs.cases.values() if c.split == "held_out"):
        real = inputs.images.read(case.image)[0]
        body = real[0] > inputs.reader.threshold
        texture[case.site] = {"real": fine_texture(real, body, hu_per_unit),
                              "roundtrip": fine_texture(inputs.roundtrip(case), body, hu_per_unit)}
    return {"fd": fd, "fine_texture_hu": texture, "crops_read_as_own_site": own,
            "crops_read_as_own_site_overall": float(np.mean(list(own.values()))), "volumes_read_as": volumes}


def run_variant(params: Path, name: str, overrides: list[str]) -> dict:
    """Train a VAE with ``overrides``, encode the cache with it and read its round trips."""
    base = load_config(params)
    shared = Paths.resolve(base, params.resolve().parent)
    folder = shared.work / "vae_ceiling" / name
    link_models(folder, shared, ("evaluator",))
    cfg = load_config(params, [*overrides, f"paths.models_dir={folder / 'models'}",
                               f"paths.reports_dir={folder / 'reports'}", f"paths.work_dir={folder / 'work'}",
                               f"paths.latents_dir={folder / 'latents'}"])
    paths = Paths.resolve(cfg, params.resolve().parent)
    start = time.perf_counter()
    trained = train_vae.run(cfg.vae, paths, ray=cfg.ray)
    seconds = time.perf_counter() - start
    encode_latents.run(cfg.encode_latents, paths, ray=cfg.ray)
    return {"variant": name, "overrides": overrides, "train_seconds": seconds,
            "reconstruction": trained.metrics["overall"], **ceiling(cfg, paths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar="NAME [KEY=VALUE ...]")
    args = parser.parse_args()
    cfg = load_config(args.params)
    shared = Paths.resolve(cfg, args.params.resolve().parent)
    stage = json.loads((shared.reports / "train_vae" / "metrics.json").read_text())
    rows = [{"variant": "store", "overrides": [], "train_seconds": None, "reconstruction": stage["overall"],
             **ceiling(cfg, shared)}]
    rows += [run_variant(args.params, name, overrides) for name, *overrides in args.variant]
    write_json(shared.work / "vae_ceiling" / "results.json", {"cpu": cpu_name(), "rows": rows})
    sites = sorted(rows[0]["crops_read_as_own_site"])
    print(f"CPU: {cpu_name()}")
    print(f"{'variant':<10}{'train s':>8}{'PSNR':>6}{'SSIM':>6}{'MAE HU':>7}{'Fréchet (x floor)':>22}"
          + "".join(f"{s:>9}" for s in sites) + f"{'own site':>9}  round trips read as")
    for r in rows:
        rec, fd = r["reconstruction"], r["fd"]["overall"]
        recon = f"{rec['psnr']:>6.1f}{rec['ssim']:>6.2f}{rec['mae_raw']:>7.1f}"
        seconds = f"{r['train_seconds']:>8.0f}" if r["train_seconds"] else f"{'-':>8}"
        per_site = "".join(f"{r['fd'][s]['ratio']:>8.1f}x" for s in sites)
        read = ", ".join(f"{k.split('__')[0]}→{v}" for k, v in sorted(r["volumes_read_as"].items()))
        print(f"{r['variant']:<10}{seconds}{recon}{fd['fd']:>12.1f} ({fd['ratio']:>5.1f}x){per_site}"
              f"{r['crops_read_as_own_site_overall']:>9.2f}  {read}")
    print("fine texture (HU; sd of volume - its 3^3 box mean over body voxels), real -> round trip:")
    print(f"{'variant':<10}" + "".join(f"{s:>16}" for s in sites))
    for r in rows:
        texture = r["fine_texture_hu"]
        print(f"{r['variant']:<10}" + "".join(f"{texture[s]['real']:>7.1f} -> {texture[s]['roundtrip']:>5.1f}"
                                              for s in sites))


if __name__ == "__main__":
    main()
