"""The conditioned latent DiT: shapes, adaLN-Zero start, null conditions, the content path, MeDUET init."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from meduet.models.architectures import MEDUET_PRESETS, DiTArchitecture
from meduet.models.dit import PRESETS, ConditionedDiT
from meduet.models.dit_init import init_from_meduet, plan_meduet_init
from meduet.models.meduet import MeduetModel


def _inputs(arch: DiTArchitecture, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(batch, arch.in_channels, *arch.input_size, generator=gen),
            "t": torch.rand(batch, generator=gen) * 1000,
            "content": torch.randn(batch, arch.content_dim, generator=gen),
            "style": torch.randn(batch, arch.style_dim, generator=gen),
            "content_tokens": torch.randn(batch, arch.num_tokens, arch.content_dim, generator=gen)}


def randomised(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """``model`` with every parameter perturbed, so zero-initialised paths carry signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("preset", ["tiny", "small"])
@pytest.mark.parametrize("spatial", [True, False])
def test_prediction_and_layer_tokens_have_the_documented_shapes(preset: str, spatial: bool) -> None:
    arch = dataclasses.replace(PRESETS[preset], spatial_content=spatial)
    model = ConditionedDiT(arch)
    inputs = _inputs(arch, batch=3)
    if not spatial:
        inputs.pop("content_tokens")
    pred, tokens = model.forward_features(**inputs, layer=arch.depth)
    assert pred.shape == inputs["x"].shape
    assert tokens.shape == (3, arch.num_tokens, arch.hidden_size)
    assert model.forward_features(**inputs)[1] is None
    with pytest.raises(ValueError, match="expected latents"):
        model(inputs["x"][..., :-2], inputs["t"], inputs["content"], inputs["style"])
    with pytest.raises(ValueError, match="layer must lie"):
        model.forward_features(**inputs, layer=arch.depth + 1)


def test_presets_align_with_meduet_tokens() -> None:
    for name, dit in PRESETS.items():
        meduet = MEDUET_PRESETS[name]
        assert (dit.input_size, dit.patch_size, dit.num_tokens) == (meduet.input_size, meduet.patch_size,
                                                                   meduet.num_tokens)
        assert (dit.content_dim, dit.style_dim) == (meduet.embed_dim, meduet.style_dim)
    assert (PRESETS["base"].hidden_size, PRESETS["base"].depth, PRESETS["base"].num_heads) == (768, 12, 12)
    assert PRESETS["base"].patch_size == 4


def test_a_fresh_model_predicts_zero_and_every_block_is_the_identity() -> None:
    arch = PRESETS["tiny"]
    model = ConditionedDiT(arch).eval()
    inputs = _inputs(arch)
    assert torch.equal(model(**inputs), torch.zeros_like(inputs["x"]))
    x = torch.randn(2, arch.num_tokens, arch.hidden_size)
    cond, time = torch.randn(2, arch.hidden_size), torch.randn(2, arch.hidden_size)
    for block in model.blocks:
        assert torch.equal(block(x, cond, time), x)
    # the identity comes from the zero gates: open them and the block acts
    with torch.no_grad():
        model.blocks[0].gates.bias.fill_(1.0)
    assert not torch.allclose(model.blocks[0](x, cond, time), x)
    # the spatial content path starts at zero too: the tokens after a block ignore the content tokens
    _, with_tokens = model.forward_features(**inputs, layer=1)
    _, without = model.forward_features(**{**inputs, "content_tokens": None}, layer=1)
    assert torch.equal(with_tokens, without)


def test_dropped_conditions_ignore_their_input_and_kept_ones_use_it() -> None:
    arch = PRESETS["tiny"]
    model = randomised(ConditionedDiT(arch))
    inputs = _inputs(arch)
    other = _inputs(arch, seed=5)
    drop = torch.tensor([True, False])
    for name, flag in (("content", "drop_content"), ("style", "drop_style"), ("content_tokens", "drop_tokens")):
        first = model(**inputs, **{flag: drop})
        changed = model(**{**inputs, name: other[name]}, **{flag: drop})
        torch.testing.assert_close(changed[0], first[0], rtol=0, atol=0, msg=name)  # dropped: input unused
        assert not torch.allclose(changed[1], first[1]), name  # kept: the input matters


