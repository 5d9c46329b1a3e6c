import math

import pytest
import torch

from meduet.losses.mixing import random_mix_mask
from meduet.models.blocks import PatchEmbed3d, TransformerBlock, patchify, sincos_pos_embed_3d, unpatchify
from meduet.models.meduet import PRESETS, MeduetArchitecture, MeduetModel

TINY = PRESETS["tiny"]


def test_base_preset_has_the_paper_shape():
    cfg = PRESETS["base"]
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == (768, 12, 12)
    assert (cfg.decoder_embed_dim, cfg.decoder_depth, cfg.mlp_ratio) == (384, 8, 4.0)
    assert cfg.grid == (6, 6, 6) and cfg.num_tokens == 216 and cfg.style_dim == 192 and cfg.patch_dim == 256


@pytest.mark.parametrize("kwargs", [
    {"input_size": (24, 24, 22)}, {"embed_dim": 100}, {"decoder_embed_dim": 100}, {"mask_ratio": 1.0},
    {"s_ratio": 0.0}, {"num_domains": 1}, {"depth": 0},
])
def test_config_rejects_inconsistent_shapes(kwargs):
    with pytest.raises(ValueError):
        MeduetArchitecture(**kwargs)


def test_model_rejects_wrong_latent_shape():
    with pytest.raises(ValueError, match="expected latents"):
        MeduetModel(TINY).embed(torch.zeros(2, 4, 8, 8, 6))


@pytest.mark.parametrize("shape,p", [((2, 4, 8, 8, 8), 2), ((1, 3, 8, 12, 4), 4)])
def test_patchify_roundtrip_and_token_order_match_patch_embed(shape, p):
    x = torch.randn(shape)
    patches = patchify(x, p)
    grid = tuple(n // p for n in shape[2:])
    assert patches.shape == (shape[0], math.prod(grid), p**3 * shape[1])
    torch.testing.assert_close(unpatchify(patches, p, grid, shape[1]), x)
    # A conv picking one voxel per patch must list patches in the same order as patchify.
    embed = PatchEmbed3d(in_channels=shape[1], embed_dim=1, patch_size=p)
    with torch.no_grad():
        embed.proj.weight.zero_()
        embed.proj.weight[0, 0, 0, 0, 0] = 1.0
        embed.proj.bias.zero_()
    torch.testing.assert_close(embed(x)[..., 0], patches[..., 0])


def test_sincos_pos_embed_is_distinct_bounded_and_has_zero_cls_row():
    table = sincos_pos_embed_3d(32, (2, 3, 4), cls_token=True)
    assert table.shape == (1 + 24, 32)
    assert torch.equal(table[0], torch.zeros(32)) and table.abs().max() <= 1.0
    assert torch.unique(table[1:], dim=0).shape[0] == 24  # every position distinct
    assert torch.equal(table[1:, 30:], torch.zeros(24, 2))  # 32 = 3 * 10 + 2 unused channels


def test_transformer_block_keeps_shape_and_mixes_tokens():
    block = TransformerBlock(dim=16, num_heads=2)
    x = torch.randn(2, 5, 16)
    y = block(x)
    assert y.shape == x.shape
    x2 = x.clone()
    x2[:, 0] = torch.randn(2, 16)  # (a constant shift would vanish in the LayerNorm)
    assert not torch.allclose(block(x2)[:, 1], y[:, 1])  # attention reaches other tokens
    with pytest.raises(ValueError):
        TransformerBlock(dim=16, num_heads=3)


def test_forward_and_factor_shapes():
    model = MeduetModel(TINY)
    content, style = model(torch.randn(2, 4, 8, 8, 8))
    assert content.shape == (2, 64, 32) and style.shape == (2, 64, 8)


def test_batched_dual_decoding_equals_two_separate_decoder_calls():
    torch.manual_seed(0)
    model = MeduetModel(TINY).eval()
    z, cls = torch.randn(4, 64, 32), torch.randn(4, 1, 32)
    mask = random_mix_mask(4, 64, 0.5)
    dual = model.decode_dual(z, cls, mask)
    separate = torch.cat([model.decode(z, cls, mask), model.decode(z, cls, ~mask)])
    assert dual.shape == (8, 64, TINY.patch_dim)
    torch.testing.assert_close(dual, separate, atol=1e-5, rtol=1e-5)


def test_reconstruct_takes_each_position_from_the_pass_that_hid_it():
    torch.manual_seed(0)
    model = MeduetModel(TINY).eval()
    z, cls = torch.randn(2, 64, 32), torch.randn(2, 1, 32)
    mask = random_mix_mask(2, 64, 0.5)
    full = model.reconstruct(z, cls, mask)
    torch.testing.assert_close(full[mask], model.decode(z, cls, mask)[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[~mask], model.decode(z, cls, ~mask)[~mask], atol=1e-5, rtol=1e-5)


def test_decoder_ignores_hidden_tokens():
    torch.manual_seed(0)
    model = MeduetModel(TINY).eval()
    z, cls = torch.randn(2, 64, 32), torch.randn(2, 1, 32)
    hidden = random_mix_mask(2, 64, 0.5)
    z2 = torch.where(hidden[..., None], torch.randn_like(z), z)
    torch.testing.assert_close(model.decode(z, cls, hidden), model.decode(z2, cls, hidden))


def test_encoder_is_per_sample_so_flipping_commutes():
    """Why the teacher may flip its tokens instead of re-encoding the flipped batch."""
    torch.manual_seed(0)
    model = MeduetModel(TINY).eval()
    x = torch.randn(4, 4, 8, 8, 8)
    c, s, _ = model.encode_full(x)
    c_flip, s_flip, _ = model.encode_full(x.flip(0))
    torch.testing.assert_close(c.flip(0), c_flip, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.flip(0), s_flip, atol=1e-5, rtol=1e-5)
