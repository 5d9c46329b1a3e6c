"""The segmentation fine-tuning trainer: its parts for the shared loop (``meduet.engine.loop``).

Per micro-batch: windows of the labelled training cases, each a latent window ``(C, d, h, w)``
(scaled), the image window over the same voxels ``(1 + X, 4d, 4h, 4w)`` (``X`` body-context channels,
``meduet.data.body``, when the head reads them) and its labels. A share
``foreground_fraction`` of the windows is centred on a voxel of one class (``foreground_balance``:
a class any labelled case holds, then a case holding it; or a random case, then one of its
classes), since small organs would be rare in uniform windows, as MONAI's
``RandCropByLabelClasses`` argues; the rest lie uniformly at random. No flips: they would swap left and right organs.
Every draw comes from ``(seed, index, rank)``, so a resumed run sees the batches of an
uninterrupted one. The loss is MONAI's ``DiceCELoss`` at image resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk
import torch
from monai.losses import DiceCELoss

from meduet import distributed as dist
from meduet.artifacts.pretrained import load_meduet
from meduet.config import FinetuneConfig
from meduet.data.body import segmenter_image
from meduet.data.latent_crops import step_generator
from meduet.engine.loop import Trainer
from meduet.engine.optim import adamw
from meduet.engine.precision import amp_dtype
from meduet.engine.schedules import warmup_cosine
from meduet.engine.segmentation import pad_case
from meduet.models.architectures import MeduetArchitecture, SegmenterArchitecture
from meduet.models.segmenter import LatentSegmenter, StyleBank

TERMS = ("total",)
_SAMPLES_PER_CLASS = 2000  # voxel positions kept per class and case to centre windows on

# One micro-batch: latents (B, C, d, h, w), images (B, 1 + X, 4d, 4h, 4w), labels (B, 1, 4d, 4h, 4w) int64.
SegmentationBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class CaseFiles:
    """One labelled case: its latent ``.npy`` and harmonized image and label files."""

    latent: str
    image: str
    label: str
    # A synthesized case (a style-swapped translation): its latent is the sampled one, already scaled (the
    # cache holds raw means), and it is drawn for ``FinetuneConfig.synthetic_fraction`` of the windows.
    synthetic: bool = False
    # The harmonization window's lower bound (b_min, the intensity of air): what the image is padded with and
    # what the body outline is measured above, in training and scoring as in ``meduet predict``.
    floor: float = 0.0


def read_case(files: CaseFiles, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scaled latent ``(C, d, h, w)`` float32, image ``(D, H, W)`` float32 and labels ``(D, H, W)``."""
    latent = np.load(files.latent).astype(np.float32) * np.float32(1.0 if files.synthetic else scale)
    image = sitk.GetArrayFromImage(sitk.ReadImage(files.image)).astype(np.float32)
    label = sitk.GetArrayFromImage(sitk.ReadImage(files.label))
    return latent, image, label


