"""Stage ``evaluate-disentanglement``: how much site information each factor carries, judged honestly.

Inputs: ``paths.factors`` (stage ``extract-factors``: per-window factors of every weights
set), the latent cache, the pretrained model, and for PSNR the VAE and harmonized images.

For every weights set (EMA teacher, student: the adversary trains against the student):

1. Site probes (``meduet.engine.probes``): cross-validated linear probes from content and
   from style, each with its permutation null (mean, 95th percentile, p-value). Content is
   site-free when its accuracy is not above the null's 95th percentile, not when it is near
   ``1/K``. The same probe on each latent's per-channel mean and std shows the site signal of
   the input itself.
2. Region-matched probes: volume factors averaged only over windows inside the physical box
   every volume covers, so field of view and coverage (geometry) cannot count as site.
3. Cross-site subject retrieval (``meduet.evaluation.retrieval``) where the same subjects
   are scanned at several sites: content should find the subject, style should not.

For the primary weights also: the windows curve (probe accuracy against windows averaged
per volume), the swap test (``meduet.evaluation.swap``) and the counterfactual swap
against the real scan of the same subject at the other site
(``meduet.evaluation.counterfactual``).

Outputs under ``paths.reports/evaluate_disentanglement/``: ``metrics.json`` (with
``goals``: the issue's targets, met or not), ``factors.png`` (PCA by site),
``windows_curve.png`` and ``retrieval.png`` (similarity matrices).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch

from meduet.artifacts.factors import FactorRecord, load_factors
from meduet.artifacts.pretrained import load_meduet, meduet_path
from meduet.artifacts.vae import load_vae, vae_path
from meduet.config import EvaluateDisentanglementConfig, Paths
from meduet.data.latents import LatentRecord, load_latent, read_manifest, read_scale
from meduet.data.windows import sliding_windows
from meduet.engine.probes import fit_probe, pca_2d, site_probe
from meduet.engine.progress import Progress
from meduet.evaluation.counterfactual import Scan, counterfactual_test
from meduet.evaluation.identifiability import covered_region, inside, volume_box, volume_means, windows_curve
from meduet.evaluation.retrieval import cross_site_retrieval, plot_retrieval, subject_ids
from meduet.evaluation.swap import swap_test, swapped_factors
from meduet.harmonize.manifest import harmonized_range
from meduet.harmonize.manifest import read_manifest as read_harmonized
from meduet.io.atomic import write_json
from meduet.io.figures import plt, save_figure
from meduet.stages import StageError, StageResult

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- figures
def plot_factors(content: np.ndarray, style: np.ndarray, y: np.ndarray, domains: list[str], target: Path,
                 probes: dict[str, dict]) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, name, x in ((axes[0], "content", content), (axes[1], "style", style)):
        scores = pca_2d(x)
        for k, domain in enumerate(domains):
            ax.scatter(*scores[y == k].T, s=18, label=domain)
        acc = probes[name]
        null = f", null p95 {acc['null_p95']:.2f}" if "null_p95" in acc else ""
        ax.set_title(f"{name}: probe acc {acc['accuracy_mean']:.2f} ± {acc['accuracy_std']:.2f}{null}"
                     if "accuracy_mean" in acc else f"{name}: no probe ({acc.get('skipped', '')})", fontsize=8)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    axes[1].legend(fontsize=7)
    fig.suptitle("factor PCA by site", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, target)


def plot_curve(curves: dict[str, list[dict]], target: Path) -> Path:
    """Probe accuracy against windows averaged per volume, with each point's null 95th percentile."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for (name, points), color in zip(curves.items(), ("tab:blue", "tab:orange")):
        k = [p["windows"] for p in points]
        ax.errorbar(k, [p["accuracy_mean"] for p in points], yerr=[p["accuracy_sd_over_draws"] for p in points],
                    marker="o", color=color, label=f"{name} → site", capsize=3)
        if all("null_p95" in p for p in points):
            ax.plot(k, [p["null_p95"] for p in points], ls="--", color=color, alpha=0.6,
                    label=f"{name}: permutation null p95")
    if not any(curves.values()):
        ax.text(0.5, 0.5, "no probes: too few volumes per site", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("windows averaged per volume (last point: all)")
    ax.set_ylabel("site probe accuracy (cross-validated)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, target)


# --------------------------------------------------------------------------- inputs
def _latent_records(paths: Paths, records: list[FactorRecord]) -> list[LatentRecord]:
    latents = {r.key: r for r in read_manifest(paths.latents)}
    missing = [r.key for r in records if r.key not in latents]
    if missing:
        raise StageError(f"{paths.latents}: factors of latents no longer in the cache: {missing[:5]}")
    return [latents[r.key] for r in records]


def _scaled_latents(paths: Paths, records: list[LatentRecord]) -> list[torch.Tensor]:
    """Each volume's latent ``(C, D, H, W)`` from the cache, times the cache's scale factor."""
    scale = read_scale(paths.latents)
    return [torch.from_numpy(np.array(load_latent(paths.latents, r), dtype=np.float32)) * scale for r in records]


def _harmonized_images(paths: Paths) -> tuple[dict[str, Path], tuple[float, float] | None]:
    """Case key → harmonized image for the cases harmonization finished, and the ``(b_min, b_max)`` they share
    (None without any)."""
    manifest = paths.harmonized / "manifest.csv"
    done = [r for r in read_harmonized(manifest) if r.status == "ok" and r.image] if manifest.is_file() else []
    if not done:
        return {}, None
    return ({r.key: paths.harmonized / r.image for r in done},
            harmonized_range({r.key: r.window for r in done}, manifest))


def latent_statistics(latents: list[torch.Tensor]) -> np.ndarray:
    """Per-channel mean and standard deviation of each latent: ``(n, 2 C)``."""
    return np.stack([torch.cat([z.flatten(1).mean(1), z.flatten(1).std(1)]).double().numpy() for z in latents])


# --------------------------------------------------------------------------- measurements
def factor_report(arrays: dict[str, np.ndarray], weights: str, y: np.ndarray, subjects: list[str | None],
                  region_windows: np.ndarray, cfg: EvaluateDisentanglementConfig) -> dict:
    """Probes (all windows and region-matched) and retrieval of one weights set's factors."""
    probe = {"folds": cfg.folds, "l2": cfg.l2, "max_iter": cfg.max_iter, "permutations": cfg.permutations,
             "seed": cfg.seed, "jobs": cfg.jobs}
    report: dict = {}
    too_few = _too_few_for_probes(y)
    for factor in ("content", "style"):
        x = arrays[f"{weights}_{factor}"].astype(np.float64)
        report[factor] = {"skipped": too_few} if too_few else site_probe(x, y, **probe)
        matched, counts = volume_means(arrays[f"{weights}_window_{factor}"].astype(np.float64),
                                       arrays["window_volume"], len(y), region_windows)
        if too_few:
            report[f"region_{factor}"] = {"skipped": too_few}
        elif (counts == 0).any():
            report[f"region_{factor}"] = {"skipped": f"{int((counts == 0).sum())} volumes have no window inside "
                                                     "the region every volume covers"}
        else:
            report[f"region_{factor}"] = site_probe(matched, y, **probe)
        report[f"retrieval_{factor}"] = cross_site_retrieval(x, y, subjects)
    return report


def _too_few_for_probes(y: np.ndarray) -> str:
    """Why cross-validated site probes cannot run on labels ``y`` ('' when they can)."""
    counts = np.bincount(y)
    counts = counts[counts > 0]
    if counts.min() < 2:
        return f"cross-validated probes need 2 volumes of every site, got {counts.tolist()}"
    return ""


def _region(arrays: dict[str, np.ndarray], latents: list[LatentRecord]) -> tuple[np.ndarray, dict]:
    """Windows inside the box every volume covers (grown by half a latent voxel), and a summary."""
    affines = [np.array(r.affine).reshape(4, 4) for r in latents]
    region = covered_region([volume_box(r.latent_shape, a) for r, a in zip(latents, affines)])
    tolerance = 0.5 * float(np.abs(np.diag(affines[0])[:3]).max())
    keep = inside(arrays["window_box_mm"], region, tolerance)
    per_volume = np.bincount(arrays["window_volume"][keep], minlength=len(latents))
    return keep, {"box_mm": region.tolist(), "tolerance_mm": tolerance, "windows_kept": int(keep.sum()),
                  "windows_total": len(keep), "min_windows_per_volume": int(per_volume.min())}


def _counterfactual(cfg: EvaluateDisentanglementConfig, paths: Paths, model: torch.nn.Module,
                    latents: list[LatentRecord], scaled: list[torch.Tensor], subjects: list[str | None]) -> dict:
    images, value_range = _harmonized_images(paths) if cfg.counterfactual_decode else ({}, None)
    scans = [Scan(key=r.key, site=r.domain_index, subject=s, latent=z, affine=np.array(r.affine).reshape(4, 4),
                  image=images.get(r.key)) for r, z, s in zip(latents, scaled, subjects)]
    vae = load_vae(vae_path(paths))[0].eval() if value_range is not None and vae_path(paths).is_file() else None
    return counterfactual_test(model, scans, pairs=cfg.counterfactual_pairs, batch_size=cfg.batch_size,
                               seed=cfg.seed, vae=vae, decode_pairs=cfg.counterfactual_decode,
                               scale=read_scale(paths.latents), max_voxels=cfg.max_voxels_per_split,
                               value_range=value_range)


def goals(metrics: dict) -> dict:
    """The targets of the disentanglement issue, met or not (None: not measured)."""
    def check(value: float | None, ok: bool | None) -> dict:
        return {"value": value, "met": ok}

    probes = metrics["probes"]
    region = probes.get("region_content", {})
    retrieval_c, retrieval_s = probes.get("retrieval_content", {}), probes.get("retrieval_style", {})
    counterfactual = metrics.get("counterfactual", {})
    style = metrics["style_accuracy"]
    return {
        "region_content_not_above_null_p95": check(
            region.get("accuracy_mean"), None if "null_p95" not in region else not region["above_null_p95"]),
        "style_accuracy_at_least_0.95": check(style, None if style is None else style >= 0.95),
        "retrieval_content_top1_at_least_0.90": check(
            retrieval_c.get("top1"), None if "top1" not in retrieval_c else retrieval_c["top1"] >= 0.90),
        "retrieval_style_top1_at_most_chance_plus_0.10": check(
            retrieval_s.get("top1"),
            None if "top1" not in retrieval_s else retrieval_s["top1"] <= retrieval_s["chance"] + 0.10),
        "counterfactual_closer_than_a_at_least_0.80": check(
            counterfactual.get("swap_closer_than_a"),
            None if "swap_closer_than_a" not in counterfactual else counterfactual["swap_closer_than_a"] >= 0.80),
    }


# --------------------------------------------------------------------------- stage
class _PartProgress:
    """The stage's parts as progress lines (``evaluate-disentanglement: 2/6 parts (33%), …``)."""

    def __init__(self, parts: int) -> None:
        self.done, self._progress = 0, Progress("evaluate-disentanglement", parts, unit="parts", every_fraction=0.0)

    def finished(self, part: str) -> None:
        self.done += 1
        log.info("evaluate-disentanglement: %s done", part)
        self._progress.update(self.done)

    def end(self) -> None:
        """Parts skipped (a model that decodes normalised patches) count as done."""
        if self.done < self._progress.total:
            self.done = self._progress.total
            self._progress.update(self.done)


def run(cfg: EvaluateDisentanglementConfig, paths: Paths) -> StageResult:
    """Probe the factors for site information, retrieve subjects across sites and run the swap tests."""
    arrays, records, meta = load_factors(paths.factors)
    domains, primary = list(meta["domains"]), meta["weights"]
    all_weights = list(meta.get("all_weights", [primary]))
    y = arrays["domain_index"].astype(np.int64)
    if len(set(y.tolist())) < 2:
        raise StageError(f"{paths.factors}: probes need volumes of at least 2 sites, found {sorted(set(y.tolist()))}")
    if "window_volume" not in arrays:
        raise StageError(f"{paths.factors}: no per-window factors (written by an older extract-factors); rerun it")

    latent_records = _latent_records(paths, records)
    latents = _scaled_latents(paths, latent_records)
    subjects = subject_ids([r.case_id for r in records], cfg.subject_pattern)
    region_windows, region = _region(arrays, latent_records)
    too_few = _too_few_for_probes(y)
    # A line after each part (probes per weights, the input baseline, two window curves, the swap
    # and counterfactual tests): the stage runs minutes with permutation nulls and decodes.
    swap_part, counterfactual_part = cfg.swap_pairs > 0 and not too_few, cfg.counterfactual_pairs > 0
    progress = _PartProgress(len(all_weights) + 3 + int(swap_part) + int(counterfactual_part))
    per_weights = {}
    for weights in all_weights:
        per_weights[weights] = factor_report(arrays, weights, y, subjects, region_windows, cfg)
        progress.finished(f"site probes and retrieval of the {weights} factors")
    probes = dict(per_weights[primary])
    probes["latent_statistics"] = {"skipped": too_few} if too_few else site_probe(
        latent_statistics(latents), y, folds=cfg.folds, l2=cfg.l2, max_iter=cfg.max_iter,
        permutations=cfg.permutations, seed=cfg.seed, jobs=cfg.jobs)
    progress.finished("site probe of the latents' mean and std (input baseline)")
    curve_probe = {"folds": cfg.folds, "l2": cfg.l2, "max_iter": cfg.max_iter, "jobs": cfg.jobs}
    curves = {}
    for factor in ("content", "style"):
        curves[factor] = [] if too_few else windows_curve(
            arrays[f"{primary}_window_{factor}"].astype(np.float64), arrays["window_volume"], y, cfg.window_counts,
            draws=cfg.curve_draws, permutations=cfg.curve_permutations, probe=curve_probe, seed=cfg.seed)
        progress.finished(f"probe accuracy against windows averaged ({factor})")

    metrics: dict = {
        "volumes": len(y), "sites": domains, "chance": 1.0 / len(domains),
        "majority": float(np.bincount(y).max() / len(y)), "weights": primary, "probes": probes,
        "by_weights": per_weights, "region": region, "windows_curve": curves,
        "subjects_at_several_sites": len({s for s in subjects if s is not None and
                                          len({d for d, t in zip(y, subjects) if t == s}) > 1}),
        "content_accuracy": probes["content"].get("accuracy_mean"), "content_ci95": probes["content"].get("ci95"),
        "style_accuracy": probes["style"].get("accuracy_mean"), "style_ci95": probes["style"].get("ci95"),
        "content_null_p95": probes["content"].get("null_p95"), "content_p_value": probes["content"].get("p_value"),
        "region_content_accuracy": probes["region_content"].get("accuracy_mean"),
        "region_content_ci95": probes["region_content"].get("ci95"),
        "region_content_null_p95": probes["region_content"].get("null_p95"),
        "latent_statistics_accuracy": probes["latent_statistics"].get("accuracy_mean"),
        "retrieval_content_top1": probes["retrieval_content"].get("top1"),
        "retrieval_content_ci95": probes["retrieval_content"].get("ci95"),
        "retrieval_style_top1": probes["retrieval_style"].get("top1"),
        "retrieval_chance": probes["retrieval_content"].get("chance"),
    }

    model = None
    if cfg.swap_pairs > 0 or cfg.counterfactual_pairs > 0:
        torch.manual_seed(cfg.seed)
        model, _ = load_meduet(meduet_path(paths), primary)
        if model.config.norm_pix_loss:
            model = None
            metrics["swap"] = {"skipped": "norm_pix_loss: decoded patches are normalised, not latents"}
    if too_few:
        metrics["skipped"] = too_few
    if model is not None and cfg.swap_pairs > 0 and not too_few:
        style_probe = fit_probe(arrays["style"].astype(np.float64), y, cfg.l2, cfg.max_iter)
        windows = [sliding_windows(z, model.config.input_size) for z in latents]
        swap = functools.partial(swapped_factors, model, batch_size=cfg.batch_size, seed=cfg.seed)
        metrics["swap"] = swap_test(swap, windows, arrays["content"], y, style_probe, cfg.swap_pairs, cfg.seed)
        metrics["swap_accuracy"] = metrics["swap"]["style_closer_to_b_roundtrip"]
        progress.finished("swap test")
    if model is not None and cfg.counterfactual_pairs > 0:
        metrics["counterfactual"] = _counterfactual(cfg, paths, model, latent_records, latents, subjects)
        metrics["counterfactual_closer_than_a"] = metrics["counterfactual"].get("swap_closer_than_a")
        metrics["counterfactual_closer_than_a_ci95"] = metrics["counterfactual"].get("swap_closer_than_a_ci95")
        metrics["counterfactual_closer_than_roundtrip"] = metrics["counterfactual"].get("swap_closer_than_roundtrip")
        progress.finished("counterfactual against the real scans")
    progress.end()
    metrics["goals"] = goals(metrics)

    reports = paths.reports / "evaluate_disentanglement"
    outputs = {
        "metrics": write_json(reports / "metrics.json", metrics),
        "plot": plot_factors(arrays["content"], arrays["style"], y, domains, reports / "factors.png", probes),
        "curve": plot_curve(curves, reports / "windows_curve.png"),
        "retrieval": plot_retrieval({"content": arrays["content"], "style": arrays["style"]},
                                    [records[i].domain for i in range(len(records))], subjects,
                                    {"content": probes["retrieval_content"], "style": probes["retrieval_style"]},
                                    reports / "retrieval.png"),
    }
    log.info("evaluate-disentanglement: site probe content %s (null p95 %s), region-matched %s, style %s; "
             "retrieval content %s style %s (chance %s); counterfactual closer than s@A %s",
             metrics["content_accuracy"], metrics["content_null_p95"], metrics["region_content_accuracy"],
             metrics["style_accuracy"], metrics["retrieval_content_top1"], metrics["retrieval_style_top1"],
             metrics["retrieval_chance"], metrics.get("counterfactual_closer_than_a"))
    return StageResult("evaluate-disentanglement", outputs, metrics)
