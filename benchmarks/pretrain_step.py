"""One MeDUET pretraining step: time, peak memory, FLOPs and achieved FLOP/s.

Measures the real optimizer step of the pretraining loop (``meduet.engine.loop.optimizer_step``
over the pretraining trainer's parts: mixing, demixing, batched dual decoding, domain heads,
MFTD and SiQC re-encodings, the teacher's targets, AdamW) plus the EMA update, for ``base`` at
batch 2 and a small preset at batch 8: on CPU in fp32 and, where the CPU has native bf16, with
bf16 autocast; on GPU (bf16) when one is available. Every row runs in its own process, so peak
memory is that row's alone. The first step's losses of each row are compared with the fp32 row
of the same preset.

    python benchmarks/pretrain_step.py [--steps 3] [--presets base:2 small:8] [--repeats 2]
        [--reference /tmp/refbench --harness ../shared/bench/ref_step.py] [--devices cpu cuda]
        [--max-batch] [--profile]

``--max-batch`` doubles each preset's batch on the GPU until it runs out of memory;
``benchmarks/gpu_check.sh`` runs the GPU rows as one short script.

With ``--reference`` (a folder laid out by the side-by-side harness's ``setup_ref.sh``: the
authors' ``pretrain/`` code and its imports) the authors' step for ``base`` runs in the same
invocation, alternating with the project's row ``--repeats`` times, each in its own
process, fp32 and (where the CPU has native bf16) under the same bf16 autocast: every ratio
printed is one measured on this machine in this run (GPU rows too, when ``--harness`` names a copy of
the harness that takes ``--device``: the shared one runs on the CPU only). Each row also shows its share of
this machine's measured matrix-multiply peak (MFU) in its precision.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch
from machine import (  # benchmarks/machine.py (this folder)
    gpu_describe,
    gpu_peaks,
    max_relative_difference,
    peak_rss_gib,
    precision_rows,
    run_json_row,
    spread,
)
from step_profile import gpu_kernel_profile, print_gpu_profile, print_profile, profile_step
from torch.profiler import record_function
from torch.utils.flop_counter import FlopCounterMode

from meduet.config import PretrainConfig, load_config
from meduet.engine.ema import build_teacher
from meduet.engine.loop import optimizer_step
from meduet.engine.pretrain_training import PretrainObjective, pretrain_trainer
from meduet.losses.mixing import random_mix_mask
from meduet.models.meduet import PRESETS, MeduetModel

REPO = Path(__file__).resolve().parents[1]
COMPILED_WARMUP_STEPS = 3  # untimed steps of a compiled row: its compiles happen in them

# The step's passes as the code marks them (record_function), in the order they run.
PASSES = ("forward", "teacher: encode mixed", "teacher: decode swapped", "teacher: encode clean + swapped",
          "student: encode mixed", "student: decode dual", "student: re-encode", "backward", "clip + optimizer",
          "ema update")


def compile_blocks(*models: MeduetModel) -> None:
    """Every transformer block of ``models`` under ``torch.compile``, in place, compiled cold.

    Blocks, not the step: the step's token groups depend on the mask and its loss terms on the
    schedule, which would break a whole-step graph. A cold Inductor cache (as on a fresh machine)
    and eager's random numbers, so the first-step losses compare with the eager row's.
    """
    from torch._inductor import config as inductor_config  # only the compiled rows load Inductor

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")
    inductor_config.fallback_random = True
    for model in models:
        for block in (*model.blocks, *model.decoder_blocks):
            block.compile()


def measure(preset: str, batch: int, steps: int, device: torch.device, bf16: bool, profiled: bool = False,
            compiled: bool = False) -> dict:
    """One row: build the models, run a counted warm-up step, then time ``steps`` steps (and, with
    ``profiled``, one more under the profiler, split by pass). ``compiled``: the blocks under
    ``torch.compile`` (:func:`compile_blocks`); its first step, which compiles, is timed on its own."""
    torch.manual_seed(0)
    config = dataclasses.replace(PRESETS[preset], num_domains=4)
    student = MeduetModel(config).to(device)
    teacher = build_teacher(student)
    if compiled:
        compile_blocks(student, teacher)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.in_channels, *config.input_size, generator=generator).to(device)
    domain = (torch.arange(batch) % 4).to(device)
    mask = random_mix_mask(batch, config.num_tokens, config.mask_ratio, generator=generator).to(device)
    slots = torch.arange(batch).to(device)  # every crop its own volume, as the authors draw them
    # The paper's recipe and loss weights (the section's defaults), MFTD and SiQC on from the first step.
    cfg = PretrainConfig(preset=preset, crop=config.input_size[0], batch_size=batch, steps=10,
                         mftd_start_fraction=0.0, amp=bf16, cpu_bf16=bf16, method={"recipe": "faithful"})
    trainer = pretrain_trainer(cfg=cfg, objective=PretrainObjective(student), teacher=teacher,
                               batches=lambda step: [(x, domain, mask, slots, x, step)], device=device)

    def step() -> dict[str, torch.Tensor]:
        losses = optimizer_step(trainer, trainer.batches(1))
        with record_function("ema update"):
            trainer.after_step(1)
        return losses

    start = time.perf_counter()
    if compiled:  # the FLOP counter would trace the compiled graphs again: the eager row counts the FLOPs
        first, flops = {term: value.item() for term, value in step().items()}, 0
        for _ in range(COMPILED_WARMUP_STEPS - 1):  # shapes seen a second time may compile again (dynamic)
            step()
    else:
        with FlopCounterMode(display=False) as counter:  # one counted step (also the warm-up)
            first = {term: value.item() for term, value in step().items()}
        flops = counter.get_total_flops()
    warmup_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else peak_rss_gib()
    return {"seconds": seconds, "warmup_seconds": warmup_seconds, "peak_gib": peak, "gflop": flops / 1e9,
            "gflops_per_s": flops / 1e9 / seconds,
            "losses": first, "passes": profile_step(step, PASSES) if profiled and not cuda else None,
            "kernels": gpu_kernel_profile(step, (*PASSES, "step")) if profiled and cuda else None}


def run_row(preset: str, batch: int, steps: int, device: str, bf16: bool, profiled: bool = False,
            compiled: bool = False) -> dict:
    """``measure`` in a fresh interpreter (clean peak RSS), parsed from its JSON line."""
    command = [sys.executable, __file__, "--row", f"{preset}:{batch}:{device}:{int(bf16)}:{int(compiled)}",
               "--steps", str(steps), *(["--profile"] if profiled else [])]
    return run_json_row(command)


def run_reference(harness: Path, reference: Path, batch: int, steps: int, device: str, bf16: bool) -> dict:
    """The authors' ``base`` step (``ref_step.py``, first step excluded) in a fresh interpreter. A GPU
    row passes ``--device cuda``: the harness must accept it (the shared CPU harness does not)."""
    env = {**os.environ, "REF_SRC": str(reference / "src" / "pretrain"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(reference / "site"), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(harness), "--preset", "base", "--batch", str(batch), "--steps", str(steps + 1),
               "--threads", str(torch.get_num_threads()), *(["--bf16"] if bf16 else []),
               *(["--device", device] if device != "cpu" else [])]
    row = run_json_row(command, env)
    return {"seconds": row["s_step_median"], "peak_gib": row["peak_rss_gib"], "gflop": row["gflop"]}


HEADER = (f"{'code':<9}{'device':<7}{'dtype':<6}{'preset':<8}{'batch':>6}{'s/step':>24}{'peak GiB':>10}"
          f"{'GFLOP':>9}{'GFLOP/s':>10}{'MFU':>6}{'time ratio':>12}{'mem ratio':>11}{'max loss diff':>15}")


def print_row(code: str, device: str, bf16: bool, preset: str, batch: int, runs: list[dict], peak: float,
              ratios: tuple[str, str] = ("-", "-"), diff: str = "") -> None:
    """One table row from a row's repeated runs (median seconds and memory; FLOPs of the first)."""
    seconds = median([r["seconds"] for r in runs])
    gflop = runs[0]["gflop"]
    print(f"{code:<9}{device:<7}{'bf16' if bf16 else 'fp32':<6}{preset:<8}{batch:>6}"
          f"{spread([r['seconds'] for r in runs]):>24}{median([r['peak_gib'] for r in runs]):>10.2f}"
          f"{gflop:>9.1f}{gflop / seconds:>10.1f}{gflop / seconds / peak:>6.0%}"
          f"{ratios[0]:>12}{ratios[1]:>11}{diff:>15}")


