"""Fine-tuning trains the encoder at ``encoder_lr_scale`` times the head's learning rate."""

from __future__ import annotations

import pytest
import torch

from meduet.config import FinetuneConfig
from meduet.engine.finetune_training import finetune_trainer
from meduet.engine.loop import optimizer_step
from meduet.models.architectures import MEDUET_PRESETS, SegmenterArchitecture
from meduet.models.segmenter import LatentSegmenter


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_the_first_adamw_step_moves_encoder_weights_by_the_scaled_rate(scale: float) -> None:
    torch.manual_seed(0)
    model = LatentSegmenter(MEDUET_PRESETS["tiny"], SegmenterArchitecture(num_classes=3, decoder="refine",
                                                                          features=4, image_features=2))
    cfg = FinetuneConfig(label_names=["background", "a", "b"], lr=1e-2, encoder_lr_scale=scale, warmup_steps=0,
                         weight_decay=0.0)
    latent = torch.randn(2, 4, *model.window)
    image = torch.rand(2, 1, *model.image_window)
    label = torch.randint(0, 3, (2, 1, *model.image_window))
    trainer = finetune_trainer(cfg=cfg, model=model, batches=lambda step: [(latent, image, label)],
                               device=torch.device("cpu"))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert trainer.scheduler.get_last_lr() == pytest.approx([1e-2, 1e-2 * scale])  # the history reports the head's
    optimizer_step(trainer, trainer.batches(0))
    # AdamW's first update is lr * g / (|g| + eps): lr wherever the gradient is well above eps
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in model.named_parameters()
             if name in before}
    encoder = [v for name, v in moved.items() if name.startswith("encoder.")]
    head = [v for name, v in moved.items() if not name.startswith("encoder.")]
    assert encoder and head and len(encoder) + len(head) == len(before)
    assert max(encoder) == pytest.approx(1e-2 * scale, rel=1e-3)
    assert max(head) == pytest.approx(1e-2, rel=1e-3)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(name not in before for name in frozen)  # the MAE decoder and factor heads stay out
