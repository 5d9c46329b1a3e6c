"""Sampling throughput of the conditioned DiT: whole-volume translations and generated crops.

Times the sampler the ``synthesize`` stage runs (``meduet.diffusion.sampling``): a translation
of a latent volume of the demo's size (``--shape``, default the demo's 28 × 44 × 56) tiled by
overlapping windows with A's content tokens, and the generation of single crops, for a preset
(randomly initialised: speed does not depend on the weights), at several step counts and
window overlaps. Per row: seconds per volume, volumes per minute, DiT window evaluations per
second, FLOPs per volume (``torch.utils.flop_counter``) and the share of this machine's
measured fp32 matmul peak (MFU). The VAE decode (once per volume) is timed separately.

    python benchmarks/synthesis.py [--preset tiny] [--steps 10 20] [--overlaps 0.5 0.25] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from machine import peaks_line  # benchmarks/machine.py (this script's folder)
from torch.utils.flop_counter import FlopCounterMode

from meduet.diffusion import RectifiedFlow
from meduet.diffusion.sampling import Guidance, TiledPredictor, crop_predictor, sample
from meduet.engine.precision import native_bf16
from meduet.models.architectures import DIT_PRESETS, MAX_VOXELS_PER_SPLIT, MEDUET_PRESETS, VAE_PRESETS
from meduet.models.dit import ConditionedDiT
from meduet.models.meduet import MeduetModel
from meduet.models.vae import build_vae, decode_latent


def models(preset: str) -> tuple[ConditionedDiT, MeduetModel]:
    torch.manual_seed(0)
    teacher = MeduetModel(MEDUET_PRESETS[preset]).eval()
    arch = dataclasses.replace(DIT_PRESETS[preset], content_dim=teacher.config.embed_dim,
                               style_dim=teacher.config.style_dim)
    return ConditionedDiT(arch).eval(), teacher


def translation_row(dit, teacher, shape, steps: int, overlap: float, batch: int) -> dict:
    source = torch.randn(dit.config.in_channels, *shape)
    process = RectifiedFlow()
    style = torch.randn(teacher.config.style_dim)
    start = time.perf_counter()
    predict = TiledPredictor(dit, teacher, process, source=source, style=style, guidance=Guidance(),
                             overlap=overlap, batch_size=batch)
    setup = time.perf_counter() - start
    noise = torch.randn(1, *source.shape)
    with FlopCounterMode(display=False) as counter:  # one counted step: the steps are alike
        predict(noise, 0.5)
    predict.forwards = 0
    start = time.perf_counter()
    sample(predict, process, noise, steps=steps)
    seconds = time.perf_counter() - start + setup
    return {"what": f"translation {'x'.join(map(str, shape))}", "steps": steps, "overlap": overlap,
            "windows": len(predict.boxes), "seconds": seconds, "per_min": 60 / seconds,
            "evals_per_s": predict.forwards / seconds, "gflop": counter.get_total_flops() * steps / 1e9}


def generation_row(dit, teacher, steps: int, batch: int) -> dict:
    process = RectifiedFlow()
    content = torch.randn(batch, teacher.config.embed_dim)
    style = torch.randn(batch, teacher.config.style_dim)
    predict = crop_predictor(dit, process, content=content, style=style, guidance=Guidance())
    noise = torch.randn(batch, dit.config.in_channels, *dit.config.input_size)
    with FlopCounterMode(display=False) as counter:
        predict(noise, 0.5)
    start = time.perf_counter()
    sample(predict, process, noise, steps=steps)
    seconds = (time.perf_counter() - start) / batch
    return {"what": f"generated crop (batch {batch})", "steps": steps, "overlap": None, "windows": 1,
            "seconds": seconds, "per_min": 60 / seconds, "evals_per_s": 3 * steps / seconds,
            "gflop": counter.get_total_flops() * steps / batch / 1e9}


def decode_seconds(preset: str, shape: tuple[int, ...]) -> float:
    vae = build_vae(VAE_PRESETS[preset]).eval()
    latent = torch.randn(1, 4, *shape)
    with torch.no_grad():
        start = time.perf_counter()
        decode_latent(vae, latent, MAX_VOXELS_PER_SPLIT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(DIT_PRESETS))
    parser.add_argument("--vae-preset", default="tiny", choices=sorted(VAE_PRESETS))
    parser.add_argument("--shape", nargs=3, type=int, default=[28, 44, 56], help="latent (d, h, w)")
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 20])
    parser.add_argument("--overlaps", nargs="+", type=float, default=[0.5, 0.25])
    parser.add_argument("--batch", type=int, default=64, help="windows per DiT forward")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peaks, line = peaks_line(native_bf16(torch.device("cpu")))  # fp32 rows only; the line names the machine's bf16 too
    print(line)
    dit, teacher = models(args.preset)
    shape = tuple(args.shape)
    rows = [translation_row(dit, teacher, shape, steps, overlap, args.batch)
            for steps in args.steps for overlap in args.overlaps]
    rows += [generation_row(dit, teacher, steps, 8) for steps in args.steps]
    print(f"preset {args.preset}, rectified flow, guidance (3 passes per window); fp32, {args.threads} threads")
    print(f"{'what':<28}{'steps':>6}{'overlap':>8}{'windows':>8}{'s/volume':>10}{'vol/min':>9}{'evals/s':>9}"
          f"{'GFLOP':>8}{'MFU':>7}")
    for r in rows:
        mfu = r["gflop"] / r["seconds"] / peaks[False]
        overlap = "" if r["overlap"] is None else f"{r['overlap']:.2f}"
        print(f"{r['what']:<28}{r['steps']:>6}{overlap:>8}{r['windows']:>8}{r['seconds']:>10.2f}{r['per_min']:>9.2f}"
              f"{r['evals_per_s']:>9.0f}{r['gflop']:>8.1f}{mfu:>7.1%}")
    print(f"VAE decode of one {'x'.join(map(str, shape))} latent ({args.vae_preset}): "
          f"{decode_seconds(args.vae_preset, shape):.2f} s")


if __name__ == "__main__":
    main()
