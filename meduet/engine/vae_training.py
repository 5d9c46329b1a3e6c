"""The per-worker VAE training loop (run by ``meduet.distributed.fit`` on every worker).

Losses: L1 reconstruction + ``kl_weight`` · KL divergence to N(0, I) + optionally, from
``adv_start`` on, ``adv_weight`` · least-squares patch adversarial loss (MONAI
``PatchDiscriminator``). bf16 autocast on GPU. Batches come from ``CropSampler`` indexed by
step, so a resumed run sees exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator

from meduet import distributed as dist
from meduet.data.volumes import CropSampler, load_volume
from meduet.engine.precision import amp_dtype, autocast
from meduet.engine.schedules import warmup_cosine
from meduet.models.vae import VAEArchitecture, build_vae


@dataclass(frozen=True)
class VAETrainSettings:
    """Everything one worker needs; plain values so Ray can ship them."""

    architecture: dict
    volumes: list[str]
    crop_size: tuple[int, int, int]
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    kl_weight: float
    adv_weight: float
    adv_start: int
    disc_channels: int
    grad_clip: float
    amp: bool
    seed: int
    checkpoint_every: int
    log_every: int


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) ‖ N(0, 1)) summed over latent voxels, averaged over the batch.

    Args:
        mu, sigma: ``(B, 4, d, h, w)`` posterior mean and standard deviation.
    """
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-12)) - 1)
    return kl.flatten(1).sum(dim=1).mean()


def train_vae_worker(config: dict) -> None:
    """Train the VAE on random crops; checkpoints and metrics go through ``meduet.distributed``."""
    s = VAETrainSettings(**config)
    torch.manual_seed(s.seed)
    device = dist.device()
    arch = VAEArchitecture(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.architecture.items()})
    model = dist.prepare_model(build_vae(arch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.999), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(s.warmup_steps, s.steps))
    adversarial = s.adv_weight > 0
    if adversarial:
        disc = dist.prepare_model(PatchDiscriminator(spatial_dims=3, channels=s.disc_channels, in_channels=1,
                                                     num_layers_d=3, norm="INSTANCE"))
        optimizer_d = torch.optim.AdamW(disc.parameters(), lr=s.lr, betas=(0.5, 0.999))
        adv_loss = PatchAdversarialLoss(criterion="least_squares")

    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    if adversarial:
        parts |= {"discriminator": disc, "optimizer_d": optimizer_d}
    start = dist.resume(**parts)

    sampler = CropSampler([load_volume(Path(p)) for p in s.volumes], s.crop_size, s.seed)
    precision = amp_dtype(device, amp=s.amp)
    rank = dist.world_rank()
    for step in range(start, s.steps):
        x = sampler.batch(step, s.batch_size, rank).to(device)  # (B, 1, D, H, W)
        with autocast(device, precision):
            recon, mu, sigma = model(x)
            l1 = torch.mean(torch.abs(recon.float() - x))
            kl = kl_divergence(mu.float(), sigma.float())
            loss = l1 + s.kl_weight * kl
            g_adv = torch.zeros((), device=device)
            if adversarial and step >= s.adv_start:
                g_adv = adv_loss(disc(recon.float())[-1], target_is_real=True, for_discriminator=False)
                loss = loss + s.adv_weight * g_adv
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        optimizer.step()
        scheduler.step()

        d_loss = torch.zeros(())
        if adversarial and step >= s.adv_start:
            with autocast(device, precision):
                fake = adv_loss(disc(recon.detach().float())[-1], target_is_real=False, for_discriminator=True)
                real = adv_loss(disc(x)[-1], target_is_real=True, for_discriminator=True)
                d_loss = 0.5 * (fake + real)
            optimizer_d.zero_grad(set_to_none=True)
            (s.adv_weight * d_loss).backward()
            optimizer_d.step()

        done = step + 1
        due = done % s.checkpoint_every == 0 or done == s.steps
        checkpoint = dist.training_state(done, **parts) if due else None
        if checkpoint is not None or done % s.log_every == 0:
            dist.report({"step": done, "loss": loss.item(), "l1": l1.item(), "kl": kl.item(),
                         "g_adv": g_adv.item(), "d_loss": d_loss.item(), "lr": scheduler.get_last_lr()[0]},
                        checkpoint)