def print_payback(title: str, compiled: list[dict], eager: list[dict]) -> None:
    """What compiling costs (its warm-up beyond three compiled steps) and how many steps its gain needs."""
    extra = median([c["warmup_seconds"] - COMPILED_WARMUP_STEPS * c["seconds"] for c in compiled])
    gain = median([e["seconds"] for e in eager]) - median([c["seconds"] for c in compiled])
    steps = load_config(REPO / "params.yaml").pretrain.steps
    verdict = (f"pays back after {extra / gain:.0f} steps (the demo's pretrain: {steps})" if gain > 0
               else "never pays back: the compiled step is not faster")
    print(f"torch.compile, {title}: compiling {extra:.1f} s (median of {len(compiled)}), "
          f"steps {gain * 1000:+.1f} ms faster: {verdict}")


def largest_batch(preset: str, batch: int, steps: int, peak: float, limit: int = 4096) -> int:
    """Double ``batch`` on the GPU until a row runs out of memory (or reaches ``limit``), printing each
    row measured on the way (each in its own process, so a failed one leaves nothing behind); returns
    the largest batch that ran."""
    fits = batch
    while fits < limit:
        try:  # at most 5 timed steps: the search is about memory, and a large batch's step is long
            row = run_row(preset, fits * 2, min(steps, 5), "cuda", True)
        except subprocess.CalledProcessError as error:
            if "out of memory" not in error.stderr.lower() and "ALLOC_FAILED" not in error.stderr:
                raise
            return fits
        fits *= 2
        print_row("project", "cuda", True, preset, fits, [row], peak)
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["base:2", "small:8"], metavar="PRESET:BATCH")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each row (median and range printed)")
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=["cpu", "cuda"],
                        help="which of this machine's rows to run (cuda: bf16, when there is a GPU)")
    parser.add_argument("--max-batch", action="store_true",
                        help="on the GPU, also double each preset's batch until it runs out of memory")
    parser.add_argument("--reference", type=Path, default=None, help="setup_ref.sh's folder: run the authors' step")
    parser.add_argument("--harness", type=Path, default=Path("../shared/bench/ref_step.py"))
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step per row and print where its time and FLOPs go, pass by pass "
                             "(on GPU: kernel by kernel)")
    parser.add_argument("--compile", action="store_true",
                        help="also each CPU row with the blocks under torch.compile: step time, compile time, payback")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row, print JSON
    args = parser.parse_args()
    if args.row:
        preset, batch, device, bf16, compiled = args.row.split(":")
        print(json.dumps(measure(preset, int(batch), args.steps, torch.device(device), bf16 == "1", args.profile,
                                 compiled == "1")))
        return

    peaks, line, rows = precision_rows()
    rows = [(device, bf16) for device, bf16 in rows if device in args.devices]
    print(line)
    if any(device == "cuda" for device, _ in rows):
        gpu = gpu_peaks()
        print(f"gpu: {gpu_describe()}; bf16 matmul peak (8192^3, median of 10) {gpu['matmul']:.0f} GFLOP/s, "
              f"3-D convolution {gpu['conv']:.0f} GFLOP/s")
    print("\n" + HEADER)
    profiles, paybacks = [], []
    for item in args.presets:
        preset, batch = item.split(":")
        reference = None
        for device, bf16 in rows:
            side_by_side = args.reference is not None and preset == "base"
            ours, theirs = [], []
            for repeat in range(args.repeats):
                ours.append(run_row(preset, int(batch), args.steps, device, bf16, args.profile and repeat == 0))
                if side_by_side:
                    theirs.append(run_reference(args.harness, args.reference, int(batch), args.steps, device, bf16))
            r = ours[0]
            reference = reference or r["losses"]  # the first row (fp32 CPU where it runs) is the reference
            diff = f"{max_relative_difference(r['losses'], reference):.2%}"
            peak = peaks[bf16] if device == "cpu" else gpu["matmul"]
            ratios = ("-", "-")
            if theirs:
                ratios = (f"{median([o['seconds'] for o in ours]) / median([t['seconds'] for t in theirs]):.2f}x",
                          f"{median([o['peak_gib'] for o in ours]) / median([t['peak_gib'] for t in theirs]):.2f}x")
            print_row("project", device, bf16, preset, int(batch), ours, peak, ratios, diff)
            if theirs:
                print_row("authors", device, bf16, preset, int(batch), theirs, peak, ("1.00x", "1.00x"))
            if args.compile and device == "cpu":
                compiled = [run_row(preset, int(batch), args.steps, device, bf16, compiled=True)
                            for _ in range(args.repeats)]
                for row in compiled:
                    row["gflop"] = r["gflop"]  # the same arithmetic as the eager row's
                time_ratio = median([c["seconds"] for c in compiled]) / median([o["seconds"] for o in ours])
                print_row("compiled", device, bf16, preset, int(batch), compiled, peak, (f"{time_ratio:.2f}x", "-"),
                          f"{max_relative_difference(compiled[0]['losses'], reference):.2%}")
                paybacks.append((preset, batch, device, bf16, compiled, ours))
            if r.get("kernels"):
                print_gpu_profile(r["kernels"], f"{preset} batch {batch}, cuda bf16")
            if r["passes"]:
                profiles.append((r["passes"], peak, f"{preset} batch {batch}, {device} {'bf16' if bf16 else 'fp32'}: "
                                 "one profiled step, pass by pass"))
            if device == "cuda" and args.max_batch:
                fits = largest_batch(preset, int(batch), args.steps, peak)
                print(f"{preset}: largest batch that ran on the GPU: {fits} (doubling from {batch}; the next one "
                      "ran out of memory or passed the search's limit)")
    print("\ns/step: median (range) over the repeats, each row in its own process. Peak memory: the process's peak "
          "RSS on CPU, max allocated on GPU. MFU: achieved GFLOP/s over this machine's matmul peak in the row's "
          "precision (on GPU: the bf16 8192^3 product). Ratios: project / authors, measured alternately in this run. "
          "Max loss diff: largest relative difference of a first-step loss term from the preset's first row.")
    for passes, peak, title in profiles:
        print_profile(passes, peak, title)
    for preset, batch, device, bf16, compiled, eager in paybacks:
        print_payback(f"{preset} batch {batch} {device} {'bf16' if bf16 else 'fp32'}", compiled, eager)


if __name__ == "__main__":
    main()
