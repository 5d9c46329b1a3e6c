"""The segmenter's image-resolution path runs channels-last for speed: the memory layout must not change results."""

from __future__ import annotations

import copy

import pytest
import torch

from meduet.models import segmenter
from meduet.models.architectures import MEDUET_PRESETS, SegmenterArchitecture
from meduet.models.segmenter import LatentSegmenter


def test_channels_last_refinement_gives_the_logits_and_gradients_of_the_plain_layout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = LatentSegmenter(MEDUET_PRESETS["tiny"], SegmenterArchitecture(num_classes=5, decoder="refine",
                                                                          features=8, image_features=4))
    for param in model.refine_out.parameters():  # zero-initialised: give the correction something to do
        torch.nn.init.normal_(param, std=0.1)
    plain = copy.deepcopy(model)
    for module in (plain.image_stem, plain.refine, plain.refine_out):
        module.to(memory_format=torch.contiguous_format)
    assert model.refine.conv1.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert plain.refine.conv1.conv.weight.is_contiguous()

    latent = torch.randn(2, 4, *model.window)
    image = torch.rand(2, 1, *model.image_window)
    outputs = []
    for net, layout in ((model, torch.channels_last_3d), (plain, torch.contiguous_format)):
        monkeypatch.setattr(segmenter, "_IMAGE_LAYOUT", layout)  # the reference: no tensor converted either
        logits = net(latent, image)  # (B, K, 4d, 4h, 4w)
        assert logits.is_contiguous(memory_format=layout)
        (logits * torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)).sum().backward()
        outputs.append((logits.detach(), {name: p.grad for name, p in net.named_parameters() if p.grad is not None}))
    (fast, fast_grads), (ref, ref_grads) = outputs
    assert fast.shape == (2, 5, *model.image_window)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert fast_grads.keys() == ref_grads.keys() and any(k.startswith("refine.") for k in fast_grads)
    for name, grad in ref_grads.items():  # the same sums in another order: equal up to float32 rounding
        error = torch.linalg.vector_norm(fast_grads[name] - grad) / torch.linalg.vector_norm(grad)
        assert error < 1e-3, (name, float(error))  # a layout mix-up would be of order 1


@pytest.mark.parametrize("decoder", ["refine", "upsample"])
def test_body_context_is_read_by_both_stems_and_its_absence_is_a_clear_error(decoder: str) -> None:
    torch.manual_seed(0)
    head = SegmenterArchitecture(num_classes=3, decoder=decoder, features=8, image_features=4, body_context=True)
    model = LatentSegmenter(MEDUET_PRESETS["tiny"], head)
    assert head.context_channels == 3
    assert model.latent_stem.conv1.conv.in_channels == MEDUET_PRESETS["tiny"].in_channels + 3
    latent = torch.randn(2, 4, *model.window)
    image = torch.rand(2, 4, *model.image_window)
    logits = model(latent, image)
    assert logits.shape == (2, 3, *model.image_window)
    moved = image.clone()
    moved[:, 1:] = -moved[:, 1:]  # the same intensities elsewhere in the body: other logits
    assert not torch.allclose(model(latent, moved), logits)
    for wrong in (None, image[:, :1]):
        with pytest.raises(ValueError, match=r"body_context True\) needs the image window \(B, 4, 32, 32, 32\)"):
            model(latent, wrong)


def test_the_after_norm_context_correction_starts_at_zero_and_learns() -> None:
    torch.manual_seed(0)
    model = LatentSegmenter(MEDUET_PRESETS["tiny"], SegmenterArchitecture(num_classes=3, features=8, image_features=4,
                                                                          body_context=True))
    last = model.context_out[-1]
    assert not last.weight.any() and not last.bias.any()
    image = torch.rand(2, 4, *model.image_window)
    logits = model(torch.randn(2, 4, *model.window), image)
    (logits * torch.randn_like(logits)).sum().backward()
    assert last.weight.grad.abs().sum() > 0 and last.bias.grad.abs().sum() > 0
    plain = LatentSegmenter(MEDUET_PRESETS["tiny"], SegmenterArchitecture(num_classes=3))
    assert not hasattr(plain, "context_out")  # a plain head has no such layer: its checkpoints load as before
