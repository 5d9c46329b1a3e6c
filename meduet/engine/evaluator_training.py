"""The synthesis evaluator's trainer: its parts for the shared loop (``meduet.engine.loop``).

Loss: ``site_weight`` · cross-entropy of the site head + ``seg_weight`` · Dice + cross-entropy
(``monai.losses.DiceCELoss``) of the organ labels. Every step draws ``crops_per_site`` random
crops of each site (image and label map cropped together, never flipped: left and right
organs have their own labels), so the site head sees balanced batches whatever the site sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss

from meduet import distributed as dist
from meduet.config import TrainEvaluatorConfig
from meduet.data.labelled import load_labelled
from meduet.data.volumes import CropSampler
from meduet.engine.loop import Trainer
from meduet.engine.optim import adamw
from meduet.engine.schedules import warmup_cosine
from meduet.models.architectures import EvaluatorArchitecture
from meduet.models.evaluator import EvaluatorNet

TERMS = ("loss", "site_ce", "seg_dice_ce", "site_acc")


def build_trainer(*, cfg: TrainEvaluatorConfig, architecture: EvaluatorArchitecture,
                  volumes: list[tuple[str, str, int]], label_ids: list[int]) -> Trainer:
    """The evaluator's parts.

    Args:
        volumes: ``(image, label, site index)`` of every training case (harmonized ``.nii.gz`` paths).
        label_ids: label values, in the order of the segmentation head's classes.
    """
    device = dist.device()
    model = dist.prepare_model(EvaluatorNet(architecture))
    optimizer = adamw(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps))
    sites = sorted({site for _, _, site in volumes})
    samplers = [CropSampler([load_labelled(Path(i), Path(la), label_ids) for i, la, s in volumes if s == site],
                            tuple(cfg.crop_size), int(np.random.SeedSequence([cfg.seed, site]).generate_state(1)[0]),
                            flip=False) for site in sites]
    site_of_crop = torch.tensor(sites).repeat_interleave(cfg.crops_per_site).to(device)  # (B,)
    seg_loss = DiceCELoss(to_onehot_y=True, softmax=True)
    rank = dist.world_rank()

    def batches(step: int):
        crops = torch.cat([s.batch(step, cfg.crops_per_site, rank) for s in samplers]).to(device)  # (B, 2, D, H, W)
        yield crops[:, :1], crops[:, 1:].round().long(), site_of_crop

    def loss(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, labels, site = batch
        site_logits, seg_logits = model(x)  # (B, K), (B, L, D, H, W)
        site_ce = torch.nn.functional.cross_entropy(site_logits.float(), site)
        seg = seg_loss(seg_logits.float(), labels)
        return {"loss": cfg.site_weight * site_ce + cfg.seg_weight * seg, "site_ce": site_ce, "seg_dice_ce": seg,
                "site_acc": (site_logits.argmax(1) == site).float().mean()}

    return Trainer(checkpointed={"model": model, "optimizer": optimizer, "scheduler": scheduler}, optimizer=optimizer,
                   scheduler=scheduler, loss=loss, batches=batches, terms=TERMS, device=device, total="loss",
                   grad_clip=cfg.grad_clip)
