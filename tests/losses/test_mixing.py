import pytest
import torch

from meduet.losses.mixing import check_mask, mix_tokens, random_mix_mask, reconstruction_loss, remix, unmix
from meduet.models.blocks import patchify


@pytest.mark.parametrize("batch,n,ratio", [(2, 8, 0.5), (4, 27, 0.5), (4, 64, 0.25)])
def test_random_mask_has_exactly_round_ratio_n_partner_tokens(batch, n, ratio):
    mask = random_mix_mask(batch, n, ratio, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (batch, n) and mask.dtype == torch.bool
    assert (mask.sum(1) == round(ratio * n)).all()
    assert check_mask(mask, ratio) == round(ratio * n)


def test_check_mask_rejects_bad_masks():
    good = random_mix_mask(2, 8, 0.5)
    with pytest.raises(ValueError, match="exactly"):
        check_mask(torch.ones(2, 8, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match="even"):
        check_mask(random_mix_mask(3, 8, 0.5), 0.5)
    with pytest.raises(ValueError, match="bool"):
        check_mask(good.float(), 0.5)


def test_mixing_then_unmixing_restores_the_token_sets():
    torch.manual_seed(0)
    tokens = torch.randn(4, 12, 3)
    mask = random_mix_mask(4, 12, 0.5)
    own, partner = unmix(mix_tokens(tokens, mask), mask)
    assert own.shape == partner.shape == (4, 6, 3)
    for i in range(4):
        torch.testing.assert_close(own[i], tokens[i][~mask[i]])  # own tokens, raster order
        torch.testing.assert_close(partner[i], tokens[3 - i][mask[i]])  # the partner's, B-1-i


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_remix_inverts_unmix(ratio):
    torch.manual_seed(0)
    tokens = torch.randn(2, 16, 5)
    mask = random_mix_mask(2, 16, ratio)
    own, partner = unmix(tokens, mask)
    assert partner.shape[1] == round(ratio * 16)
    torch.testing.assert_close(remix(own, partner, mask), tokens)
    own2, partner2 = unmix(remix(own, partner, mask), mask)
    torch.testing.assert_close(own2, own)
    torch.testing.assert_close(partner2, partner)


def test_reconstruction_loss_counts_only_positions_each_pass_inferred():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 4, 4, 4)
    mask = random_mix_mask(2, 8, 0.5)
    target = patchify(x, 2)  # (2, 8, 8)
    pred = torch.randn(4, 8, 8)
    expected = []
    for i in range(2):
        for n in range(8):
            if mask[i, n]:  # pass 1 predicts sample i, which did not show position n
                expected.append(((pred[i, n] - target[i, n]) ** 2).mean())
            else:  # pass 2 predicts the partner 1-i, which did not show position n
                expected.append(((pred[2 + i, n] - target[1 - i, n]) ** 2).mean())
    loss = reconstruction_loss(pred, x, mask, patch_size=2)
    torch.testing.assert_close(loss, torch.stack(expected).mean())
