"""Fine-tuning step time and memory, and `meduet predict` on a CT-sized scan, with where its time goes.

1. The ``finetune`` stage's own optimizer step (``meduet.engine.finetune_training.finetune_trainer``:
   the MeDUET encoder plus the segmentation head, DiceCE, AdamW) on random windows, for both
   decoders (``upsample``: the authors' latent logits upsampled 4x; ``refine``: plus the
   image-resolution correction), each row in its own process: s/step, peak RSS, GFLOP, MFU.
2. ``meduet predict`` end to end (``meduet.predict.predict``, as the CLI calls it) on a
   phantom rendered at CT size (default 512 x 512 x 200 voxels, 0.7 x 0.7 x 1.0 mm, written as
   ``.nii.gz``): read and harmonize, VAE encoding, sliding-window segmentation and the mask
   resampled back onto the input grid, as the summary's per-phase seconds; volumes per
   minute. The segmenter file is ``--model`` (a trained ``models/finetune``) or, by default,
   one with random weights of the shapes ``params.yaml`` configures (time does not depend
   on the weights).

    python benchmarks/finetune.py [--params params.yaml] [--steps 10] [--repeats 2] [--model models/finetune]
        [--ct-size 512 512 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch
from machine import peak_rss_gib, precision_rows, run_json_row, spread  # benchmarks/machine.py (this script's folder)
from torch.utils.flop_counter import FlopCounterMode

from meduet.artifacts.segmenter import save_segmenter
from meduet.config import load_config
from meduet.data.phantom import render, sample_subject
from meduet.data.scanner import SiteGrid, to_storage
from meduet.engine.finetune_runs import head_architecture
from meduet.engine.finetune_training import finetune_trainer
from meduet.engine.loop import optimizer_step
from meduet.io.images import write_image
from meduet.models.architectures import MEDUET_PRESETS
from meduet.models.segmenter import LatentSegmenter
from meduet.models.vae import PRESETS as VAE_PRESETS
from meduet.models.vae import build_vae
from meduet.predict import predict

DECODERS = ("upsample", "refine")


def architectures(params: str, decoder: str) -> tuple[LatentSegmenter, dict]:
    """A segmenter of the configured shapes (random weights) and the config it came from."""
    cfg = load_config(params)
    head = head_architecture(cfg.finetune.model_copy(update={"decoder": decoder}))
    return LatentSegmenter(MEDUET_PRESETS[cfg.pretrain.preset], head), cfg


def measure_step(params: str, decoder: str, steps: int, bf16: bool) -> dict:
    """One row: the fine-tuning step on random windows; a FLOP-counted warm-up, then ``steps`` timed."""
    torch.manual_seed(0)
    model, cfg = architectures(params, decoder)
    section = cfg.finetune.model_copy(update={"decoder": decoder, "amp": bf16, "cpu_bf16": bf16})
    generator = torch.Generator().manual_seed(0)
    b, (d, h, w), f = section.batch_size, model.window, model.config.downsample
    latent = torch.randn(b, MEDUET_PRESETS[cfg.pretrain.preset].in_channels, d, h, w, generator=generator)
    image = torch.rand(b, 1 + model.config.context_channels, f * d, f * h, f * w, generator=generator)
    label = torch.randint(len(cfg.finetune.label_names), (b, 1, f * d, f * h, f * w), generator=generator)
    trainer = finetune_trainer(cfg=section, model=model, batches=lambda step: [(latent, image, label)],
                               device=torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        optimizer_step(trainer, trainer.batches(0))
    start = time.perf_counter()
    for _ in range(steps):
        optimizer_step(trainer, trainer.batches(0))
    seconds = (time.perf_counter() - start) / steps
    return {"seconds": seconds, "peak_gib": peak_rss_gib(), "gflop": counter.get_total_flops() / 1e9,
            "window": [b, f * d, f * h, f * w]}


def run_step_row(params: str, decoder: str, steps: int, bf16: bool) -> dict:
    command = [sys.executable, __file__, "--params", params, "--row", f"{decoder}:{int(bf16)}", "--steps", str(steps)]
    return run_json_row(command)


def random_segmenter_file(params: str, target: Path) -> Path:
    """A segmenter file with random weights and the configured shapes, harmonize and VAE settings."""
    torch.manual_seed(0)
    model, cfg = architectures(params, load_config(params).finetune.decoder)
    vae_arch = VAE_PRESETS[cfg.vae.preset]
    return save_segmenter(
        target, model=model.state_dict(), architecture=model.config, backbone=model.encoder.config,
        config=cfg.finetune.model_dump(mode="json"), harmonize=cfg.harmonize.model_dump(mode="json"),
        labels=list(cfg.finetune.label_names), scale_factor=1.0, vae_state=build_vae(vae_arch).state_dict(),
        vae_architecture=vae_arch, vae_sha256="random", meduet_sha256=None, labelled_cases=[], steps=0)


def ct_phantom(size: tuple[int, int, int], spacing: tuple[float, float, float], target: Path) -> Path:
    """A phantom abdomen rendered on a ``size`` (x, y, z) grid at ``spacing`` mm, written as NIfTI (LPS)."""
    length = size[2] * spacing[2]
    subject = sample_subject(seed=0, index=0, chest_fraction=0.0, lesion_probability=1.0, body_length_mm=length)
    grid = SiteGrid.create(spacing=spacing, fov_mm=(size[0] * spacing[0], size[1] * spacing[1]), length_mm=length)
    _, hu = render(subject, *grid.axes)
    noisy = hu + np.random.default_rng(0).normal(0.0, 10.0, hu.shape).astype(np.float32)  # scanner-like noise
    return write_image(to_storage(noisy.astype(np.float32), grid, "LPS"), target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each step row and of predict")
    parser.add_argument("--model", type=Path, default=None, help="a trained segmenter (file or models/finetune)")
    parser.add_argument("--ct-size", type=int, nargs=3, default=[512, 512, 200], metavar=("X", "Y", "Z"))
    parser.add_argument("--ct-spacing", type=float, nargs=3, default=[0.7, 0.7, 1.0], metavar=("X", "Y", "Z"))
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: one step row, printed as JSON
    args = parser.parse_args()
    if args.row:
        decoder, bf16 = args.row.split(":")
        print(json.dumps(measure_step(args.params, decoder, args.steps, bf16 == "1")))
        return

    peaks, line, rows = precision_rows()
    cfg = load_config(args.params)
    print(line)
    print(f"\nfine-tuning step: MeDUET `{cfg.pretrain.preset}` encoder, batch {cfg.finetune.batch_size}, "
          f"features {cfg.finetune.features}/{cfg.finetune.image_features}")
    print(f"{'decoder':<10}{'dtype':<6}{'window (B, D, H, W)':>22}{'s/step':>24}{'peak GiB':>10}{'GFLOP':>8}"
          f"{'GFLOP/s':>9}{'MFU':>6}")
    for device, bf16 in rows:
        if device != "cpu":
            continue
        for decoder in DECODERS:
            runs = [run_step_row(args.params, decoder, args.steps, bf16) for _ in range(args.repeats)]
            seconds = median(r["seconds"] for r in runs)
            rate = runs[0]["gflop"] / seconds
            print(f"{decoder:<10}{'bf16' if bf16 else 'fp32':<6}{str(tuple(runs[0]['window'])):>22}  "
                  f"{spread([r['seconds'] for r in runs]):>22}{median(r['peak_gib'] for r in runs):>10.2f}"
                  f"{runs[0]['gflop']:>8.2f}{rate:>9.1f}{rate / peaks[bf16]:>6.1%}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or random_segmenter_file(args.params, tmp / "segmenter.pt")
        start = time.perf_counter()
        scan = ct_phantom(tuple(args.ct_size), tuple(args.ct_spacing), tmp / "ct.nii.gz")
        print(f"\n`meduet predict` on a {' x '.join(map(str, args.ct_size))} CT phantom at "
              f"{' x '.join(map(str, args.ct_spacing))} mm ({scan.stat().st_size / 2**20:.0f} MiB .nii.gz, rendered in "
              f"{time.perf_counter() - start:.0f} s); segmenter: {'random weights' if args.model is None else model}")
        small = ct_phantom((128, 128, 64), (2.0, 2.0, 3.0), tmp / "warm.nii.gz")
        predict(model, small, tmp / "warm-out")  # warm-up: imports, oneDNN kernel selection
        timings = []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            result = predict(model, scan, tmp / f"out{repeat}")[0]
            timings.append({"total": time.perf_counter() - start, **result.seconds})
    phases = ("harmonize", "encode", "segment")
    total = median(t["total"] for t in timings)
    print(f"{'phase':<34}{'seconds':>24}{'share':>7}")
    for phase in phases:
        values = [t[phase] for t in timings]
        print(f"{phase:<34}{spread(values):>24}{median(values) / total:>7.0%}")
    other = [t["total"] - sum(t[p] for p in phases) for t in timings]
    print(f"{'load file, summary, other':<34}{spread(other):>24}{median(other) / total:>7.0%}")
    print(f"{'total':<34}{spread([t['total'] for t in timings]):>24}{1:>7.0%}")
    print(f"\n{60 / total:.2f} volumes per minute; goal <= 60 s per CT-sized volume: "
          f"{'met' if total <= 60 else f'missed by {total - 60:.0f} s'}")
    print("harmonize: read, check, reorient/resample/window/crop; encode: the frozen VAE (posterior mean, tensor "
          "splits bounding memory); segment: Gaussian-blended sliding windows plus the mask resampled onto the "
          "input grid and written. Median (range) over the repeats.")


if __name__ == "__main__":
    main()
