"""Stage ``extract-factors``: one content and one style vector per cached latent.

Inputs: the pretrained model ``paths.models/pretrain/meduet.pt`` and the latent cache
(``paths.latents``). Each latent is scaled by the cache's scale factor (as in training),
cut into windows of the model's input size (stride = window, the last window of an axis
aligned to the end; a latent smaller than the window is zero-padded, centred, as the
training crops are), encoded with ``MeduetModel.encode_full``, and its factor tokens
averaged over tokens and then over windows: content ``(E,)``, style ``(S,)``.

Outputs: the factor store ``paths.factors/`` (``factors.npz``, ``manifest.csv``,
``manifest.json``; format in ``meduet.artifacts.factors``) and
``paths.reports/extract_factors/metrics.json`` (volumes, widths, windows per volume, per site).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch

from meduet.artifacts.factors import FactorRecord, save_factors
from meduet.artifacts.pretrained import load_meduet, meduet_path
from meduet.config import ExtractFactorsConfig, Paths
from meduet.data.latents import MANIFEST, load_latent, read_manifest, read_scale
from meduet.data.windows import sliding_windows
from meduet.io.atomic import write_json
from meduet.models.meduet import MeduetModel
from meduet.stages import StageError, StageResult

log = logging.getLogger(__name__)


@torch.no_grad()
def window_factors(model: MeduetModel, windows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-averaged factors of each window.

    Args:
        windows: ``(n, C, d, h, w)`` scaled latents of the model's input size.

    Returns:
        ``content (n, E)``, ``style (n, S)``.
    """
    contents, styles = [], []
    for batch in windows.split(batch_size):
        content, style, _ = model.encode_full(batch)  # (b, N, E), (b, N, S)
        contents.append(content.mean(dim=1))
        styles.append(style.mean(dim=1))
    return torch.cat(contents), torch.cat(styles)


def volume_factors(model: MeduetModel, latent: np.ndarray, scale: float,
                   batch_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Content ``(E,)`` and style ``(S,)`` of a whole ``(C, d, h, w)`` latent, and its window count."""
    x = torch.from_numpy(np.array(latent, dtype=np.float32)) * scale
    windows = sliding_windows(x, model.config.input_size)  # (n, C, *input_size)
    content, style = window_factors(model, windows, batch_size)
    return content.mean(0).numpy(), style.mean(0).numpy(), len(windows)


def run(cfg: ExtractFactorsConfig, paths: Paths) -> StageResult:
    """Encode every cached latent into one content and one style vector."""
    if not (paths.latents / MANIFEST).is_file():
        raise StageError(f"{paths.latents / MANIFEST}: no latent cache; run the encode-latents stage first")
    torch.manual_seed(0)  # nothing is random at eval time; fixed anyway for bit-stable outputs
    model, meta = load_meduet(meduet_path(paths), cfg.weights)
    latents = sorted(read_manifest(paths.latents), key=lambda r: r.key)
    if not latents:
        raise StageError(f"{paths.latents / MANIFEST}: empty latent cache")
    scale = read_scale(paths.latents)
    domains = list(meta["domains"])
    if abs(scale - float(meta["scale_factor"])) > 1e-6 * abs(scale):
        log.warning("latent scale %.6g differs from the one the model was trained with (%.6g)",
                    scale, meta["scale_factor"])

    records, contents, styles = [], [], []
    for row, record in enumerate(latents):
        if record.domain_index >= len(domains) or domains[record.domain_index] != record.domain:
            raise StageError(f"{record.key}: site {record.domain!r} (index {record.domain_index}) is not the "
                             f"model's site {record.domain_index} of {domains}")
        content, style, windows = volume_factors(model, load_latent(paths.latents, record), scale, cfg.batch_size)
        contents.append(content)
        styles.append(style)
        records.append(FactorRecord(key=record.key, dataset=record.dataset, case_id=record.case_id,
                                    domain=record.domain, body_part=record.body_part, row=row,
                                    domain_index=record.domain_index, split=record.split, latent=record.latent,
                                    latent_shape=record.latent_shape, windows=windows))
    ckpt = meduet_path(paths)
    info = {"model": str(ckpt.relative_to(paths.root)) if ckpt.is_relative_to(paths.root) else str(ckpt),
            "model_sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(), "weights": cfg.weights,
            "domains": domains, "scale_factor": scale, "window": list(model.config.input_size),
            "content_dim": model.config.embed_dim, "style_dim": model.config.style_dim, "volumes": len(records)}
    outputs = save_factors(paths.factors, records, np.stack(contents), np.stack(styles), info)

    metrics = {"volumes": len(records), "content_dim": info["content_dim"], "style_dim": info["style_dim"],
               "windows_per_volume": float(np.mean([r.windows for r in records])), "weights": cfg.weights,
               "per_site": {d: sum(r.domain == d for r in records) for d in domains}}
    outputs["metrics"] = write_json(paths.reports / "extract_factors" / "metrics.json", metrics)
    log.info("extract-factors: %d volumes, E=%d, S=%d", len(records), info["content_dim"], info["style_dim"])
    return StageResult("extract-factors", outputs, metrics)
