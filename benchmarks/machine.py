"""What machine a benchmark ran on, and what its matrix multiply can do: printed with every table.

A ratio or a FLOP/s figure means something only next to the CPU (model and ISA flags), the
threads and the precision it was measured with, and next to this machine's own matmul peak.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The ISA flags of ``ISA_FLAGS`` this CPU has."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set()
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return [flag for flag in ISA_FLAGS if flag in flags]


def describe() -> str:
    """``Intel Xeon … (avx2, avx512f, avx512_bf16), 2 threads, torch 2.13.0``."""
    return (f"{cpu_name()} ({', '.join(cpu_flags()) or 'no AVX2'}), {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def matmul_peak(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of a ``size``² matrix product over ``repeats`` tries (this process's threads)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up: first call pays for allocation and kernel selection
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def peaks_line(bf16: bool) -> tuple[dict[bool, float], str]:
    """This machine's matmul peaks (``{False: fp32, True: bf16 or nan}``) and the line that names them."""
    peaks = {False: matmul_peak(torch.float32), True: matmul_peak(torch.bfloat16) if bf16 else float("nan")}
    line = (f"machine: {describe()}; matmul peak (2048², best of 5): fp32 {peaks[False]:.0f} GFLOP/s"
            + (f", bf16 {peaks[True]:.0f} GFLOP/s" if bf16 else ", no native bf16"))
    return peaks, line


def precision_rows() -> tuple[dict[bool, float], str, list[tuple[str, bool]]]:
    """What a step benchmark measures here: CPU fp32, CPU bf16 where the CPU has it natively, GPU
    bf16 where there is one (``(device, bf16)`` rows, fp32 first), with :func:`peaks_line`'s peaks and line."""
    from meduet.engine.precision import native_bf16

    cpu_bf16 = native_bf16(torch.device("cpu"))
    peaks, line = peaks_line(cpu_bf16)
    rows = [("cpu", False)] + ([("cpu", True)] if cpu_bf16 else [])
    rows += [("cuda", True)] if torch.cuda.is_available() else []
    return peaks, line, rows


def conv3d_peak(repeats: int = 5) -> float:
    """Best GFLOP/s of a 64 -> 64 channel 3x3x3 convolution forward on a (2, 64, 32, 32, 32) channels-last
    input (this process's threads): the reference for convolution networks' MFU."""
    conv = torch.nn.Conv3d(64, 64, 3, padding=1, bias=False).to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 64, 32, 32, 32).contiguous(memory_format=torch.channels_last_3d)
    flops = 2 * x.numel() * 64 * 27
    best = float("inf")
    with torch.no_grad():
        conv(x)  # warm-up: oneDNN picks and caches its kernel
        for _ in range(repeats):
            start = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def gpu_describe() -> str:
    """``NVIDIA H200 (sm_90, 132 SMs, 140 GiB), torch 2.11.0+cu130``: the GPU a row ran on."""
    props = torch.cuda.get_device_properties(0)
    return (f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
            f"{props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}")


def _gpu_gflops(run, flops: float, repeats: int) -> float:
    """Median GFLOP/s of ``run()`` over ``repeats`` event-timed calls after two warm-ups."""
    for _ in range(2):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return flops / statistics.median(times) / 1e9


def gpu_peaks(size: int = 8192, repeats: int = 10) -> dict[str, float]:
    """This GPU's measured bf16 ceilings in GFLOP/s: a ``size``³ matrix product (``matmul``) and a
    64 -> 64 channel 3³ convolution on a (8, 64, 64, 64, 64) channels-last input (``conv``), each the
    median of ``repeats`` event-timed runs on random data (zeros run faster than real data)."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    matmul = _gpu_gflops(lambda: a @ b, 2 * size**3, repeats)
    conv = torch.nn.Conv3d(64, 64, 3, padding=1, bias=False).to("cuda", torch.bfloat16)
    conv = conv.to(memory_format=torch.channels_last_3d)
    x = torch.randn(8, 64, 64, 64, 64, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        conv_rate = _gpu_gflops(lambda: conv(x), 2 * x.numel() * 64 * 27, repeats)
    return {"matmul": matmul, "conv": conv_rate}


class RowFailed(subprocess.CalledProcessError):
    """A benchmark row's process failed; the message ends with its stderr's last lines."""

    def __str__(self) -> str:
        tail = "\n".join((self.stderr or "").strip().splitlines()[-15:])
        return f"{super().__str__()}\n{tail}"


def run_json_row(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Run one benchmark row in a fresh interpreter (clean peak memory) and parse the JSON of its last
    output line; raises :class:`RowFailed` (with the row's stderr) when it fails."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RowFailed(done.returncode, command, done.stdout, done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def machine_busy_cpu_seconds() -> float:
    """CPU seconds every process on this machine has used since boot (Linux ``/proc/stat``, all CPUs, idle
    and I/O wait excluded). The difference around a piece of work counts the helper processes it starts
    (Ray's actors, raylet, dashboard), which this process's own resource usage does not; on an otherwise
    idle machine it is that work's CPU cost."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    idle, iowait = ticks[3], ticks[4]
    return (sum(ticks[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")  # user .. steal; guest is inside user


def spread(values: list[float]) -> str:
    """``median (min-max)`` of repeated measurements."""
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def max_relative_difference(losses: dict[str, float], reference: dict[str, float]) -> float:
    """Largest relative difference of a loss term from the same term of a reference row."""
    return max(abs(losses[term] - reference[term]) / max(abs(reference[term]), 1e-8) for term in reference)
