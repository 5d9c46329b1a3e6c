"""One VAE training step: time, peak memory, FLOPs and MFU, the pipeline's step beside MONAI's MAISI as shipped.

Times the real optimizer step of ``train-vae`` (``meduet.engine.loop.optimizer_step`` over
``meduet.engine.vae_training.vae_trainer``: L1 + KL, gradient clipping, AdamW) on random
crops, for each ``PRESET:BATCH`` (default: the demo's ``tiny`` at batch 2 and ``small``), in
three variants measured alternately, each row in its own process (clean peak memory):

- ``maisi``: MONAI's ``AutoencoderKlMaisi`` as shipped (its per-group Python group norm),
  default NCDHW layout, PyTorch's default (for-loop) AdamW: the step as ``train-vae`` ran it
  before this benchmark existed;
- ``roundtrip``: the pipeline's step with MAISI's own residual blocks and upsampling put back,
  whose outputs go back to NCDHW and are copied to channels-last again by the next convolution
  (what ``LayoutKeepingResBlock`` removed: this row against ``project`` is that change's size);
- ``project``: the pipeline's (``build_vae``: native ``nn.GroupNorm``; channels-last 3-D
  network and crops, kept channels-last through every block; fused AdamW);
- ``compiled`` (with ``--compile``): ``project`` with the network under ``torch.compile`` (Inductor's
  default mode, a cold kernel cache, eager's random numbers). Its first step's time is mostly compiling;
  the table also prints how many steps its steady-state gain needs to pay that back, against the demo's
  ``train_vae.steps``.

fp32, plus bf16 autocast where the CPU has native bf16, and bf16 on a GPU when there is one
(``--devices`` picks; ``benchmarks/gpu_check.sh`` runs the GPU rows). Printed with the machine, its matmul
and 3-D convolution peaks (MFU against each), and the largest relative difference of a
first-step loss term from the ``maisi`` fp32 row. ``--profile`` adds where one step's time
goes (forward, backward, optimizer; the ten most expensive operators).

    python benchmarks/vae_step.py [--presets tiny:2 small:2] [--crop 32] [--steps 10] [--repeats 3] [--profile]
        [--compile]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from machine import (  # benchmarks/machine.py (this folder)
    conv3d_peak,
    gpu_describe,
    gpu_peaks,
    max_relative_difference,
    peak_rss_gib,
    precision_rows,
    run_json_row,
    spread,
)
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi, MaisiResBlock, MaisiUpsample
from step_profile import print_profile, profile_step
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from meduet.config import VAEConfig, load_config
from meduet.engine.loop import optimizer_step
from meduet.engine.vae_training import vae_trainer
from meduet.models.vae import PRESETS, build_vae, maisi_options

VARIANTS = ("maisi", "roundtrip", "project")
COMPILED = "compiled"
PASSES = ("forward", "backward", "clip + optimizer")


def stock_maisi(preset: str) -> AutoencoderKlMaisi:
    """MONAI's MAISI autoencoder as shipped (its own group norm), shaped as ``build_vae`` shapes ``preset``."""
    return AutoencoderKlMaisi(**maisi_options(PRESETS[preset]))


def with_maisi_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with MAISI's own residual blocks and upsampling (their layout round trips) put back."""
    for module in model.modules():
        for maisi_class in (MaisiResBlock, MaisiUpsample):
            if isinstance(module, maisi_class):  # the project's classes subclass MAISI's, same parameters
                module.__class__ = maisi_class
    return model


