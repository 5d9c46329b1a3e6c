import pytest
import torch
from torch import nn

from meduet.engine.ema import build_teacher, cosine_momentum, ema_update


def test_cosine_schedule_endpoints_and_midpoint():
    assert cosine_momentum(0, 100) == pytest.approx(0.997)
    assert cosine_momentum(100, 100) == pytest.approx(0.9997)
    assert cosine_momentum(500, 100) == pytest.approx(0.9997)  # stays at the end value
    assert cosine_momentum(50, 100) == pytest.approx((0.997 + 0.9997) / 2)
    values = [cosine_momentum(s, 10) for s in range(11)]
    assert values == sorted(values)
    with pytest.raises(ValueError):
        cosine_momentum(0, 0)
    with pytest.raises(ValueError):
        cosine_momentum(0, 10, start=0.9999, end=0.99)


def test_ema_update_formula_and_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = build_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    old = {n: p.clone() for n, p in teacher.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student[1].running_mean.fill_(3.0)
    ema_update(teacher, student, 0.9)
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * old[name] + 0.1 * dict(student.named_parameters())[name])
    torch.testing.assert_close(teacher[1].running_mean, torch.full((2,), 3.0))
    ema_update(teacher, student, 0.0)  # momentum 0 copies the student
    for (_, t), (_, s) in zip(teacher.named_parameters(), student.named_parameters()):
        torch.testing.assert_close(t, s)
    with pytest.raises(ValueError):
        ema_update(teacher, student, 1.5)
