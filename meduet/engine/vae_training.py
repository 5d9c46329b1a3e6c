"""The VAE trainer: its parts for the shared loop (``meduet.engine.loop``).

Losses: L1 reconstruction + ``kl_weight`` · KL divergence to N(0, I) + optionally, from
``adv_start`` on, ``adv_weight`` · least-squares patch adversarial loss (MONAI
``PatchDiscriminator``, stepped after the generator in ``after_step``). bf16 autocast on GPU.
Batches come from ``CropSampler`` indexed by step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from torch import nn

from meduet import distributed as dist
from meduet.config import VAEConfig
from meduet.data.volumes import CropSampler, load_volume
from meduet.engine.loop import Trainer
from meduet.engine.optim import adamw
from meduet.engine.precision import amp_dtype, autocast
from meduet.engine.schedules import warmup_cosine
from meduet.models.vae import PRESETS, build_vae

TERMS = ("loss", "l1", "kl", "g_adv", "d_loss")


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) ‖ N(0, 1)) summed over latent voxels, averaged over the batch.

    Args:
        mu, sigma: ``(B, 4, d, h, w)`` posterior mean and standard deviation.
    """
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-12)) - 1)
    return kl.flatten(1).sum(dim=1).mean()


def build_trainer(*, cfg: VAEConfig, volumes: list[str]) -> Trainer:
    """The VAE's parts, trained on random crops of the harmonized ``volumes`` (``.nii.gz`` paths)."""
    device = dist.device()
    sampler = CropSampler([load_volume(Path(p)) for p in volumes], tuple(cfg.crop_size), cfg.seed)
    rank = dist.world_rank()

    def batches(step: int):
        crops = sampler.batch(step, cfg.batch_size, rank)  # (B, 1, D, H, W)
        yield step, crops.to(device, memory_format=torch.channels_last_3d)

    model = build_vae(PRESETS[cfg.preset]).to(memory_format=torch.channels_last_3d)
    return vae_trainer(cfg=cfg, model=model, batches=batches, device=device)


def vae_trainer(*, cfg: VAEConfig, model: nn.Module, batches: Callable[[int], Iterable[tuple[int, torch.Tensor]]],
                device: torch.device) -> Trainer:
    """The optimizers and losses around a built VAE and ``batches`` (``(step, crops (B, 1, D, H, W))``).

    Shared by :func:`build_trainer` and ``benchmarks/vae_step.py``, so the benchmark times the
    step the pipeline runs. The pipeline's network and crops are channels-last
    (``channels_last_3d``): oneDNN's 3-D convolutions, above all their backward, run about
    twice as fast on CPU in that layout (``benchmarks/vae_step.py``); results differ from the
    default layout only by floating-point rounding.
    """
    model = dist.prepare_model(model.to(device))
    optimizer = adamw(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps))
    precision = amp_dtype(device, amp=cfg.amp)
    checkpointed = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    zero = torch.zeros((), device=device)

    adversarial = cfg.adv_weight > 0
    if adversarial:
        disc = dist.prepare_model(PatchDiscriminator(spatial_dims=3, channels=cfg.disc_channels, in_channels=1,
                                                     num_layers_d=3, norm="INSTANCE").to(device))
        optimizer_d = adamw(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        adv_loss = PatchAdversarialLoss(criterion="least_squares")
        checkpointed |= {"discriminator": disc, "optimizer_d": optimizer_d}
    last: dict[str, torch.Tensor] = {}  # the step's input and reconstruction, for the discriminator step

    def loss(batch: tuple[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        step, x = batch
        recon, mu, sigma = model(x)
        l1 = torch.mean(torch.abs(recon.float() - x))
        kl = kl_divergence(mu.float(), sigma.float())
        total = l1 + cfg.kl_weight * kl
        g_adv = zero
        if adversarial and step >= cfg.adv_start:
            g_adv = adv_loss(disc(recon.float())[-1], target_is_real=True, for_discriminator=False)
            total = total + cfg.adv_weight * g_adv
            last.update(x=x, recon=recon.detach().float())
        return {"loss": total, "l1": l1, "kl": kl, "g_adv": g_adv}

    def discriminator_step(step: int) -> dict[str, torch.Tensor]:
        if not last:
            return {"d_loss": zero}
        with autocast(device, precision):
            fake = adv_loss(disc(last["recon"])[-1], target_is_real=False, for_discriminator=True)
            real = adv_loss(disc(last["x"])[-1], target_is_real=True, for_discriminator=True)
            d_loss = 0.5 * (fake + real)
        optimizer_d.zero_grad(set_to_none=True)
        (cfg.adv_weight * d_loss).backward()
        optimizer_d.step()
        last.clear()
        return {"d_loss": d_loss.detach()}

    return Trainer(checkpointed=checkpointed, optimizer=optimizer, scheduler=scheduler, loss=loss, batches=batches,
                   terms=TERMS, device=device, total="loss", grad_clip=cfg.grad_clip, amp_dtype=precision,
                   after_step=discriminator_step if adversarial else lambda step: {"d_loss": zero})