class SegmentationCropSampler:
    """Aligned latent, image and label windows of labelled cases, indexed by step.

    Args:
        cases: ``(latent (C, d, h, w), image (D, H, W), label (D, H, W))`` per case, ``D = factor * d``.
        window: the latent window ``(d, h, w)``; factor: image voxels per latent voxel.
        seed: base seed; a batch depends on ``(seed, step, rank)`` alone.
        foreground_fraction: share of windows centred on a voxel of one class present in their case.
        foreground_balance: how that class is drawn: ``case`` = a random case, then one of its classes
            (a class only some cases hold, such as the lungs of the chest-including subjects, gets that
            share of the windows); ``dataset`` = one of the classes any case of the pool holds, then a
            case holding it, so every class gets as many windows however few cases show it.
        synthetic: per case, whether it is synthesized; if any is (and any is not), a window comes
            from a random synthesized case with probability ``synthetic_fraction``, else from a real one
            (without synthesized cases, every case is equally likely, as before).
        body_context: image windows also carry the body channels of ``meduet.data.body``.
        floors: per case, its harmonization window's lower bound (``CaseFiles.floor``); None: 0.0 each.
    """

    def __init__(self, cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]], window: tuple[int, int, int],
                 factor: int, seed: int, foreground_fraction: float = 0.5, synthetic: list[bool] | None = None,
                 synthetic_fraction: float = 0.3, foreground_balance: Literal["case", "dataset"] = "case",
                 body_context: bool = False, floors: list[float] | None = None) -> None:
        if not cases:
            raise ValueError("no labelled training case")
        floors = floors or [0.0] * len(cases)
        if len(floors) != len(cases):
            raise ValueError(f"{len(floors)} floors for {len(cases)} cases")
        if foreground_balance not in ("case", "dataset"):
            raise ValueError(f"foreground_balance must be 'case' or 'dataset', got {foreground_balance!r}")
        self.window, self.factor, self.seed, self.foreground_fraction = window, factor, seed, foreground_fraction
        self.foreground_balance = foreground_balance
        flags = synthetic or [False] * len(cases)
        # the cases a window may come from: [all, real, synthesized] (the last two by synthetic_fraction)
        self.pools = [list(range(len(cases))), [i for i, s in enumerate(flags) if not s],
                      [i for i, s in enumerate(flags) if s]]
        self.synthetic_fraction = synthetic_fraction if all(self.pools[1:]) else None
        padded = [pad_case(*case, window, factor, image_fill=floor)[:3] for case, floor in zip(cases, floors)]
        self.cases = [(lat, segmenter_image(img, floor, body_context=body_context), lab)  # images (1 + X, D, H, W)
                      for (lat, img, lab), floor in zip(padded, floors)]
        rng = np.random.default_rng(seed)  # which voxels represent each class: fixed by the seed
        self.positions: list[dict[int, np.ndarray]] = []  # per case, per present class > 0: (n, 3) voxel indices
        for _, _, label in self.cases:
            per_class = {}
            for c in (int(c) for c in np.unique(label) if c > 0):  # background needs no help to be seen
                flat = np.flatnonzero(label == c)
                flat = rng.choice(flat, min(len(flat), _SAMPLES_PER_CLASS), replace=False)
                per_class[c] = np.stack(np.unravel_index(flat, label.shape), axis=1)
            self.positions.append(per_class)
        self.holders: list[dict[int, list[int]]] = []  # per pool: class -> the pool's cases holding it
        for pool in self.pools:
            holders: dict[int, list[int]] = {}
            for case in pool:
                for c in self.positions[case]:
                    holders.setdefault(c, []).append(case)
            self.holders.append(dict(sorted(holders.items())))

    def _limits(self, case: int) -> list[int]:
        return [n - k for n, k in zip(self.cases[case][0].shape[1:], self.window)]

    def _centred(self, case: int, voxels: np.ndarray, gen: torch.Generator) -> list[int]:
        """Latent corner of the window of ``case`` centred on one of ``voxels`` (image indices), inside the case."""
        centre = voxels[int(torch.randint(len(voxels), (1,), generator=gen))] // self.factor
        return [int(min(max(c - k // 2, 0), hi)) for c, k, hi in zip(centre, self.window, self._limits(case))]

    def _uniform(self, case: int, gen: torch.Generator) -> list[int]:
        return [int(torch.randint(hi + 1, (1,), generator=gen)) for hi in self._limits(case)]

    def _corner(self, case: int, gen: torch.Generator) -> list[int]:
        """Latent corner of one window of ``case`` (``foreground_balance: case``)."""
        classes = list(self.positions[case].values())
        if classes and float(torch.rand(1, generator=gen)) < self.foreground_fraction:
            return self._centred(case, classes[int(torch.randint(len(classes), (1,), generator=gen))], gen)
        return self._uniform(case, gen)

    def _pool(self, gen: torch.Generator) -> int:
        """Which of ``pools`` this window comes from: all, or the real or the synthesized (``synthetic_fraction``)."""
        if self.synthetic_fraction is None:
            return 0
        return 2 if float(torch.rand(1, generator=gen)) < self.synthetic_fraction else 1

    def _draw(self, gen: torch.Generator) -> tuple[int, list[int]]:
        """One window: its case and latent corner."""
        index = self._pool(gen)
        pool, holders = self.pools[index], self.holders[index]
        if self.foreground_balance == "case":
            case = pool[int(torch.randint(len(pool), (1,), generator=gen))]
            return case, self._corner(case, gen)
        if holders and float(torch.rand(1, generator=gen)) < self.foreground_fraction:
            classes = list(holders)  # sorted by class
            c = classes[int(torch.randint(len(classes), (1,), generator=gen))]
            case = holders[c][int(torch.randint(len(holders[c]), (1,), generator=gen))]
            return case, self._centred(case, self.positions[case][c], gen)
        case = pool[int(torch.randint(len(pool), (1,), generator=gen))]
        return case, self._uniform(case, gen)

    def batch(self, step: int, batch_size: int, rank: int = 0) -> SegmentationBatch:
        """This step's and worker's windows: see ``SegmentationBatch``."""
        gen = step_generator(self.seed, step, rank)
        (wd, wh, ww), f = self.window, self.factor
        latents, images, labels = [], [], []
        for _ in range(batch_size):
            case, (i, j, k) = self._draw(gen)
            latent, image, label = self.cases[case]
            big = (slice(f * i, f * (i + wd)), slice(f * j, f * (j + wh)), slice(f * k, f * (k + ww)))
            latents.append(torch.from_numpy(np.ascontiguousarray(latent[:, i:i + wd, j:j + wh, k:k + ww])))
            images.append(torch.from_numpy(np.ascontiguousarray(image[(slice(None), *big)])))
            labels.append(torch.from_numpy(label[big].astype(np.int64))[None])
        return torch.stack(latents), torch.stack(images), torch.stack(labels)


def build_segmenter(*, backbone: MeduetArchitecture, head: SegmenterArchitecture, init: str,
                    meduet_file: str | None) -> LatentSegmenter:
    """A fresh segmenter; its encoder from the pretrained file's EMA teacher unless ``init`` is ``scratch``."""
    model = LatentSegmenter(backbone, head)
    if init != "scratch":
        if meduet_file is None:
            raise ValueError(f"init {init!r} needs a pretrained file")
        pretrained, _ = load_meduet(Path(meduet_file), "teacher")
        model.encoder.load_state_dict(pretrained.state_dict())
    return model


def build_trainer(*, cfg: FinetuneConfig, backbone: MeduetArchitecture, head: SegmenterArchitecture,
                  meduet_file: str | None, cases: list[CaseFiles], scale: float) -> Trainer:
    """The segmenter trained on windows of the labelled cases.

    Args:
        backbone: the MeDUET network shape (the pretrained file's).
        head: the segmentation head's shape.
        meduet_file: the pretrained MeDUET file (its EMA teacher initialises the encoder), or
            None for ``init: scratch``.
        cases: the labelled training cases.
        scale: the latent cache's scale factor.
    """
    device = dist.device()
    model = build_segmenter(backbone=backbone, head=head, init=cfg.init, meduet_file=meduet_file)
    sampler = SegmentationCropSampler([read_case(c, scale) for c in cases], model.window, head.downsample, cfg.seed,
                                      cfg.foreground_fraction, synthetic=[c.synthetic for c in cases],
                                      synthetic_fraction=cfg.synthetic_fraction,
                                      foreground_balance=cfg.foreground_balance, body_context=head.body_context,
                                      floors=[c.floor for c in cases])
    rank = dist.world_rank()

    def batches(step: int) -> Iterable[SegmentationBatch]:
        for micro in range(cfg.grad_accumulation):
            index = step * cfg.grad_accumulation + micro  # micro-batch index: resumable, like the step
            yield tuple(v.to(device) for v in sampler.batch(index, cfg.batch_size, rank))

    return finetune_trainer(cfg=cfg, model=model, batches=batches, device=device)


def parameter_groups(model: LatentSegmenter, *, lr: float, encoder_lr_scale: float) -> list[dict]:
    """The trained parameters as two AdamW groups: the head at ``lr`` (first: the rate the history reports),
    the encoder at ``lr * encoder_lr_scale``."""
    head: list[torch.nn.Parameter] = []
    encoder: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (encoder if name.startswith("encoder.") else head).append(param)
    return [{"params": head, "lr": lr}, {"params": encoder, "lr": lr * encoder_lr_scale}]


def finetune_trainer(*, cfg: FinetuneConfig, model: LatentSegmenter,
                     batches: Callable[[int], Iterable[SegmentationBatch]], device: torch.device) -> Trainer:
    """The optimizer, schedule and DiceCE loss around a built segmenter and its ``batches``.

    Shared by :func:`build_trainer` and ``benchmarks/finetune.py``, so the benchmark times the
    step the pipeline runs.
    """
    wrapped = dist.prepare_model(model.to(device))
    inner = dist.unwrap(wrapped)
    optimizer = adamw(parameter_groups(inner, lr=cfg.lr, encoder_lr_scale=cfg.encoder_lr_scale),
                      lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps))
    criterion = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    checkpointed = {"model": inner, "optimizer": optimizer, "scheduler": scheduler}
    bank = None
    if cfg.style_augmentation:  # each worker keeps its own bank, checkpointed with the model
        bank = StyleBank(inner.encoder.config.style_dim, momentum=cfg.style_momentum, alpha=tuple(cfg.style_alpha),
                         probability=cfg.style_probability).to(device)
        checkpointed["style_bank"] = bank

    def loss(batch: SegmentationBatch) -> dict[str, torch.Tensor]:
        latent, image, label = batch
        return {"total": criterion(wrapped(latent, image, style_bank=bank).float(), label)}

    return Trainer(checkpointed=checkpointed, optimizer=optimizer,
                   scheduler=scheduler, loss=loss, batches=batches, terms=TERMS, device=device,
                   accumulation=cfg.grad_accumulation, grad_clip=cfg.grad_clip,
                   amp_dtype=amp_dtype(device, amp=cfg.amp, cpu_bf16=cfg.cpu_bf16))
