"""Mixed precision: when to autocast to bf16, one rule for every training loop.

bf16 autocast saves activation memory and, where the hardware multiplies bf16 fast, time.
GPUs with bf16 support qualify. CPUs with AVX512-BF16 or AMX can do it natively, but whether
it pays differs from CPU to CPU: ``benchmarks/pretrain_step.py`` measured the ``base`` step
1.7x faster with bf16 on one such Xeon and 1.8x slower on another (whose bf16 matmul peak is
half its fp32 one), so on CPUs it is opt-in (``cpu_bf16``): measure before switching it on.
On a CPU without native bf16, autocast would emulate it slowly, so it stays off there.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def amp_dtype(device: torch.device, *, amp: bool, cpu_bf16: bool = False) -> torch.dtype | None:
    """The autocast dtype for a training loop on ``device``, or ``None`` for full fp32.

    Args:
        amp: autocast on GPUs.
        cpu_bf16: also autocast on CPUs with native bf16.
    """
    wanted = amp and (device.type != "cpu" or cpu_bf16)
    if wanted and not native_bf16(device):
        log.warning("bf16 autocast requested but %s has no native bf16; training in fp32", device)
        return None
    return torch.bfloat16 if wanted else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op context for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
