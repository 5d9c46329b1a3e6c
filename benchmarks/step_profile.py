"""Where one training step's time and FLOPs go, split by the named ranges the code marks.

The training code marks its passes with ``torch.profiler.record_function`` (the loop:
``forward``, ``backward``, ``clip + optimizer``; the MeDUET losses: each teacher and
student pass). ``profile_step`` runs one step under the profiler and charges every operator
to the innermost marked range around it: time, FLOPs, and the share of time spent in
matrix products (GEMM, convolution, attention), which is what can run near the matmul peak.
Time outside the GEMMs (norms, activations, copies, reductions, the optimizer's elementwise
updates) is the gap between a pass's FLOP/s and the peak.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile, record_function

# Operators doing the matrix work (their FLOPs are what a step's GFLOP count holds).
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
            "aten::convolution_backward", "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
ATTENTION_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu": 4,  # QK^T and PV: 2 products
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward": 8}  # 4 products (with recompute)
OTHER = "(outside the marked passes)"


def _attention_flops(event) -> float:
    """The profiler counts no FLOPs for CPU flash attention: ``k * B * H * L * L_kv * e`` from its shapes."""
    shapes = event.input_shapes
    if not shapes or len(shapes[0]) != 4:
        return 0.0
    batch, heads, length, width = shapes[0]
    length_kv = shapes[1][2] if len(shapes) > 1 and len(shapes[1]) == 4 else length
    return ATTENTION_OPS[event.name] * batch * heads * length * length_kv * width


def profile_step(step: Callable[[], object], passes: Sequence[str]) -> list[dict]:
    """Run ``step`` once under the profiler; one row per marked pass (innermost range wins).

    Args:
        step: one training step (already warmed up).
        passes: the ``record_function`` names to split by, in display order; a pass nested in
            another is charged to the inner one (the outer row keeps only what is not nested).

    Returns:
        rows ``{"pass", "ms", "gflop", "gemm_ms"}`` in ``passes`` order, plus one for time and
        FLOPs outside every marked pass (the step's remaining work, e.g. an EMA update, when
        it is not marked) and, last, ``"total"``.
    """
    names = set(passes)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        with record_function("step"):
            step()
    events = prof.events()
    rows = {name: {"pass": name, "ms": 0.0, "gflop": 0.0, "gemm_ms": 0.0} for name in (*passes, OTHER)}
    total = next(e for e in events if e.name == "step").cpu_time_total / 1e3

    def owner(event) -> str:
        parent = event.cpu_parent
        while parent is not None and parent.name not in names:
            parent = parent.cpu_parent
        return parent.name if parent is not None else OTHER

    for event in events:
        if event.name in names:  # a range: its self share is what no inner marked pass took
            inner = sum(_nested_range_time(child, names) for child in event.cpu_children)
            rows[event.name]["ms"] += (event.cpu_time_total - inner) / 1e3
        elif event.name in GEMM_OPS or event.flops:
            row = rows[owner(event)]
            flops = event.flops or (_attention_flops(event) if event.name in ATTENTION_OPS else 0.0)
            row["gflop"] += flops / 1e9
            if event.name in GEMM_OPS and not _has_gemm_ancestor(event):
                row["gemm_ms"] += event.cpu_time_total / 1e3
    rows[OTHER]["ms"] = total - sum(r["ms"] for name, r in rows.items() if name != OTHER)
    out = [rows[name] for name in (*passes, OTHER)]
    out.append({"pass": "total", "ms": total, "gflop": sum(r["gflop"] for r in out),
                "gemm_ms": sum(r["gemm_ms"] for r in out)})
    return out


def _nested_range_time(event, names: set[str]) -> float:
    """Time (µs) of the marked ranges directly nested under ``event`` (not counting deeper ones twice)."""
    if event.name in names:
        return event.cpu_time_total
    return sum(_nested_range_time(child, names) for child in event.cpu_children)


def _has_gemm_ancestor(event) -> bool:
    """A GEMM called inside another (e.g. ``mm`` inside ``convolution_backward``) is timed once, by the outer."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in GEMM_OPS:
            return True
        parent = parent.cpu_parent
    return False


