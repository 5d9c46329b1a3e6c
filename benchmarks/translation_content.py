"""What the spatial content path buys a translation (A's anatomy in site B's style), against the authors'
global content vector.

Arms, each a DiT trained by the stage itself (``meduet.stages.train_diffusion.run``, Ray Train) into
``<work>/translation_content/<arm>-seed<seed>/`` (latent cache, MeDUET, VAE and evaluator shared), then
``synthesize`` and ``evaluate-synthesis``:

- ``vector``: trained without content tokens (``train_diffusion.spatial_content: false``, global
  content and style vectors, as the authors) and translating with each window's pooled content
  (``synthesize.translation_content: vector``);
- ``tokens`` (the default): trained with the content tokens and translating with A's tokens;
- ``tokens-model-vector``: the ``tokens`` arm's DiT translating with the pooled vector only (what the
  tokens carry in one model; no training of its own, run after its ``tokens`` arm).

Each run translates the held-out scans into every other site's style and is scored as the pipeline
scores it: organ Dice of the evaluator's segmentation of the translation against A's labels, as a
ratio to A's VAE round trip (content preservation, goal ≥ 0.9), the counterfactual (translation of
s@A nearer the real s@B than both baselines, and its MAE in HU to s@B) and the translations' style
accuracy (Wilson interval). Prints a row per run and the mean ± sd per arm; writes ``results.json``.

    python benchmarks/translation_content.py [--params params.yaml] [--seeds 0 1 2]
        [--arms vector tokens tokens-model-vector] [--set train_diffusion.steps=1500 ...]

Needs the latent cache, the pretrained MeDUET, the teacher factors, the VAE and the synthesis
evaluator (``dvc repro extract_factors train_evaluator``, or ``make run``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/machine.py (this script's folder)
from synthesis_scoring import link_models, mean_sd, score_samples, translation_scores

from meduet.config import Paths, load_config
from meduet.io.atomic import write_json
from meduet.stages import train_diffusion

# arm -> (the DiT's spatial_content, the translation's content, the arm whose DiT it samples)
ARMS = {"vector": (False, "vector", "vector"), "tokens": (True, "tokens", "tokens"),
        "tokens-model-vector": (True, "vector", "tokens")}


def run_arm(params: Path, overrides: list[str], arm: str, seed: int) -> dict:
    """Train (or reuse) the arm's DiT for one seed, translate every held-out scan, score; one result row."""
    spatial, content, model_arm = ARMS[arm]
    base = load_config(params, overrides)
    shared = Paths.resolve(base, params.resolve().parent)
    root = shared.work / "translation_content"
    trained_in = root / f"{model_arm}-seed{seed}"
    link_models(trained_in, shared, ("pretrain", "vae", "evaluator"))
    cfg = load_config(params, [*overrides, f"train_diffusion.spatial_content={str(spatial).lower()}",
                               f"train_diffusion.seed={seed}", f"synthesize.translation_content={content}",
                               f"paths.models_dir={trained_in / 'models'}",
                               f"paths.reports_dir={trained_in / 'reports'}", f"paths.work_dir={trained_in / 'work'}"])
    paths = Paths.resolve(cfg, params.resolve().parent)
    start = time.perf_counter()
    trained = train_diffusion.run(cfg.train_diffusion, paths, ray=cfg.ray)  # a finished run returns at once
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    metrics = score_samples(cfg, paths, root / f"{arm}-seed{seed}" / "samples",
                            sampling={"translations": cfg.synthesize.translations})
    return {"arm": arm, "seed": seed, "train_seconds": seconds, "score_seconds": time.perf_counter() - start,
            "val_loss": trained.metrics["val_loss"], **translation_scores(metrics)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.params, args.overrides)
    shared = Paths.resolve(cfg, args.params.resolve().parent)
    print(f"CPU: {cpu_name()}; {cfg.train_diffusion.steps} DiT training steps, {cfg.synthesize.sampling_steps} "
          f"sampling steps, translations per held-out scan: {cfg.synthesize.translations}")
    rows = []
    for seed in args.seeds:
        for arm in args.arms:
            rows.append(run_arm(args.params, args.overrides, arm, seed))
            write_json(shared.work / "translation_content" / "results.json",
                       {"cpu": cpu_name(), "overrides": args.overrides, "rows": rows})
    print(f"{'arm':<21}{'seed':>5}{'val loss':>10}{'Dice / round trip':>19}{'cf. won':>9}{'cf. MAE HU':>12}"
          f"{'style acc. (95 % CI)':>24}{'n':>4}{'s':>6}")
    for r in rows:
        lo, hi = r["translation_style_accuracy_ci95"]
        print(f"{r['arm']:<21}{r['seed']:>5}{r['val_loss']:>10.4f}{r['dice_ratio_to_roundtrip']:>19.3f}"
              f"{r['counterfactual_closer']:>9.2f}{r['counterfactual_mae_hu']:>12.1f}"
              f"{r['translation_style_accuracy']:>10.2f} ({lo:.2f}-{hi:.2f}){r['translations']:>4}"
              f"{r['train_seconds'] + r['score_seconds']:>6.0f}")
    if len(args.seeds) > 1:
        print("mean ± sd over seeds:")
        for arm in args.arms:
            runs = [r for r in rows if r["arm"] == arm]
            print(f"  {arm:<21} Dice / round trip {mean_sd(runs, 'dice_ratio_to_roundtrip')}, counterfactual MAE "
                  f"{mean_sd(runs, 'counterfactual_mae_hu')} HU, won {mean_sd(runs, 'counterfactual_closer')}, "
                  f"style accuracy {mean_sd(runs, 'translation_style_accuracy')}")


if __name__ == "__main__":
    main()
