import pytest
import torch

from meduet.models.vae import (
    PRESETS, CheckpointMismatchError, VAEArchitecture, build_vae, decode_latent, encode_volume, load_weights,
    maisi_options, num_splits_for,
)


def test_maisi_preset_has_the_published_shape():
    model = build_vae(PRESETS["maisi"])
    n_params = sum(p.numel() for p in model.parameters())
    assert 20.5e6 < n_params < 21.5e6  # MAISI's autoencoder: ~20.9 M parameters
    assert PRESETS["maisi"].downsample == 4 and PRESETS["maisi"].latent_channels == 4


@pytest.mark.parametrize("shape", [(1, 1, 32, 48, 40), (2, 1, 16, 32, 16)])
def test_tiny_vae_compresses_4x_per_axis(shape):
    model = build_vae(PRESETS["tiny"]).eval()
    with torch.no_grad():
        recon, mu, sigma = model(torch.rand(shape))
    assert mu.shape == (shape[0], 4, *(n // 4 for n in shape[2:]))
    assert recon.shape == shape and (sigma > 0).all()


def test_split_encoding_matches_whole_volume():
    """Bounded-memory (tensor-split) encoding equals whole-volume encoding."""
    torch.manual_seed(0)
    model = build_vae(PRESETS["tiny"]).eval()
    volume = torch.rand(1, 1, 32, 64, 48)
    with torch.no_grad():
        whole_mu, whole_sigma = model.encode(volume)
        whole_recon = model.decode(whole_mu)
    assert num_splits_for(volume.shape, max_voxels=20_000) > 1
    mu, sigma = encode_volume(model, volume, max_voxels=20_000)
    torch.testing.assert_close(mu, whole_mu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sigma, whole_sigma, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(decode_latent(model, whole_mu, max_voxels=20_000), whole_recon, atol=1e-4, rtol=1e-4)
    assert all(m.num_splits == 1 for m in model.modules() if hasattr(m, "num_splits"))  # knob restored


@pytest.mark.parametrize("shape,max_voxels,expected", [((64, 64, 64), 10**9, 1), ((64, 64, 64), 64**3 // 4, 4),
                                                       ((16, 16, 16), 1, 1)])
def test_num_splits_for(shape, max_voxels, expected):
    assert num_splits_for(shape, max_voxels) == expected


def test_mismatched_weights_name_the_keys(tmp_path):
    small, tiny = build_vae(PRESETS["small"]), build_vae(PRESETS["tiny"])
    path = tmp_path / "autoencoder.pt"
    torch.save({"state_dict": small.state_dict()}, path)
    with pytest.raises(CheckpointMismatchError, match=r"autoencoder.pt: .*another shape \[decoder"):
        load_weights(tiny, path)
    state = tiny.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["encoder.blocks.0.conv.conv.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"1 missing \[encoder.blocks.0.conv.conv.weight\], "
                                                      r"1 unexpected \[extra.weight\]"):
        load_weights(tiny, path, state=state)
    torch.save(tiny.state_dict(), path)  # a bare state dict loads too
    fresh = build_vae(PRESETS["tiny"])
    assert not all(torch.equal(v, fresh.state_dict()[k]) for k, v in tiny.state_dict().items())
    load_weights(fresh, path)
    for key, value in tiny.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_architecture_validation():
    with pytest.raises(ValueError, match="divide by norm_num_groups"):
        VAEArchitecture((8, 12, 16), (1, 1, 1), 4, 8)


def test_native_group_norm_matches_maisi_as_shipped_forward_and_backward():
    """``build_vae`` swaps MAISI's per-group Python norm for ``nn.GroupNorm``: same state dict, same
    outputs and gradients (to rounding), also channels-last as ``train-vae`` runs it."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi, MaisiGroupNorm3D

    torch.manual_seed(0)
    arch = PRESETS["tiny"]
    stock = AutoencoderKlMaisi(**maisi_options(arch))
    for module in stock.modules():  # non-trivial affine parameters, so a lost parameter would show
        if isinstance(module, MaisiGroupNorm3D):
            torch.nn.init.normal_(module.weight, 1.0, 0.2)
            torch.nn.init.normal_(module.bias, 0.0, 0.2)
    ours = build_vae(arch)
    assert not any(isinstance(m, MaisiGroupNorm3D) for m in ours.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in ours.modules()) == 14
    ours.load_state_dict(stock.state_dict())  # strict: same keys and shapes
    ours = ours.to(memory_format=torch.channels_last_3d)
    x = torch.rand(2, 1, 16, 16, 16)
    outputs = []
    for model, crops in ((stock, x), (ours, x.contiguous(memory_format=torch.channels_last_3d))):
        torch.manual_seed(1)  # the same posterior sample in both, whatever the layout
        recon, mu, _ = model(crops)
        (recon.abs().mean() + mu.pow(2).mean()).backward()
        outputs.append((recon, mu, [p.grad for p in model.parameters()]))
    (recon_a, mu_a, grads_a), (recon_b, mu_b, grads_b) = outputs
    torch.testing.assert_close(recon_b, recon_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mu_b, mu_a, atol=1e-5, rtol=1e-4)
    for grad_a, grad_b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(grad_b, grad_a, atol=1e-5, rtol=1e-3)


def test_blocks_keep_a_channels_last_tensor_channels_last():
    """MAISI's residual blocks and upsampling copy their output back to NCDHW (MONAI's convert_to_tensor);
    the next convolution copies it back, forward and backward. ``build_vae``'s blocks do not."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import MaisiResBlock, MaisiUpsample

    channels_last = torch.channels_last_3d
    model = build_vae(PRESETS["tiny"]).to(memory_format=channels_last)
    layouts = []
    for module in model.modules():
        if isinstance(module, (MaisiResBlock, MaisiUpsample)):
            module.register_forward_hook(lambda mod, _, out: layouts.append(
                (type(mod).__name__, out.is_contiguous(memory_format=channels_last))))
    model(torch.rand(2, 1, 16, 16, 16).contiguous(memory_format=channels_last))  # a batch, as train-vae runs
    assert len(layouts) == 8  # the tiny preset's six residual blocks and two upsamplings all ran
    assert all(kept for _, kept in layouts), layouts
