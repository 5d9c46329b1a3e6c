"""One MeDUET pretraining step: time, peak memory, FLOPs and achieved FLOP/s.

Measures the full student+teacher step of ``meduet.losses.pretrain_losses`` (mixing,
demixing, batched dual decoding, domain heads, MFTD and SiQC re-encodings, EMA update)
with AdamW, for ``base`` at batch 2 and a small preset at batch 8, on CPU (and on GPU
when one is available).

    python benchmarks/pretrain_step.py [--steps 3] [--presets base:2 small:8]

For orientation (from the issue): the authors' public code needs 19.9 s per step and
4.3 GiB peak RSS for ``base``, batch 2, 24³ latents on a 2-core machine of this kind.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from meduet.engine.ema import build_teacher, cosine_momentum, ema_update
from meduet.engine.pretrain_training import param_groups
from meduet.losses import LossWeights, pretrain_losses
from meduet.models.meduet import PRESETS, MeduetModel

AUTHORS_BASE_CPU = {"seconds": 19.9, "peak_gib": 4.3}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def measure(preset: str, batch: int, steps: int, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    config = dataclasses.replace(PRESETS[preset], num_domains=4)
    student = MeduetModel(config).to(device)
    teacher = build_teacher(student)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(student, 0.01)]
    optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))
    x = torch.randn(batch, config.in_channels, *config.input_size, device=device)
    domain = torch.arange(batch, device=device) % 4
    use_amp = device.type == "cuda"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            losses = pretrain_losses(student, teacher, x, domain, weights=LossWeights())
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        ema_update(teacher, student, cosine_momentum(1, 10))

    with FlopCounterMode(display=False) as counter:  # one counted step (also the warm-up)
        step()
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
    return {"seconds": seconds, "peak_gib": peak, "gflop": flops / 1e9, "gflops_per_s": flops / 1e9 / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["base:2", "small:8"], metavar="PRESET:BATCH")
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"\n{'device':<7}{'preset':<8}{'batch':>6}{'s/step':>9}{'peak GiB':>10}{'GFLOP':>9}{'GFLOP/s':>9}"
          f"{'time vs authors':>17}{'mem vs authors':>16}")
    for device in devices:
        for item in args.presets:
            preset, batch = item.split(":")
            r = measure(preset, int(batch), args.steps, device)
            versus = preset == "base" and batch == "2" and device.type == "cpu"
            t_ratio = f"{r['seconds'] / AUTHORS_BASE_CPU['seconds']:.2f}x" if versus else "-"
            m_ratio = f"{r['peak_gib'] / AUTHORS_BASE_CPU['peak_gib']:.2f}x" if versus else "-"
            print(f"{device.type:<7}{preset:<8}{batch:>6}{r['seconds']:>9.2f}{r['peak_gib']:>10.2f}{r['gflop']:>9.1f}"
                  f"{r['gflops_per_s']:>9.1f}{t_ratio:>17}{m_ratio:>16}")
    print("\nCPU peak memory is the process's peak RSS (it includes every earlier row); run one preset per "
          "process for clean numbers. Authors' reference: 19.9 s/step, 4.3 GiB (base, batch 2, 2 cores).")


if __name__ == "__main__":
    main()
