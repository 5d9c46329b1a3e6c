"""Stage ``extract-factors``: one content and one style vector per cached latent.

Inputs: the pretrained model ``paths.models/pretrain/meduet.pt`` and the latent cache
(``paths.latents``). Each latent is scaled by the cache's scale factor (as in training),
cut into windows of the model's input size (stride = window, the last window of an axis
aligned to the end; a latent smaller than the window is zero-padded, centred, as the
training crops are), encoded with ``MeduetModel.encode_full``, and its factor tokens
averaged over tokens and then over windows: content ``(E,)``, style ``(S,)``.

Outputs: ``paths.factors/``: ``factors.npz`` (``keys``, ``content (n, E)``, ``style (n, S)``,
``domain_index (n,)``, ``split (n,)``), ``manifest.csv`` (one row per latent) and
``manifest.json`` (model, weights, sites, widths); ``paths.reports/extract_factors/metrics.json``.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from meduet.config import ExtractFactorsConfig, Paths
from meduet.data.latents import MANIFEST, load_latent, read_manifest, read_scale
from meduet.io.atomic import atomic_path, write_json
from meduet.io.manifest import read_rows, write_rows
from meduet.models.meduet import MeduetConfig, MeduetModel
from meduet.stages import StageError, StageResult

log = logging.getLogger(__name__)

FACTORS = "factors.npz"
FACTOR_MANIFEST = "manifest.csv"
FACTOR_META = "manifest.json"
CHECKPOINT_KEYS = ("student", "teacher", "model_config", "domains", "scale_factor")


class FactorRecord(BaseModel):
    """One row of ``factors.npz`` and where it came from."""

    model_config = ConfigDict(extra="forbid")

    key: str
    row: int  # index into the arrays of factors.npz
    domain: str
    domain_index: int
    split: str
    latent: str  # relative to the latent cache
    latent_shape: list[int]  # (C, d, h, w)
    windows: int  # sliding windows averaged


# --------------------------------------------------------------------------- model
def checkpoint_path(paths: Paths) -> Path:
    return paths.models / "pretrain" / "meduet.pt"


def load_pretrained(path: Path, weights: str = "teacher") -> tuple[MeduetModel, dict]:
    """The pretrained network (in eval mode) and the checkpoint's other entries.

    Args:
        path: a ``meduet.pt`` written by the ``pretrain`` stage.
        weights: ``"teacher"`` (EMA) or ``"student"``.
    """
    if not path.is_file():
        raise StageError(f"{path}: no pretrained model; run the pretrain stage first")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in CHECKPOINT_KEYS if k not in saved]
    if missing:
        raise StageError(f"{path}: not a pretrain checkpoint, missing {missing}")
    if weights not in ("teacher", "student"):
        raise ValueError(f"weights must be 'teacher' or 'student', got {weights!r}")
    config = MeduetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["model_config"].items()})
    model = MeduetModel(config)
    try:
        model.load_state_dict(saved[weights])
    except RuntimeError as error:
        raise StageError(f"{path}: {weights} weights do not fit the saved model_config: {error}") from None
    meta = {k: v for k, v in saved.items() if k not in ("student", "teacher")}
    return model.eval(), meta


# --------------------------------------------------------------------------- windows
def window_starts(size: int, window: int) -> list[int]:
    """Window origins along one axis: stride ``window``, the last one aligned to the end.

    ``size`` must be at least ``window`` (pad first).
    """
    if size < window:
        raise ValueError(f"axis of size {size} is smaller than the window {window}")
    starts = list(range(0, size - window + 1, window))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def pad_to_window(latent: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad ``(C, d, h, w)`` (centred) so that every spatial axis is at least ``window``."""
    pad = [max(0, n - s) for n, s in zip(window, latent.shape[1:], strict=True)]
    if not any(pad):
        return latent
    # F.pad takes the last axis first: (w_lo, w_hi, h_lo, h_hi, d_lo, d_hi)
    return torch.nn.functional.pad(latent, [p for n in reversed(pad) for p in (n // 2, n - n // 2)])


def sliding_windows(latent: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """All windows of a ``(C, d, h, w)`` latent: ``(n_windows, C, *window)``."""
    latent = pad_to_window(latent, window)
    starts = [window_starts(n, k) for n, k in zip(latent.shape[1:], window, strict=True)]
    wd, wh, ww = window
    return torch.stack([latent[:, i:i + wd, j:j + wh, k:k + ww] for i, j, k in itertools.product(*starts)])


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


# --------------------------------------------------------------------------- stored factors
def save_factors(folder: Path, records: list[FactorRecord], content: np.ndarray, style: np.ndarray,
                 meta: dict) -> dict[str, Path]:
    with atomic_path(folder / FACTORS) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, keys=np.array([r.key for r in records]), content=content.astype(np.float32),
                 style=style.astype(np.float32), domain_index=np.array([r.domain_index for r in records]),
                 split=np.array([r.split for r in records]))
    return {"factors": folder / FACTORS, "manifest": write_rows(folder / FACTOR_MANIFEST, records),
            "meta": write_json(folder / FACTOR_META, meta)}


def load_factors(folder: Path) -> tuple[dict[str, np.ndarray], list[FactorRecord]]:
    """The arrays of ``factors.npz`` and the manifest rows in row order."""
    if not (folder / FACTORS).is_file():
        raise StageError(f"{folder / FACTORS}: no factors; run the extract-factors stage first")
    with np.load(folder / FACTORS, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return arrays, sorted(read_rows(folder / FACTOR_MANIFEST, FactorRecord), key=lambda r: r.row)


def run(cfg: ExtractFactorsConfig, paths: Paths) -> StageResult:
    """Encode every cached latent into one content and one style vector."""
    if not (paths.latents / MANIFEST).is_file():
        raise StageError(f"{paths.latents / MANIFEST}: no latent cache; run the encode-latents stage first")
    torch.manual_seed(0)  # nothing is random at eval time; fixed anyway for bit-stable outputs
    model, meta = load_pretrained(checkpoint_path(paths), cfg.weights)
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
        records.append(FactorRecord(key=record.key, row=row, domain=record.domain, domain_index=record.domain_index,
                                    split=record.split, latent=record.latent, latent_shape=record.latent_shape,
                                    windows=windows))
    ckpt = checkpoint_path(paths)
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
