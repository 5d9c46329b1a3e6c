"""How the frozen synthesis evaluator reads a whole volume: its site, its organs, their Dice.

- site: the mean site probability over the volume's grid crops that are mostly body (air is
  the window's floor after harmonization and carries no site);
- organs: the segmentation head on the whole volume (MONAI sliding windows when it is too large);
- Dice per organ (``monai.metrics.DiceMetric``), NaN where the organ is absent from the truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from meduet.config import TrainEvaluatorConfig
from meduet.data.windows import sliding_windows
from meduet.harmonize.intensity import range_level
from meduet.models.evaluator import EvaluatorNet


def body_crops(image: torch.Tensor, crop: tuple[int, int, int], *, threshold: float,
               min_fraction: float) -> torch.Tensor:
    """The grid crops of ``image (C, D, H, W)`` whose first channel is at least ``min_fraction`` body.

    Returns:
        ``(n, C, *crop)``; the crop with the most body when none reaches ``min_fraction``.
    """
    windows = sliding_windows(image, crop)  # (n, C, *crop), stride = crop, the last aligned to the end
    fraction = (windows[:, 0] > threshold).float().mean(dim=(1, 2, 3))  # (n,)
    keep = fraction >= min_fraction
    return windows[keep] if keep.any() else windows[fraction.argmax()][None]


@torch.no_grad()
def site_probabilities(model: EvaluatorNet, crops: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Softmax of the site head for each crop of ``crops (n, C, D, H, W)``: ``(n, K)``."""
    return torch.cat([model.classify(batch).softmax(dim=1) for batch in crops.split(batch_size)])


@torch.no_grad()
def segment(model: EvaluatorNet, image: torch.Tensor, *, window: tuple[int, int, int], overlap: float,
            batch_size: int, max_voxels: int) -> torch.Tensor:
    """Head classes ``(D, H, W)`` of a whole ``image (C, D, H, W)``.

    In one pass when the volume (zero-padded to the network's divisor) holds at most
    ``max_voxels`` voxels: the network is fully convolutional, and one pass is several times
    faster than overlapping windows and has no window seams; otherwise MONAI's sliding windows
    of size ``window``.
    """
    k = model.config.downsample
    size = image.shape[1:]
    pad = [(-n) % k for n in size]
    x = torch.nn.functional.pad(image.float(), [p for n in reversed(pad) for p in (0, n)])[None]  # (1, C, D', H', W')
    roi = tuple(x.shape[2:]) if x[0, 0].numel() <= max_voxels else window
    logits = sliding_window_inference(x, roi, batch_size, lambda batch: model(batch)[1], overlap=overlap,
                                      mode="gaussian")  # (1, L, D', H', W')
    return logits[0, :, :size[0], :size[1], :size[2]].argmax(dim=0)


def organ_dice(prediction: torch.Tensor, truth: torch.Tensor, num_labels: int) -> np.ndarray:
    """Dice of each non-background class between two ``(D, H, W)`` class maps: ``(L - 1,)``.

    NaN for a class absent from ``truth`` (nothing to find); 0 when the truth has it and the
    prediction does not.
    """
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    encode = [one_hot(x[None, None].long(), num_labels, dim=1) for x in (prediction, truth)]  # (1, L, D, H, W)
    return metric(*encode)[0].double().numpy()


@dataclass(frozen=True)
class VolumeReader:
    """The frozen evaluator with the settings it was trained and judged with (``train_evaluator``)."""

    model: EvaluatorNet
    crop: tuple[int, int, int]
    threshold: float
    min_fraction: float
    overlap: float
    batch_size: int
    max_voxels: int

    @classmethod
    def from_section(cls, model: EvaluatorNet, cfg: TrainEvaluatorConfig,
                     value_range: tuple[float, float]) -> VolumeReader:
        """The reader of ``cfg``; its body threshold is ``cfg.body_threshold`` of the way up the harmonized
        ``value_range`` (``(b_min, b_max)``, :func:`meduet.harmonize.intensity.output_range`)."""
        return cls(model=model.eval(), crop=tuple(cfg.crop_size),  # type: ignore[arg-type]
                   threshold=range_level(cfg.body_threshold, value_range),
                   min_fraction=cfg.min_body_fraction, overlap=cfg.overlap, batch_size=cfg.batch_size,
                   max_voxels=cfg.max_voxels_per_pass)

    def body(self, image: torch.Tensor, crop: tuple[int, int, int] | None = None) -> torch.Tensor:
        """:func:`body_crops` of ``image (C, D, H, W)`` (of the training crop size unless ``crop``)."""
        return body_crops(image, crop or self.crop, threshold=self.threshold, min_fraction=self.min_fraction)

    def site(self, image: torch.Tensor) -> torch.Tensor:
        """Site probabilities ``(n, K)`` of each body crop of a whole ``image (C, D, H, W)`` (average: the volume's)."""
        return site_probabilities(self.model, self.body(image), self.batch_size)

    def crops_site(self, crops: torch.Tensor) -> torch.Tensor:
        """Site probabilities ``(n, K)`` of ``crops (n, C, D, H, W)``."""
        return site_probabilities(self.model, crops, self.batch_size)

    @torch.no_grad()
    def features(self, crops: torch.Tensor) -> np.ndarray:
        """Pooled features ``(n, F)`` of ``crops (n, C, D, H, W)``."""
        features = [self.model.features(batch.float()) for batch in crops.split(self.batch_size)]
        return torch.cat(features).double().numpy()

    def organs(self, image: torch.Tensor) -> torch.Tensor:
        """Head classes ``(D, H, W)`` of a whole ``image (C, D, H, W)`` (:func:`segment`)."""
        return segment(self.model, image, window=self.crop, overlap=self.overlap, batch_size=self.batch_size,
                       max_voxels=self.max_voxels)
