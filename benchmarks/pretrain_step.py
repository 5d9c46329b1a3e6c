"""One MeDUET pretraining step: time, peak memory, FLOPs and achieved FLOP/s.

Measures the real optimizer step of the pretraining loop (``meduet.engine.loop.optimizer_step``
over the pretraining trainer's parts: mixing, demixing, batched dual decoding, domain heads, MFTD and SiQC re-encodings, the
teacher's targets, AdamW) plus the EMA update, for ``base`` at batch 2 and a small preset at
batch 8: on CPU in fp32 and, where the CPU has native bf16, with bf16 autocast; on GPU (bf16)
when one is available. Every row runs in its own process, so peak memory is that row's alone.
The first step's losses of each row are compared with the fp32 row of the same preset.

    python benchmarks/pretrain_step.py [--steps 3] [--presets base:2 small:8]

For orientation (from the issue): the authors' public code needs 19.9 s per step and
4.3 GiB peak RSS for ``base``, batch 2, 24³ latents on a 2-core machine of this kind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from meduet.config import PretrainConfig
from meduet.engine.ema import build_teacher
from meduet.engine.loop import optimizer_step
from meduet.engine.precision import native_bf16
from meduet.engine.pretrain_training import PretrainObjective, pretrain_trainer
from meduet.losses.mixing import random_mix_mask
from meduet.models.meduet import PRESETS, MeduetModel

AUTHORS_BASE_CPU = {"seconds": 19.9, "peak_gib": 4.3}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def measure(preset: str, batch: int, steps: int, device: torch.device, bf16: bool) -> dict:
    """One row: build the models, run a counted warm-up step, then time ``steps`` steps."""
    torch.manual_seed(0)
    config = dataclasses.replace(PRESETS[preset], num_domains=4)
    student = MeduetModel(config).to(device)
    teacher = build_teacher(student)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.in_channels, *config.input_size, generator=generator).to(device)
    domain = (torch.arange(batch) % 4).to(device)
    mask = random_mix_mask(batch, config.num_tokens, config.mask_ratio, generator=generator).to(device)
    slots = torch.arange(batch).to(device)  # every crop its own volume, as the authors draw them
    # The paper's recipe and loss weights (the section's defaults), MFTD and SiQC on from the first step.
    cfg = PretrainConfig(preset=preset, crop=config.input_size[0], batch_size=batch, steps=10,
                         mftd_start_fraction=0.0, amp=bf16, cpu_bf16=bf16, method={"recipe": "faithful"})
    trainer = pretrain_trainer(cfg=cfg, objective=PretrainObjective(student), teacher=teacher,
                               batches=lambda step: [(x, domain, mask, slots, step)], device=device)

    def step() -> dict[str, torch.Tensor]:
        losses = optimizer_step(trainer, trainer.batches(1))
        trainer.after_step(1)  # the EMA update
        return losses

    with FlopCounterMode(display=False) as counter:  # one counted step (also the warm-up)
        first = {term: value.item() for term, value in step().items()}
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_rss_gib()
    return {"seconds": seconds, "peak_gib": peak, "gflop": flops / 1e9, "gflops_per_s": flops / 1e9 / seconds,
            "losses": first}


def run_row(preset: str, batch: int, steps: int, device: str, bf16: bool) -> dict:
    """``measure`` in a fresh interpreter (clean peak RSS), parsed from its JSON line."""
    command = [sys.executable, __file__, "--row", f"{preset}:{batch}:{device}:{int(bf16)}", "--steps", str(steps)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["base:2", "small:8"], metavar="PRESET:BATCH")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row, print JSON
    args = parser.parse_args()
    if args.row:
        preset, batch, device, bf16 = args.row.split(":")
        print(json.dumps(measure(preset, int(batch), args.steps, torch.device(device), bf16 == "1")))
        return

    rows = [("cpu", False)] + ([("cpu", True)] if native_bf16(torch.device("cpu")) else [])
    rows += [("cuda", True)] if torch.cuda.is_available() else []
    print(f"\n{'device':<7}{'dtype':<6}{'preset':<8}{'batch':>6}{'s/step':>9}{'peak GiB':>10}{'GFLOP':>9}"
          f"{'GFLOP/s':>9}{'time vs authors':>17}{'mem vs authors':>16}{'max loss diff':>15}")
    for item in args.presets:
        preset, batch = item.split(":")
        reference = None
        for device, bf16 in rows:
            r = run_row(preset, int(batch), args.steps, device, bf16)
            reference = reference or r["losses"]  # the fp32 CPU row comes first
            diff = max(abs(r["losses"][t] - reference[t]) / max(abs(reference[t]), 1e-8) for t in reference)
            versus = preset == "base" and batch == "2" and device == "cpu"
            t_ratio = f"{r['seconds'] / AUTHORS_BASE_CPU['seconds']:.2f}x" if versus else "-"
            m_ratio = f"{r['peak_gib'] / AUTHORS_BASE_CPU['peak_gib']:.2f}x" if versus else "-"
            print(f"{device:<7}{'bf16' if bf16 else 'fp32':<6}{preset:<8}{batch:>6}{r['seconds']:>9.2f}"
                  f"{r['peak_gib']:>10.2f}{r['gflop']:>9.1f}{r['gflops_per_s']:>9.1f}{t_ratio:>17}{m_ratio:>16}"
                  f"{diff:>14.2%}")
    print("\nPeak memory: the process's peak RSS on CPU (one process per row), max allocated on GPU. "
          "Max loss diff: largest relative difference of a first-step loss term from the fp32 CPU row. "
          "Authors' reference: 19.9 s/step, 4.3 GiB (base, batch 2, 2 cores).")


if __name__ == "__main__":
    main()