def measure(variant: str, preset: str, batch: int, crop: int, steps: int, bf16: bool, profiled: bool,
            device: torch.device = torch.device("cpu")) -> dict:
    """One row: the step of ``variant`` on ``device``; a FLOP-counted warm-up step, then ``steps`` timed steps."""
    torch.manual_seed(0)
    cfg = VAEConfig(preset=preset, crop_size=(crop,) * 3, batch_size=batch, steps=10, amp=bf16)
    layout = torch.contiguous_format if variant == "maisi" else torch.channels_last_3d
    model = stock_maisi(preset) if variant == "maisi" else build_vae(PRESETS[preset])
    model = (with_maisi_blocks(model) if variant == "roundtrip" else model).to(device)
    model = model.to(memory_format=layout)
    if variant == COMPILED:
        # A cold compile, as on a fresh machine (Inductor otherwise reuses kernels an earlier row compiled), and
        # eager's random numbers (the posterior sample), so the first-step losses compare with the other rows.
        from torch._inductor import config as inductor_config  # only the compiled rows load Inductor

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
        inductor_config.fallback_random = True
        model.compile()  # in place: the parameters, state dict and optimizer stay the module's own
    x = torch.rand(batch, 1, crop, crop, crop, generator=torch.Generator().manual_seed(0)).to(device)
    x = x.contiguous(memory_format=layout)
    trainer = vae_trainer(cfg=cfg, model=model, batches=lambda step: [(step, x)], device=device)
    # bf16 rows: CPU autocast (the stage autocasts on GPU only); maisi rows: the for-loop AdamW the
    # stage used before, same options.
    group = trainer.optimizer.param_groups[0]
    optimizer = trainer.optimizer if variant != "maisi" else torch.optim.AdamW(
        group["params"], foreach=False, **{k: group[k] for k in ("lr", "betas", "weight_decay", "eps")})
    trainer = dataclasses.replace(trainer, optimizer=optimizer, amp_dtype=torch.bfloat16 if bf16 else None)

    def step() -> dict[str, torch.Tensor]:
        return optimizer_step(trainer, trainer.batches(0))

    start = time.perf_counter()
    if variant == COMPILED:  # the FLOP counter would trace the compiled graph again: the project row counts them
        counter = None
        first = {term: value.item() for term, value in step().items()}
    else:
        with FlopCounterMode(display=False) as counter:
            first = {term: value.item() for term, value in step().items()}
    first_seconds = time.perf_counter() - start
    step()  # a second warm-up: oneDNN (cuDNN) caches its kernels per shape and layout
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else peak_rss_gib()
    row = {"seconds": seconds, "first_seconds": first_seconds, "peak_gib": peak,
           "gflop": None if counter is None else counter.get_total_flops() / 1e9,
           "losses": first, "passes": None, "ops": None}
    if profiled and not cuda:
        row["passes"] = profile_step(step, PASSES)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:10]
        row["ops"] = [(e.key, e.count, e.self_cpu_time_total / 1e3) for e in top]
    return row


def print_payback(preset: str, batch: str, kind: str, compiled: list[dict], plain: list[dict]) -> None:
    """How long ``torch.compile`` takes and how many steps its gain needs to pay for it (``train_vae.steps``)."""
    compile_s = median(r["first_seconds"] - r["seconds"] for r in compiled)  # the first step beyond a steady one
    gain = median(r["seconds"] for r in plain) - median(r["seconds"] for r in compiled)
    steps = load_config(Path("params.yaml")).vae.steps if Path("params.yaml").is_file() else VAEConfig().steps
    verdict = (f"pays back after {compile_s / gain:.0f} steps (the demo's train_vae: {steps})" if gain > 0
               else "never pays back: the compiled step is not faster")
    print(f"torch.compile, {preset} batch {batch} {kind}: compiling {compile_s:.1f} s (median of {len(compiled)}), "
          f"steady step {gain * 1e3:+.1f} ms against the project's; {verdict}")


