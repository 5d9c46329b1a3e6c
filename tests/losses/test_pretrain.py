import dataclasses

import pytest
import torch

from meduet.engine.ema import build_teacher, ema_update
from meduet.losses import LossWeights, pretrain_losses
from meduet.losses.mixing import random_mix_mask
from meduet.models.meduet import PRESETS, MeduetModel

TINY = PRESETS["tiny"]
TERMS = {"rec", "domain_content", "domain_style", "mftd", "siqc", "clean_content", "clean_style", "decorrelation",
         "site_alignment", "total"}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 4, 8, 8, 8, generator=g)
    return x, torch.tensor([0, 1, 0, 1]), random_mix_mask(4, TINY.num_tokens, 0.5, generator=g)


def test_total_loss_is_finite_and_reaches_every_trainable_parameter():
    torch.manual_seed(0)
    student = MeduetModel(TINY)
    teacher = build_teacher(student)
    x, domain, mask = _batch()
    losses = pretrain_losses(student, teacher, x, domain, mask=mask)
    assert set(losses) == TERMS and all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    w = LossWeights()
    expected = (losses["rec"] + w.domain * (losses["domain_content"] + losses["domain_style"])
                + w.mftd * losses["mftd"] + w.siqc * losses["siqc"])
    torch.testing.assert_close(losses["total"], expected)
    losses["total"].backward()
    missing = [n for n, p in student.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    assert not student.logit_scale_content.requires_grad  # fixed temperature by default
    assert all(p.grad is None for p in teacher.parameters())


def test_switches_and_learnable_logit_scale():
    torch.manual_seed(0)
    student = MeduetModel(dataclasses.replace(TINY, learnable_logit_scale=True))
    x, domain, mask = _batch()
    losses = pretrain_losses(student, build_teacher(student), x, domain, mask=mask, use_mftd=False, use_siqc=False)
    assert losses["mftd"] == 0 and losses["siqc"] == 0
    losses = pretrain_losses(student, build_teacher(student), x, domain, mask=mask, use_mftd=False)
    losses["total"].backward()
    assert student.logit_scale_content.grad is not None and student.logit_scale_style.grad is not None


def test_siqc_needs_half_mixing_and_masks_are_validated():
    torch.manual_seed(0)
    student = MeduetModel(dataclasses.replace(TINY, mask_ratio=0.25))
    teacher = build_teacher(student)
    x, domain, _ = _batch()
    assert torch.isfinite(pretrain_losses(student, teacher, x, domain, use_siqc=False)["total"])
    with pytest.raises(ValueError, match="equal token groups"):
        pretrain_losses(student, teacher, x, domain)
    with pytest.raises(ValueError, match="exactly"):
        pretrain_losses(student, teacher, x, domain, mask=torch.zeros(4, TINY.num_tokens, dtype=torch.bool))


def test_a_few_adamw_steps_lower_the_total_loss():
    torch.manual_seed(0)
    student = MeduetModel(TINY)
    teacher = build_teacher(student)
    x, domain, mask = _batch()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    totals = []
    for _ in range(6):
        loss = pretrain_losses(student, teacher, x, domain, mask=mask)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(teacher, student, 0.99)
        totals.append(loss.item())
    assert totals[-1] < totals[0]
