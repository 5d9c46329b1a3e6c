"""Stage ``evaluate-disentanglement``: how much site information each factor carries.

Inputs: ``paths.factors`` (stage ``extract-factors``), and for the swap test the pretrained
model and the latent cache.

1. Linear probes: stratified k-fold cross-validated multinomial logistic regression
   (standardised features, L2 penalty, L-BFGS) predicting the site from content and from
   style. Disentangled factors give style ≫ chance and content ≈ chance ``1/K``. The same
   probe on each latent's per-channel mean and standard deviation (``latent_statistics``)
   shows how much site signal the input itself carries.
2. Swap test: for pairs ``(A, B)`` of volumes from different sites, every window of ``A``
   is encoded, its content tokens entangled with the style tokens of a window of ``B``,
   decoded the way training decodes (``MeduetModel.reconstruct``: every position predicted
   while hidden) and unpatchified to a latent, and that latent re-encoded. The decode and
   re-encode round trip shifts the factors by itself, so the window-averaged re-encoded
   factors are compared with the same round trip of ``A`` alone and of ``B`` alone:
   ``style_closer_to_b_roundtrip`` (the headline ``swap_accuracy``) counts pairs whose style
   is nearer ``B``'s round trip than ``A``'s, ``content_closer_to_a_roundtrip`` the converse
   for content. The probe-based scores (style probe, fit on the extracted styles, names
   ``B``'s site; content stays closer to ``A``'s extracted content) are reported as well,
   with ``self_style_predicted_as_a`` (the probe on ``A``'s own round trip) as their sanity
   reference: near chance, the round trip has left the probe's domain.

Outputs: ``paths.reports/evaluate_disentanglement/metrics.json`` and ``factors.png``
(2-D PCA of content and of style, coloured by site).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from meduet.artifacts.factors import FactorRecord, load_factors
from meduet.artifacts.pretrained import load_meduet, meduet_path
from meduet.config import EvaluateDisentanglementConfig, Paths
from meduet.data.latents import load_latent, read_manifest, read_scale
from meduet.data.windows import sliding_windows
from meduet.engine.probes import LinearProbe, cross_validate, pca_2d
from meduet.io.atomic import write_json
from meduet.io.figures import plt, save_figure
from meduet.losses.mixing import random_mix_mask
from meduet.models.meduet import MeduetModel
from meduet.stages import StageError, StageResult

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- swap test
@torch.no_grad()
def swapped_factors(model: MeduetModel, windows_a: torch.Tensor, windows_b: torch.Tensor,
                    batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-encoded factors of ``A``'s content rendered with ``B``'s style, averaged over ``A``'s windows.

    Args:
        windows_a: ``(n_a, C, d, h, w)`` scaled windows of ``A``; window ``i`` takes its style from
            window ``i mod n_b`` of ``windows_b (n_b, C, d, h, w)``.
        seed: draws the decoder's hidden halves; the same seed gives ``A`` the same halves
            whichever style it is rendered with.

    Returns:
        content ``(E,)`` and style ``(S,)``.
    """
    partner = windows_b[torch.arange(len(windows_a)) % len(windows_b)]
    generator = torch.Generator().manual_seed(seed)
    contents, styles = [], []
    for xa, xb in zip(windows_a.split(batch_size), partner.split(batch_size), strict=True):
        content_a, _, cls_a = model.encode_full(xa)  # (b, N, E), _, (b, 1, E)
        _, style_b, _ = model.encode_full(xb)  # (b, N, S)
        halves = random_mix_mask(len(xa), model.config.num_tokens, model.config.mask_ratio, generator=generator)
        latent = model.unpatchify(model.reconstruct(model.entangle(content_a, style_b), cls_a, halves))
        content, style, _ = model.encode_full(latent)  # (b, C, d, h, w) re-encoded
        contents.append(content.mean(1))
        styles.append(style.mean(1))
    return torch.cat(contents).mean(0).numpy(), torch.cat(styles).mean(0).numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _nearer(x: np.ndarray, target: np.ndarray, other: np.ndarray) -> int:
    return int(np.linalg.norm(x - target) < np.linalg.norm(x - other))


SwapFactors = Callable[[torch.Tensor, torch.Tensor], tuple[np.ndarray, np.ndarray]]


def swap_test(swap: SwapFactors, windows: list[torch.Tensor], content: np.ndarray, y: np.ndarray,
              style_probe: LinearProbe, content_probe: LinearProbe, pairs: int, seed: int) -> dict:
    """Swap content and style between volumes of different sites (see the module docstring).

    Args:
        swap: ``swap(windows_a, windows_b)`` -> re-encoded ``(content (E,), style (S,))`` of A's
            content rendered with B's style (``swapped_factors`` with the model); ``swap(a, a)``
            is A's round trip.
        windows: per volume, its ``(n_i, C, d, h, w)`` scaled windows.
        content: ``(n, E)`` extracted content vectors; y: ``(n,)`` site labels.
        style_probe, content_probe: probes fit on all volumes' style / content.
        pairs: number of random ``(A, B)`` pairs with different sites.
    """
    rng = np.random.default_rng(seed)
    candidates = [(a, b) for a in range(len(y)) for b in range(len(y)) if y[a] != y[b]]
    chosen = [candidates[i] for i in rng.choice(len(candidates), size=min(pairs, len(candidates)), replace=False)]
    roundtrips: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def roundtrip(v: int) -> tuple[np.ndarray, np.ndarray]:
        if v not in roundtrips:
            roundtrips[v] = swap(windows[v], windows[v])
        return roundtrips[v]

    rows = []
    for a, b in chosen:
        c_swap, s_swap = swap(windows[a], windows[b])
        (c_aa, s_aa), (c_bb, s_bb) = roundtrip(a), roundtrip(b)
        rows.append({
            "style_near_b": _nearer(s_swap, s_bb, s_aa), "content_near_a": _nearer(c_swap, c_aa, c_bb),
            "style_is_b": int(style_probe.predict(s_swap[None])[0] == y[b]),
            "content_is_a": int(content_probe.predict(c_swap[None])[0] == y[a]),
            "self_style_is_a": int(style_probe.predict(s_aa[None])[0] == y[a]),
            "cos_a": _cosine(c_swap, content[a]), "cos_b": _cosine(c_swap, content[b]),
        })
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return {"pairs": len(rows),
            "style_closer_to_b_roundtrip": mean["style_near_b"],
            "content_closer_to_a_roundtrip": mean["content_near_a"],
            "style_predicted_as_b": mean["style_is_b"],
            "content_predicted_as_a": mean["content_is_a"],
            "self_style_predicted_as_a": mean["self_style_is_a"],
            "content_cosine_to_a": mean["cos_a"], "content_cosine_to_b": mean["cos_b"],
            "content_closer_to_a": float(np.mean([r["cos_a"] > r["cos_b"] for r in rows]))}


