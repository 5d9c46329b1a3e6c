"""Factors of whole latent volumes: the MeDUET encoder over sliding windows, token- and window-averaged.

Shared by ``extract-factors`` (every window's factors and world box), the fine-tuning
sweep's lesion probe (one pooled content vector per volume) and the DiT trainer's
volume-style conditioning (one pooled style vector per volume).
"""

from __future__ import annotations

import numpy as np
import torch

from meduet.data.windows import sliding_windows, window_origins, world_boxes
from meduet.models.meduet import MeduetModel


@torch.no_grad()
def window_factors(model: MeduetModel, windows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-averaged factors of each window.

    Args:
        windows: ``(n, C, d, h, w)`` scaled latents of the model's input size (moved to the
            model's device batch by batch).

    Returns:
        ``content (n, E)``, ``style (n, S)``, on the CPU.
    """
    device = next(model.parameters()).device
    contents, styles = [], []
    for batch in windows.split(batch_size):
        content, style, _ = model.encode_full(batch.to(device))  # (b, N, E), (b, N, S)
        contents.append(content.mean(dim=1).cpu())
        styles.append(style.mean(dim=1).cpu())
    return torch.cat(contents), torch.cat(styles)


def volume_windows(model: MeduetModel, latent: np.ndarray, scale: float, affine: np.ndarray,
                   batch_size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Per-window factors of a whole ``(C, d, h, w)`` latent and the windows' world boxes.

    Returns:
        ``content (n, E)``, ``style (n, S)`` and ``boxes (n, 2, 3)`` (RAS mm, low and high corner).
    """
    x = torch.from_numpy(np.array(latent, dtype=np.float32)) * scale
    window = model.config.input_size
    content, style = window_factors(model, sliding_windows(x, window), batch_size)  # (n, E), (n, S)
    boxes = world_boxes(window_origins(tuple(x.shape[1:]), window), window, affine)
    return content, style, boxes


def pooled_factors(model: MeduetModel, latent: np.ndarray, scale: float,
                   batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The content ``(E,)`` and style ``(S,)`` vectors of a whole ``(C, d, h, w)`` latent: means over its
    windows, as ``extract-factors`` pools a volume's windows."""
    x = torch.from_numpy(np.array(latent, dtype=np.float32)) * scale
    content, style = window_factors(model, sliding_windows(x, model.config.input_size), batch_size)  # (n, E), (n, S)
    return content.mean(dim=0).numpy(), style.mean(dim=0).numpy()


def pooled_content(model: MeduetModel, latent: np.ndarray, scale: float, batch_size: int = 16) -> np.ndarray:
    """The content vector ``(E,)`` of a whole ``(C, d, h, w)`` latent: the mean over its windows."""
    return pooled_factors(model, latent, scale, batch_size)[0]
