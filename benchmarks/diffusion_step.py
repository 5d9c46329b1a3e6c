"""One conditioned-DiT training step: time, peak memory, FLOPs and achieved FLOP/s.

Measures the real optimizer step of the ``train-diffusion`` loop (``meduet.engine.loop.optimizer_step``
over the diffusion trainer's parts: the frozen MeDUET teacher encoding the clean crops, the DiT's
forward and backward with its conditions and the content tokens, REPA when asked for, AdamW)
plus the EMA update, for ``base`` (DiT-B/4, 24³ latents) at batch 2 and a CPU preset: on CPU
in fp32 and, where the CPU has native bf16, with bf16 autocast; on GPU (bf16) when one is
available. Every row runs in its own process, so peak memory is that row's alone.

    python benchmarks/diffusion_step.py [--steps 3] [--warmup 2] [--threads 2] [--presets base:2 small:8]
        [--init meduet]

The table names the machine (``benchmarks/machine.py``: CPU model, ISA flags, threads) and its
measured matmul peak; each row gives wall and CPU seconds per step, its FLOP/s and its share
of that peak (MFU). On a shared machine measure with ``--threads 1``: with more threads than
idle cores, OpenMP barriers wait for descheduled threads (here, under a load of 4 on 2 cores,
``base`` took 14 s per step with 2 threads and 3.2 s with 1). A fresh DiT predicts exactly 0
(adaLN-Zero), so precisions are compared on the losses of the last timed step, after the same
updates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from machine import max_relative_difference, peak_rss_gib, precision_rows, run_json_row
from torch.utils.flop_counter import FlopCounterMode

from meduet.config import TrainDiffusionConfig
from meduet.diffusion import build_process
from meduet.diffusion.guidance import condition_drops
from meduet.diffusion.repa import RepaProjector
from meduet.engine.diffusion_training import DiffusionObjective, build_dit, diffusion_trainer
from meduet.engine.ema import build_teacher
from meduet.engine.loop import optimizer_step
from meduet.models.architectures import DIT_PRESETS, MEDUET_PRESETS
from meduet.models.meduet import MeduetModel


def measure(preset: str, batch: int, steps: int, device: torch.device, bf16: bool, init: str, warmup: int) -> dict:
    """One row: build teacher, DiT and EMA, run a counted step and ``warmup`` more, then time ``steps`` steps."""
    torch.manual_seed(0)
    teacher = MeduetModel(MEDUET_PRESETS[preset]).eval().requires_grad_(False).to(device)
    arch = DIT_PRESETS[preset]
    # The section's defaults at full learning rate (no warm-up), as a step in mid-run.
    cfg = TrainDiffusionConfig(preset=preset, crop=arch.input_size[0], batch_size=batch, steps=10, init=init,
                               warmup_steps=0, amp=bf16, cpu_bf16=bf16)
    dit = build_dit(cfg, arch, teacher)
    ema = build_teacher(dit).to(device)
    projector = RepaProjector(dim=arch.hidden_size, target_dim=arch.content_dim) if init == "meduet_repa" else None
    objective = DiffusionObjective(dit, build_process(cfg.objective), projector=projector, repa_layer=cfg.repa_block,
                                   repa_weight=cfg.repa_weight).to(device)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, arch.in_channels, *arch.input_size, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(1000, (batch,), generator=gen)
    drops = condition_drops(batch, cfg.cond_drop, gen)
    step_batch = tuple(v.to(device) for v in (x0, noise, t, drops.content, drops.style, drops.tokens))
    trainer = diffusion_trainer(cfg=cfg, objective=objective, teacher=teacher, ema=ema,
                                batches=lambda step: [step_batch], device=device)

    def step() -> dict[str, torch.Tensor]:
        losses = optimizer_step(trainer, trainer.batches(1))
        trainer.after_step(1)  # the EMA update
        return losses

    with FlopCounterMode(display=False) as counter:  # one counted step
        step()
    flops = counter.get_total_flops()
    for _ in range(warmup):  # kernels chosen and caches filled for each shape
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        last = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    cpu_seconds = (time.process_time() - cpu_start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_rss_gib()
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_gib": peak, "gflop": flops / 1e9,
            "gflops_per_s": flops / 1e9 / seconds, "losses": {term: value.item() for term, value in last.items()},
            "params_m": sum(p.numel() for p in dit.parameters()) / 1e6}


def run_row(preset: str, batch: int, steps: int, device: str, bf16: bool, init: str, warmup: int,
            threads: int) -> dict:
    """``measure`` in a fresh interpreter (clean peak RSS) with ``threads`` threads, parsed from its JSON line."""
    command = [sys.executable, __file__, "--row", f"{preset}:{batch}:{device}:{int(bf16)}", "--steps", str(steps),
               "--init", init, "--warmup", str(warmup), "--threads", str(threads)]
    return run_json_row(command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["base:2", "small:8"], metavar="PRESET:BATCH")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the counted one")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (on a shared machine, 1 avoids OpenMP barriers waiting on a "
                        "descheduled thread)")
    parser.add_argument("--init", default="meduet", choices=["scratch", "meduet", "meduet_repa"])
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row, print JSON
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.row:
        preset, batch, device, bf16 = args.row.split(":")
        print(json.dumps(measure(preset, int(batch), args.steps, torch.device(device), bf16 == "1", args.init,
                                 args.warmup)))
        return

    peaks, line, rows = precision_rows()
    print(line)
    print(f"\n{'device':<7}{'dtype':<6}{'preset':<8}{'batch':>6}{'params M':>10}{'s/step':>9}{'CPU s/step':>11}"
          f"{'peak GiB':>10}{'GFLOP':>9}{'GFLOP/s':>9}{'MFU':>7}{'max loss diff':>15}")
    for item in args.presets:
        preset, batch = item.split(":")
        reference = None
        for device, bf16 in rows:
            r = run_row(preset, int(batch), args.steps, device, bf16, args.init, args.warmup, args.threads)
            reference = reference or r["losses"]  # the fp32 CPU row comes first
            diff = max_relative_difference(r["losses"], reference)
            mfu = f"{r['gflops_per_s'] / peaks[bf16]:.0%}" if device == "cpu" else "-"
            print(f"{device:<7}{'bf16' if bf16 else 'fp32':<6}{preset:<8}{batch:>6}{r['params_m']:>10.3g}"
                  f"{r['seconds']:>9.3f}{r['cpu_seconds']:>11.3f}{r['peak_gib']:>10.2f}{r['gflop']:>9.1f}"
                  f"{r['gflops_per_s']:>9.1f}{mfu:>7}{diff:>15.1e}")
    print(f"\nInit {args.init!r}; each step includes the teacher's encoding of the clean crops and the EMA update. "
          "Peak memory: the process's peak RSS on CPU (one process per row), max allocated on GPU. "
          "MFU: GFLOP/s over the matmul peak of the row's precision. Max loss diff: largest relative difference "
          "of a loss term of the last timed step from the fp32 CPU row.")


if __name__ == "__main__":
    main()
