import dataclasses

import pytest
import torch

from meduet.engine.ema import build_teacher
from meduet.engine.precision import amp_dtype, autocast, native_bf16
from meduet.losses import pretrain_losses
from meduet.losses.mixing import random_mix_mask
from meduet.models.meduet import PRESETS, MeduetModel

CPU = torch.device("cpu")


def test_cpu_autocast_is_opt_in_and_only_with_native_bf16():
    assert amp_dtype(CPU, amp=True) is None
    assert amp_dtype(CPU, amp=False, cpu_bf16=True) is None
    assert amp_dtype(CPU, amp=True, cpu_bf16=True) == (torch.bfloat16 if native_bf16(CPU) else None)
    with autocast(CPU, None):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.skipif(not native_bf16(CPU), reason="this CPU has no native bf16")
def test_bf16_losses_stay_close_to_fp32():
    torch.manual_seed(0)
    config = dataclasses.replace(PRESETS["small"], num_domains=2)
    student = MeduetModel(config)
    teacher = build_teacher(student)
    x = torch.randn(4, config.in_channels, *config.input_size)
    domain = torch.tensor([0, 1, 1, 0])
    mask = random_mix_mask(4, config.num_tokens, 0.5, generator=torch.Generator().manual_seed(0))
    full = pretrain_losses(student, teacher, x, domain, mask=mask)
    with autocast(CPU, amp_dtype(CPU, amp=True, cpu_bf16=True)):
        half = pretrain_losses(student, teacher, x, domain, mask=mask)
    for term, value in full.items():
        assert half[term].float().item() == pytest.approx(value.item(), rel=5e-3), term