# --------------------------------------------------------------------------- figure
def plot_factors(content: np.ndarray, style: np.ndarray, y: np.ndarray, domains: list[str], target: Path,
                 probes: dict[str, dict]) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, name, x in ((axes[0], "content", content), (axes[1], "style", style)):
        scores = pca_2d(x)
        for k, domain in enumerate(domains):
            ax.scatter(*scores[y == k].T, s=18, label=domain)
        acc = probes[name]
        ax.set_title(f"{name} (probe acc {acc['accuracy_mean']:.2f} ± {acc['accuracy_std']:.2f})", fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"factor PCA by site (chance 1/K = {1 / len(domains):.2f})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, target)


# --------------------------------------------------------------------------- stage
def _scaled_latents(paths: Paths, records: list[FactorRecord]) -> list[torch.Tensor]:
    """Each volume's latent ``(C, D, H, W)`` from the cache, times the cache's scale factor."""
    latents = {r.key: r for r in read_manifest(paths.latents)}
    scale = read_scale(paths.latents)
    missing = [r.key for r in records if r.key not in latents]
    if missing:
        raise StageError(f"{paths.latents}: factors of latents no longer in the cache: {missing[:5]}")
    return [torch.from_numpy(np.array(load_latent(paths.latents, latents[r.key]), dtype=np.float32)) * scale
            for r in records]


def latent_statistics(latents: list[torch.Tensor]) -> np.ndarray:
    """Per-channel mean and standard deviation of each latent: ``(n, 2 C)``."""
    return np.stack([torch.cat([z.flatten(1).mean(1), z.flatten(1).std(1)]).double().numpy() for z in latents])


def run(cfg: EvaluateDisentanglementConfig, paths: Paths) -> StageResult:
    """Probe the factors for site information and run the swap test."""
    arrays, records, meta = load_factors(paths.factors)
    domains = list(meta["domains"])
    y = arrays["domain_index"].astype(np.int64)
    content, style = arrays["content"].astype(np.float64), arrays["style"].astype(np.float64)
    present = sorted(set(y.tolist()))
    if len(present) < 2:
        raise StageError(f"{paths.factors}: probes need volumes of at least 2 sites, found {present}")

    num_classes = len(domains)
    latents = _scaled_latents(paths, records)
    probes = {name: cross_validate(x, y, num_classes, cfg.folds, cfg.l2, cfg.max_iter, cfg.seed)
              for name, x in (("content", content), ("style", style),
                              ("latent_statistics", latent_statistics(latents)))}
    metrics: dict = {"volumes": len(y), "sites": domains, "chance": 1.0 / len(domains),
                     "majority": float(np.bincount(y).max() / len(y)), "probes": probes,
                     "content_accuracy": probes["content"]["accuracy_mean"],
                     "style_accuracy": probes["style"]["accuracy_mean"],
                     "latent_statistics_accuracy": probes["latent_statistics"]["accuracy_mean"],
                     "weights": meta["weights"]}

    if cfg.swap_pairs > 0:
        torch.manual_seed(cfg.seed)
        model, _ = load_meduet(meduet_path(paths), meta["weights"])
        if model.config.norm_pix_loss:
            metrics["swap"] = {"skipped": "norm_pix_loss: decoded patches are normalised, not latents"}
        else:
            style_probe = LinearProbe.fit(style, y, num_classes, cfg.l2, cfg.max_iter)
            content_probe = LinearProbe.fit(content, y, num_classes, cfg.l2, cfg.max_iter)
            windows = [sliding_windows(z, model.config.input_size) for z in latents]
            swap = functools.partial(swapped_factors, model, batch_size=cfg.batch_size, seed=cfg.seed)
            metrics["swap"] = swap_test(swap, windows, content, y, style_probe, content_probe, cfg.swap_pairs,
                                        cfg.seed)
            metrics["swap_accuracy"] = metrics["swap"]["style_closer_to_b_roundtrip"]

    reports = paths.reports / "evaluate_disentanglement"
    outputs = {"metrics": write_json(reports / "metrics.json", metrics),
               "plot": plot_factors(content, style, y, domains, reports / "factors.png", probes)}
    log.info("evaluate-disentanglement: site probe accuracy content %.3f, style %.3f, latent statistics %.3f "
             "(chance %.3f); swap %s", metrics["content_accuracy"], metrics["style_accuracy"],
             metrics["latent_statistics_accuracy"], metrics["chance"], metrics.get("swap_accuracy", "skipped"))
    return StageResult("evaluate-disentanglement", outputs, metrics)