def print_profile(rows: list[dict], peak_gflops: float, title: str) -> None:
    """The per-pass table: ms, share of the step, GFLOP, GFLOP/s, MFU, and the GEMMs' share of the time."""
    total_ms = rows[-1]["ms"]
    print(f"\n{title}")
    print(f"{'pass':<34}{'ms':>9}{'share':>7}{'GFLOP':>9}{'GFLOP/s':>9}{'MFU':>6}{'GEMM time':>11}"
          f"{'GEMM GFLOP/s':>14}")
    for row in rows:
        if row["ms"] <= 0.5 and row["gflop"] == 0:
            continue
        gemm_share = f"{row['gemm_ms'] / row['ms']:.0%}" if row["ms"] > 0 else "-"
        gflop, rate, mfu, gemm_rate = "-", "-", "-", "-"
        if row["gflop"] > 0:  # the profiler counts no FLOPs for some operators (3-D convolutions)
            per_second = row["gflop"] / row["ms"] * 1e3
            gflop, rate, mfu = f"{row['gflop']:.1f}", f"{per_second:.1f}", f"{per_second / peak_gflops:.0%}"
            gemm_rate = f"{row['gflop'] / row['gemm_ms'] * 1e3:.1f}" if row["gemm_ms"] > 0 else "-"
        print(f"{row['pass']:<34}{row['ms']:>9.0f}{row['ms'] / total_ms:>7.0%}{gflop:>9}{rate:>9}{mfu:>6}"
              f"{gemm_share:>11}{gemm_rate:>14}")
    print("GEMM time: share of the pass's time inside matrix products, convolutions and attention; GEMM GFLOP/s: "
          "the pass's FLOPs over that time (how close the products themselves run to the peak); '-': the profiler "
          "counts no FLOPs for these operators (3-D convolutions). Profiler overhead makes these times a few % "
          "longer than the unprofiled step.")



# Kernel names of the matrix work on a GPU (cuBLAS/CUTLASS GEMMs, cuDNN convolutions, fused attention).
GPU_MATRIX_KERNELS = ("gemm", "nvjet", "xmma", "cutlass", "wgmma", "flash", "fmha", "attention", "conv", "cudnn")


def gpu_kernel_profile(step: Callable[[], object], marked: Sequence[str] = (), top: int = 12) -> dict:
    """Run ``step`` once under the profiler with CUDA activity: its wall time, the GPU's kernel time
    (their ratio says whether the host launching kernels or the GPU is the limit), the share of kernel
    time in matrix kernels (what can run near the matmul peak) and the ``top`` kernels by time. ``marked``:
    the step's ``record_function`` names, whose ranges the GPU timeline also shows (not counted)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        # record_function ranges also appear on the GPU's timeline (user annotations): not kernels
        annotation = getattr(event, "is_user_annotation", False) or event.name in marked
        if event.device_type == torch.autograd.DeviceType.CUDA and not annotation:
            entry = kernels.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.time_range.elapsed_us() / 1e3
    busy = sum(ms for _, ms in kernels.values())
    matrix = sum(ms for name, (_, ms) in kernels.items() if any(k in name.lower() for k in GPU_MATRIX_KERNELS))
    ranked = sorted(kernels.items(), key=lambda item: -item[1][1])[:top]
    launches = sum(count for count, _ in kernels.values())
    return {"wall_ms": wall * 1e3, "kernel_ms": busy, "matrix_ms": matrix, "launches": launches,
            "top": [(name[:90], count, ms) for name, (count, ms) in ranked]}


def print_gpu_profile(row: dict, title: str) -> None:
    """Print :func:`gpu_kernel_profile`'s result."""
    print(f"\n{title}: one profiled step {row['wall_ms']:.1f} ms wall, {row['kernel_ms']:.1f} ms of GPU kernels "
          f"({row['kernel_ms'] / row['wall_ms']:.0%} busy), {row['launches']} kernel launches; matrix kernels "
          f"{row['matrix_ms']:.1f} ms ({row['matrix_ms'] / row['kernel_ms']:.0%} of kernel time)")
    print(f"{'kernel':<92}{'calls':>7}{'ms':>9}{'share':>7}")
    for name, count, ms in row["top"]:
        print(f"{name:<92}{count:>7}{ms:>9.2f}{ms / row['kernel_ms']:>7.1%}")


__all__ = ["profile_step", "print_profile", "gpu_kernel_profile", "print_gpu_profile"]