def run_row(variant: str, preset: str, batch: int, args: argparse.Namespace, bf16: bool, profiled: bool,
            device: str = "cpu") -> dict:
    """``measure`` in a fresh interpreter, parsed from its JSON line."""
    command = [sys.executable, __file__, "--row", f"{variant}:{preset}:{batch}:{int(bf16)}:{device}",
               "--crop", str(args.crop),
               "--steps", str(args.steps), *(["--profile"] if profiled else [])]
    return run_json_row(command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny:2", "small:2"], metavar="PRESET:BATCH")
    parser.add_argument("--crop", type=int, default=32, help="crop edge (train-vae's crop_size)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each row, alternating the variants")
    parser.add_argument("--profile", action="store_true", help="also profile one step of each CPU row's first run")
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=["cpu", "cuda"],
                        help="which of this machine's rows to run (cuda: bf16, when there is a GPU)")
    parser.add_argument("--compile", action="store_true",
                        help="also the project's step under torch.compile, with its compile time and payback")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row, print JSON
    args = parser.parse_args()
    if args.row:
        variant, preset, batch, bf16, device = args.row.split(":")
        print(json.dumps(measure(variant, preset, int(batch), args.crop, args.steps, bf16 == "1", args.profile,
                                 torch.device(device))))
        return

    peaks, line, rows = precision_rows()
    rows = [(device, bf16) for device, bf16 in rows if device in args.devices]
    conv_peak = conv3d_peak()
    print(f"{line}; 3-D convolution peak (64->64, 3^3, 32^3 channels-last): {conv_peak:.0f} GFLOP/s")
    if any(device == "cuda" for device, _ in rows):
        gpu = gpu_peaks()
        print(f"gpu: {gpu_describe()}; bf16 matmul peak (8192^3, median of 10) {gpu['matmul']:.0f} GFLOP/s, "
              f"bf16 3-D convolution (64->64, 3^3, 8 x 64^3 channels-last) {gpu['conv']:.0f} GFLOP/s")
    print(f"\n{'variant':<10}{'device':<7}{'dtype':<6}{'preset':<8}{'batch':>6}{'crop':>5}{'s/step':>24}{'steps/s':>9}"
          f"{'peak GiB':>10}{'GFLOP':>8}{'GFLOP/s':>9}{'MFU mm':>8}{'MFU conv':>9}{'speed-up':>10}{'loss diff':>11}")
    profiles, paybacks = [], []
    variants = (*VARIANTS, COMPILED) if args.compile else VARIANTS
    for item in args.presets:
        preset, batch = item.split(":")
        reference = None
        for device, bf16 in rows:
            runs = {variant: [] for variant in variants}
            for repeat in range(args.repeats):
                for variant in variants:
                    runs[variant].append(run_row(variant, preset, int(batch), args, bf16, args.profile and repeat == 0,
                                                 device))
            mm_peak, cv_peak = (peaks[bf16], conv_peak) if device == "cpu" else (gpu["matmul"], gpu["conv"])
            base_seconds = median(r["seconds"] for r in runs["maisi"])
            for variant in variants:
                first = runs[variant][0]
                first["gflop"] = first["gflop"] or runs["project"][0]["gflop"]  # compiled: the same arithmetic
                reference = reference or first["losses"]  # the maisi fp32 row comes first
                diff = max_relative_difference(first["losses"], reference)
                seconds = median(r["seconds"] for r in runs[variant])
                rate = first["gflop"] / seconds
                print(f"{variant:<10}{device:<7}{'bf16' if bf16 else 'fp32':<6}{preset:<8}{batch:>6}{args.crop:>5}"
                      f"{spread([r['seconds'] for r in runs[variant]]):>24}{1 / seconds:>9.2f}"
                      f"{median(r['peak_gib'] for r in runs[variant]):>10.2f}{first['gflop']:>8.1f}{rate:>9.1f}"
                      f"{rate / mm_peak:>8.1%}{rate / cv_peak:>9.1%}{base_seconds / seconds:>9.2f}x{diff:>11.1e}")
                if variant == COMPILED:
                    paybacks.append((preset, batch, device, bf16, runs[COMPILED], runs["project"]))
                if first["passes"]:
                    profiles.append((first, mm_peak, f"{variant} {preset} batch {batch}, "
                                     f"{'bf16' if bf16 else 'fp32'}: one profiled step"))
    print("\ns/step: median (range) over the repeats, the variants alternating, each run in its own process. "
          "Speed-up: the maisi row's median time over this row's. MFU: achieved GFLOP/s over this machine's "
          "matmul peak in the row's precision (mm) and 3-D convolution peak (conv; fp32 on CPU, bf16 on GPU). "
          "Loss diff: largest relative difference of a first-step loss term from the preset's first row (maisi, "
          "fp32 where CPU rows run; same weights, same crops).")
    for preset, batch, device, bf16, compiled, plain in paybacks:
        print_payback(preset, batch, f"{device} {'bf16' if bf16 else 'fp32'}", compiled, plain)
    for row, peak, title in profiles:
        print_profile(row["passes"], peak, title)
        ops = "; ".join(f"{name} x{count} {ms:.1f} ms" for name, count, ms in row["ops"])
        print(f"top operators (self time): {ops}")


if __name__ == "__main__":
    main()
