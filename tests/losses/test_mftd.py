import pytest
import torch

from meduet.losses.mftd import dual_targets, masked_token_mse, mftd_loss
from meduet.models.meduet import PRESETS, MeduetModel


def test_mftd_averages_over_exactly_the_cross_source_positions():
    mask = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.bool)  # B=2, N=4, k=2
    student_content = torch.arange(1.0, 17.0).reshape(4, 4, 1)  # rows: pass 1 (i=0,1), pass 2 (i=0,1)
    zeros_c, zeros_s = torch.zeros(2, 4, 1), torch.zeros(2, 4, 3)
    # Cross positions: pass 1 row i where mask[i]; pass 2 row i where ~mask[i]:
    # values 1, 4 | 6, 7 | 10, 11 | 13, 16  ->  mean of squares = 748 / 8 = 93.5
    loss = mftd_loss(student_content, torch.zeros(4, 4, 3), zeros_c, zeros_s, mask, content_weight=0.5)
    torch.testing.assert_close(loss, torch.tensor(0.5 * 93.5))


def test_mftd_targets_of_pass_two_are_the_flipped_teacher_tokens():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.bool)
    teacher_c, teacher_s = torch.randn(2, 4, 5), torch.randn(2, 4, 2)
    exact = mftd_loss(dual_targets(teacher_c), dual_targets(teacher_s), teacher_c, teacher_s, mask)
    assert exact == 0
    unflipped = mftd_loss(teacher_c.repeat(2, 1, 1), teacher_s.repeat(2, 1, 1), teacher_c, teacher_s, mask)
    assert unflipped > 0


def test_teacher_flip_by_indexing_equals_reencoding_the_flipped_batch():
    torch.manual_seed(0)
    teacher = MeduetModel(PRESETS["tiny"]).eval()
    x = torch.randn(4, 4, 8, 8, 8)
    with torch.no_grad():
        content, _, _ = teacher.encode_full(x)
        content_flipped, _, _ = teacher.encode_full(x.flip(0))
    torch.testing.assert_close(dual_targets(content), torch.cat([content, content_flipped]), atol=1e-5, rtol=1e-5)


def test_masked_token_mse_checks_shapes():
    with pytest.raises(ValueError):
        masked_token_mse(torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), torch.ones(2, 3))