def test_content_tokens_path_on_and_off() -> None:
    on = randomised(ConditionedDiT(PRESETS["tiny"]))
    inputs = _inputs(PRESETS["tiny"])
    assert not torch.allclose(on(**inputs), on(**{**inputs, "content_tokens": None}))
    # all dropped equals absent (both are the null tokens)
    torch.testing.assert_close(on(**inputs, drop_tokens=torch.tensor([True, True])),
                               on(**{**inputs, "content_tokens": None}))
    with pytest.raises(ValueError, match="aligned with the DiT's tokens"):
        on(**{**inputs, "content_tokens": inputs["content_tokens"][:, :-1]})

    off = ConditionedDiT(dataclasses.replace(PRESETS["tiny"], spatial_content=False))
    assert not any(name.startswith("content_tokens") for name, _ in off.named_parameters())
    with pytest.raises(ValueError, match="without spatial_content"):
        off(**inputs)


def test_factor_embedder_sees_only_the_direction_at_a_learnable_temperature() -> None:
    model = ConditionedDiT(PRESETS["tiny"])
    embedder = model.content_embedder
    assert embedder.log_temperature.exp().item() == pytest.approx(0.1)
    assert embedder.log_temperature.requires_grad and embedder.null.requires_grad
    f = torch.randn(3, PRESETS["tiny"].content_dim)
    torch.testing.assert_close(embedder(f), embedder(7.0 * f))


def _meduet_with_affine_norms(depth: int = 2) -> MeduetModel:
    meduet = randomised(MeduetModel(dataclasses.replace(MEDUET_PRESETS["tiny"], depth=depth)), seed=3)
    with torch.no_grad():  # non-trivial γ, β so the folding is tested
        for block in meduet.blocks:
            for norm in (block.norm1, block.norm2):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.normal_(0, 0.3)
    return meduet


def test_meduet_init_copies_the_encoder_and_folds_its_norms() -> None:
    meduet = _meduet_with_affine_norms(depth=3)  # one block deeper than the DiT
    dit = ConditionedDiT(PRESETS["tiny"])
    report = init_from_meduet(dit, meduet.state_dict())
    source, got = meduet.state_dict(), dit.state_dict()
    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias", "blocks.1.attn.proj.weight",
                "blocks.1.mlp.fc2.bias"):
        assert torch.equal(got[key], source[key]), key
    torch.testing.assert_close(got["blocks.0.attn.qkv.weight"],
                               source["blocks.0.attn.qkv.weight"] * source["blocks.0.norm1.weight"])
    # at zero modulation the DiT's branches compute MeDUET's
    x = torch.randn(2, PRESETS["tiny"].num_tokens, PRESETS["tiny"].hidden_size)
    for mine, theirs in zip(dit.blocks, meduet.blocks):
        torch.testing.assert_close(mine.attn(mine.norm1(x)), theirs.attn(x, theirs.norm1))
        torch.testing.assert_close(mine.mlp(mine.norm2(x)), theirs.mlp(x, theirs.norm2))

    assert len(report.loaded) == 2 + 2 * 8 and "blocks.0.norm1.weight" in report.folded
    assert report.skipped["blocks.2.attn.qkv.weight"] == "block beyond the DiT's depth"
    assert report.skipped["decoder_pred.weight"] == "MAE decoder"
    assert report.skipped["cls_token"].startswith("class token") and "pos_embed" in report.skipped
    assert {"blocks.0.gates.weight", "final.linear.weight", "t_embedder.mlp.0.weight"} <= set(report.kept)
    assert torch.equal(got["blocks.0.gates.weight"], torch.zeros_like(got["blocks.0.gates.weight"]))  # adaLN-Zero kept


def test_meduet_init_skips_what_does_not_fit() -> None:
    wider = ConditionedDiT(dataclasses.replace(PRESETS["tiny"], hidden_size=48))
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    report = init_from_meduet(wider, MeduetModel(MEDUET_PRESETS["tiny"]).state_dict())
    assert report.loaded == [] and all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())
    assert "does not fit" in report.skipped["blocks.0.attn.qkv.weight"]
    assert "does not fit" in report.skipped["patch_embed.proj.weight"]
    # planning needs shapes only (the stage plans on the meta device)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ConditionedDiT(PRESETS["tiny"]).state_dict().items()}
    meduet = MeduetModel(MEDUET_PRESETS["tiny"]).state_dict()
    planned = plan_meduet_init(shapes, {k: v.shape for k, v in meduet.items()})
    assert len(planned.loaded) == 18
