"""Stage ``evaluate-synthesis``: synthesized images measured against real ones, on held-out subjects.

Inputs: the synthesis store (``paths.synthesis``, :mod:`meduet.artifacts.synthesis`), the frozen
synthesis evaluator (``models/evaluator/evaluator.pt``, stage ``train-evaluator``), the
harmonized images and labels, the latent cache (split, latents, scale) and the VAE.

1. Evaluator-space Fréchet distance (not an FID: the evaluator is this project's own network)
   of generated crops against the train split's real crops, per target site and overall,
   next to the floor: held-out real crops against the same reference, at the same sample size.
2. Diversity: mean 3-D MS-SSIM among generated crops of a site and among as many real crops.
3. Style accuracy: the evaluator's site head on each translation (mean over its body crops)
   and on each generated crop, against the target site.
4. Content preservation: the evaluator's segmentation of each translation of ``s@A`` against
   ``A``'s ground-truth labels (it lies on ``A``'s grid), next to ``A``'s VAE round trip and
   ``A`` itself; with ``synthesize.texture: site`` also next to ``A``'s round trip with the target
   site's texture drawn the same way (the reference rendered as the translation is).
5. Counterfactual truth: the translation of ``s@A`` into site ``B`` against the real ``s@B``
   resampled onto ``A``'s grid (where both have data): PSNR, SSIM, MAE in HU, against ``s@A``
   itself, ``s@A`` histogram-matched to a train-split volume of ``B`` and ``s@B``'s VAE round
   trip (the ceiling). A translation wins a pair when its MAE is below both non-ceiling baselines.
6. Per-organ median HU of translations per target site against the real volumes of that site.
7. Goals (the synthesis issue's), met or missed, with the numbers.

Every summary carries its 95 % interval: bootstrap percentiles over samples (pairs, volumes,
crops), Wilson intervals for shares. Outputs under ``paths.reports/evaluate_synthesis/``:
``metrics.json``, ``pairs.png`` (A | translation | real s@B | histogram-matched, middle
slices) and ``summary.png``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from meduet.artifacts.evaluator import evaluator_path, load_evaluator
from meduet.artifacts.synthesis import SYNTHESIS_MANIFEST, SynthesisRecord, read_synthesis
from meduet.artifacts.vae import load_vae, vae_path
from meduet.config import EvaluateSynthesisConfig, Paths, TrainEvaluatorConfig
from meduet.data.labelled import LabelledCase, label_classes, labelled_cases
from meduet.data.latents import load_latent, read_manifest, read_scale
from meduet.diffusion.texture import SiteTexture, add_texture
from meduet.engine.probes import proportion_ci
from meduet.engine.progress import Progress
from meduet.evaluation.counterfactual import ImageCache, resample_onto
from meduet.evaluation.retrieval import subject_ids
from meduet.evaluation.scoring import VolumeReader, organ_dice
from meduet.evaluation.synthesis import (
    bootstrap_interval,
    diversity,
    fd_against_floor,
    histogram_match,
    image_scores,
    organ_median_hu,
)
from meduet.harmonize.intensity import range_level
from meduet.harmonize.manifest import harmonized_range
from meduet.io.atomic import write_json
from meduet.io.figures import plt, save_figure
from meduet.stages import StageError, StageResult

log = logging.getLogger(__name__)

STAGE = "evaluate_synthesis"
BASELINES = ("a", "a_histmatch")  # what a translation must beat; "b_vae" is the ceiling
METHODS = ("translation", *BASELINES, "b_vae")


# --------------------------------------------------------------------------- inputs
class SynthesisInputs:
    """Everything the measurements read, each volume read or decoded once (benchmarks build it to score other sets)."""

    def __init__(self, cfg: EvaluateSynthesisConfig, paths: Paths) -> None:
        self.records, self.meta = read_synthesis(paths.synthesis)
        model, saved = load_evaluator(evaluator_path(paths))
        self.cases = {c.key: c for c in labelled_cases(paths.harmonized, paths.latents)}
        self.value_range = harmonized_range({key: c.window for key, c in self.cases.items()},
                                            paths.harmonized / "manifest.csv")  # (b_min, b_max)
        self.reader = VolumeReader.from_section(model, TrainEvaluatorConfig.model_validate(saved["config"]),
                                                self.value_range)
        self.sites, self.label_ids = list(saved["sites"]), [int(label) for label in saved["label_ids"]]
        self.subject = dict(zip(self.cases, subject_ids([c.case_id for c in self.cases.values()],
                                                        cfg.subject_pattern)))
        self.latents, self.scale = {r.key: r for r in read_manifest(paths.latents)}, read_scale(paths.latents)
        self.images = ImageCache(load_vae(vae_path(paths))[0], self.scale, cfg.max_voxels_per_split)
        self.paths = paths
        unknown = sorted({r.target_site for r in self.records} - set(self.sites))
        if unknown:
            raise StageError(f"{paths.synthesis / SYNTHESIS_MANIFEST}: target sites {unknown} are not among the "
                             f"evaluator's sites {self.sites}")

    def case(self, key: str) -> LabelledCase:
        if key not in self.cases:
            raise StageError(f"{self.paths.synthesis / SYNTHESIS_MANIFEST}: source {key!r} is not a labelled "
                             f"harmonized case in {self.paths.harmonized / 'manifest.csv'}")
        return self.cases[key]

    def image(self, path: Path) -> tuple[torch.Tensor, np.ndarray]:
        """``(1, D, H, W)`` intensities and voxel → RAS affine of a NIfTI (cached)."""
        if not path.is_file():
            raise StageError(f"{path}: image listed in the synthesis manifest is missing")
        return self.images.read(path)

    def classes(self, case: LabelledCase) -> torch.Tensor:
        """``case``'s ground truth as head classes ``(D, H, W)``."""
        return label_classes(self.images.read(case.label)[0][0], self.label_ids)

    def roundtrip(self, case: LabelledCase) -> torch.Tensor:
        """``case``'s latent decoded by the VAE: ``(1, D, H, W)`` (cached)."""
        latent = torch.from_numpy(np.array(load_latent(self.paths.latents, self.latents[case.key]), np.float32))
        image = self.images.decode(latent * self.scale, (case.key, "vae"))
        expected = tuple(self.images.read(case.image)[0].shape)
        if tuple(image.shape) != expected:
            raise StageError(f"{self.paths.latents / self.latents[case.key].latent}: decodes to {tuple(image.shape)}, "
                             f"not the harmonized {expected} of {case.key}")
        return image

    def textured_roundtrip(self, case: LabelledCase, record: SynthesisRecord) -> torch.Tensor | None:
        """``case``'s round trip with ``record``'s target site texture, drawn as ``synthesize`` draws it on the
        translation (same model, threshold and range; the record's seed): ``(1, D, H, W)``, or None without
        texture."""
        texture = (self.meta.get("site_textures") or {}).get(record.target_site)
        if texture is None:
            return None
        return add_texture(self.roundtrip(case)[0], SiteTexture(**texture),
                           threshold=range_level(self.meta["settings"]["body_threshold"], self.value_range),
                           value_range=tuple(self.meta["value_range"]),
                           generator=torch.Generator().manual_seed(record.seed))[None]


# --------------------------------------------------------------------------- translations
def _counterfactual(inputs: SynthesisInputs, cfg: EvaluateSynthesisConfig, record: SynthesisRecord,
                    case_a: LabelledCase, translation: torch.Tensor) -> dict | None:
    """Scores of the translation and its baselines against the real ``s@B`` on ``A``'s grid.

    None when there is no ``s@B``, no train volume of ``B`` of another subject to match histograms
    to, or no overlap.
    """
    same = [c for c in inputs.cases.values() if c.site == record.target_site and c.key != case_a.key
            and record.subject is not None and inputs.subject[c.key] == record.subject]
    # the histogram reference: a train volume of B of another subject, never s@B itself
    references = [c for c in inputs.cases.values() if c.site == record.target_site and c.split == "train"
                  and inputs.subject[c.key] != record.subject]
    if not same or not references:
        return None
    case_b = same[0]
    image_a, affine_a = inputs.images.read(case_a.image)
    image_b, affine_b = inputs.images.read(case_b.image)
    shape = tuple(image_a.shape[1:])
    resampled = resample_onto(image_b, affine_b, shape, affine_a)
    if resampled is None:
        return None
    target, box = resampled
    region = (slice(None), *box)
    reference = inputs.images.read(references[0].image)[0][0].numpy()
    matched = torch.from_numpy(histogram_match(image_a[0].numpy(), reference, levels=cfg.histogram_levels,
                                               points=cfg.match_points))[None]
    ceiling = resample_onto(inputs.roundtrip(case_b), affine_b, shape, affine_a)
    assert ceiling is not None and ceiling[1] == box  # same grid as s@B's image
    estimates = {"translation": translation[region], "a": image_a[region], "a_histmatch": matched[region],
                 "b_vae": ceiling[0]}
    scores = {name: image_scores(value, target, case_a.window, ssim_window=cfg.ssim_window)
              for name, value in estimates.items()}
    middle = (box[0].stop - box[0].start) // 2
    # What the style goal can be held to: the same reader on the real s@B and on its round trip
    # (whole volumes, as the translation is read) names B or not.
    read_as = {name: inputs.sites[int(inputs.reader.site(image).mean(0).argmax())]
               for name, image in (("b", image_b), ("b_vae", inputs.roundtrip(case_b)))}
    return {"b": case_b.key, "histogram_reference": references[0].key, "scores": scores, "read_as": read_as,
            "closer_than_baselines": all(scores["translation"]["mae_hu"] < scores[b]["mae_hu"] for b in BASELINES),
            "_slices": {name: value[0, middle].numpy() for name, value in estimates.items()} | {
                "target": target[0, middle].numpy()}}


def translation_rows(inputs: SynthesisInputs, cfg: EvaluateSynthesisConfig) -> list[dict]:
    """One row per translation: predicted site, organ Dice (and of ``A``, ``A``'s round trip), HU, counterfactual."""
    rows, own = [], {}
    translations = [r for r in inputs.records if r.kind == "translation"]
    progress = Progress(STAGE, len(translations), unit="translations", every_fraction=0.0)
    for record in translations:
        case_a = inputs.case(record.source_key)
        translation, _ = inputs.image(inputs.paths.synthesis / record.image)
        if translation.shape != inputs.images.read(case_a.image)[0].shape:
            raise StageError(f"{inputs.paths.synthesis / record.image}: shape {tuple(translation.shape[1:])} is not "
                             f"the grid of its source {case_a.key}")
        truth = inputs.classes(case_a)
        if case_a.key not in own:  # A itself and its round trip, once per source
            own[case_a.key] = {name: organ_dice(inputs.reader.organs(image), truth, len(inputs.label_ids))
                               for name, image in (("a", inputs.images.read(case_a.image)[0]),
                                                   ("a_vae", inputs.roundtrip(case_a)))}
        textured = inputs.textured_roundtrip(case_a, record)
        reference = {} if textured is None else {
            "a_vae_textured": organ_dice(inputs.reader.organs(textured), truth, len(inputs.label_ids))}
        probs = inputs.reader.site(translation).mean(0)
        rows.append({"key": record.key, "source": case_a.key, "target_site": record.target_site,
                     "predicted_site": inputs.sites[int(probs.argmax())],
                     "target_probability": float(probs[inputs.sites.index(record.target_site)]),
                     "dice": {"translation": organ_dice(inputs.reader.organs(translation), truth,
                                                        len(inputs.label_ids)), **own[case_a.key], **reference},
                     "median_hu": organ_median_hu(translation[0], truth, inputs.label_ids, case_a.window),
                     "counterfactual": _counterfactual(inputs, cfg, record, case_a, translation)})
        progress.update(len(rows))
    return rows


def _mean_ci(values: list[float] | np.ndarray, cfg: EvaluateSynthesisConfig) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "ci95": bootstrap_interval(np.mean, [values], resamples=cfg.bootstrap,
                                                                     seed=cfg.seed), "n": len(values)}


def content_summary(rows: list[dict], label_ids: list[int], cfg: EvaluateSynthesisConfig) -> dict:
    """Per-organ Dice of translations, ``A``'s round trips and ``A`` itself; the translation / round trip ratio
    (the goal's), and with texture also the ratio to the textured round trip."""
    names = ("translation", "a_vae", "a") + (("a_vae_textured",) if all("a_vae_textured" in r["dice"]
                                                                        for r in rows) else ())
    dice = {n: np.stack([r["dice"][n] for r in rows]) for n in names}  # (rows, L - 1), NaN: organ absent
    per_row = {n: np.nanmean(d, axis=1) for n, d in dice.items()}  # (rows,)

    def ratio(pairs: np.ndarray) -> float:
        return float(pairs[:, 0].mean() / pairs[:, 1].mean()) if pairs[:, 1].mean() > 0 else float("nan")

    ratios = {}
    for reference, key in (("a_vae", "ratio_to_roundtrip"), ("a_vae_textured", "ratio_to_textured_roundtrip")):
        if reference in names:
            paired = np.stack([per_row["translation"], per_row[reference]], axis=1)
            ratios |= {key: ratio(paired), f"{key}_ci95": bootstrap_interval(ratio, [paired], resamples=cfg.bootstrap,
                                                                              seed=cfg.seed)}
    return {**{n: _mean_ci(per_row[n], cfg) for n in names}, **ratios,
            "per_organ": {str(label): {n: float(np.nanmean(dice[n][:, i])) for n in names}
                          for i, label in enumerate(label_ids[1:]) if not np.isnan(dice["a"][:, i]).all()}}


def counterfactual_summary(rows: list[dict], cfg: EvaluateSynthesisConfig) -> dict:
    """Per-method mean PSNR / SSIM / MAE (HU) with intervals, the share of pairs the translation wins, and the
    share whose real ``s@B`` (and its VAE round trip) the evaluator reads as site B."""
    with_pairs = [r for r in rows if r["counterfactual"] is not None]
    pairs = [r["counterfactual"] for r in with_pairs]
    if not pairs:
        return {"skipped": "no translation has a real scan of its subject at the target site"}
    wins = sum(p["closer_than_baselines"] for p in pairs)
    summary: dict = {"pairs": len(pairs), "closer_than_baselines": wins / len(pairs),
                     "closer_than_baselines_ci95": proportion_ci(wins, len(pairs)),
                     "criterion": "MAE (HU) below s@A's and s@A histogram-matched to B's (the ceiling excepted)"}
    for name in ("b", "b_vae"):  # the style goal's reference: is the real s@B (its round trip) read as B?
        read = sum(p["read_as"][name] == row["target_site"] for p, row in zip(pairs, with_pairs))
        summary[f"{name}_read_as_target_site"] = read / len(pairs)
        summary[f"{name}_read_as_target_site_ci95"] = proportion_ci(read, len(pairs))
    for method in METHODS:
        summary[method] = {metric: _mean_ci([p["scores"][method][metric] for p in pairs], cfg)
                           for metric in ("psnr", "ssim", "mae_hu")
                           if all(p["scores"][method][metric] is not None for p in pairs)}
    return summary


def hu_summary(inputs: SynthesisInputs, rows: list[dict], cfg: EvaluateSynthesisConfig) -> dict:
    """Per target site and organ: median HU of translations against the real volumes of that site."""
    result: dict = {}
    for site in sorted({r["target_site"] for r in rows}):
        real = [organ_median_hu(inputs.images.read(c.image)[0][0], inputs.classes(c), inputs.label_ids, c.window)
                for c in inputs.cases.values() if c.site == site]
        made = [r["median_hu"] for r in rows if r["target_site"] == site]
        organs = sorted(set().union(*made) & set().union(*real))
        per_organ = {}
        for organ in organs:
            t = [m[organ] for m in made if organ in m]
            g = [m[organ] for m in real if organ in m]
            per_organ[str(organ)] = {"translated": _mean_ci(t, cfg), "real": _mean_ci(g, cfg),
                                     "difference": float(np.mean(t) - np.mean(g))}
        result[site] = {"per_organ": per_organ, "mean_abs_difference": float(np.mean(
            [abs(v["difference"]) for v in per_organ.values()])) if per_organ else None}
    return result


# --------------------------------------------------------------------------- generated crops
def crop_sets(inputs: SynthesisInputs, cfg: EvaluateSynthesisConfig) -> dict:
    """Generated crops and real body crops of the same size, by site (real ones by split too), and the
    held-out real crops' VAE round trips (the same crops of the decoded cached latent), by site."""
    generated = [r for r in inputs.records if r.kind == "generation"]
    gen: dict[str, list[torch.Tensor]] = defaultdict(list)
    for record in generated:
        gen[record.target_site].append(inputs.image(inputs.paths.synthesis / record.image)[0])
    size = tuple(generated[0].shape) if generated else inputs.reader.crop
    k = inputs.reader.model.config.downsample
    if any(s % k for s in size) or any(tuple(r.shape) != size for r in generated):
        raise StageError(f"{inputs.paths.synthesis / SYNTHESIS_MANIFEST}: generated crops must share one size "
                         f"divisible by {k}, got {sorted({tuple(r.shape) for r in generated})}")
    rng = np.random.default_rng(cfg.seed)
    real: dict[tuple[str, str], list[torch.Tensor]] = defaultdict(list)
    roundtrip: dict[str, list[torch.Tensor]] = defaultdict(list)
    for case in inputs.cases.values():
        image = inputs.images.read(case.image)[0]  # (1, D, H, W)
        if case.split == "held_out":  # the round trip as a second channel: cut where the real image is body
            image = torch.cat([image, inputs.roundtrip(case)])
        crops = inputs.reader.body(image, size)  # (n, 1 or 2, *size)
        pick = np.sort(rng.choice(len(crops), min(cfg.real_crops_per_volume, len(crops)), replace=False))
        real[case.site, case.split].extend(crops[pick, :1])
        roundtrip[case.site].extend(crops[pick, 1:] if case.split == "held_out" else [])
    return {"size": list(size), "generated": {s: torch.stack(v) for s, v in gen.items()},
            "real": {key: torch.stack(v) for key, v in real.items()},
            "roundtrip": {s: torch.stack(v) for s, v in roundtrip.items() if v}}


def generation_summary(inputs: SynthesisInputs, crops: dict, cfg: EvaluateSynthesisConfig) -> dict:
    """Fréchet distance against its floor, diversity and style accuracy of the generated crops."""
    generated, real = crops["generated"], crops["real"]
    if not generated:
        return {"skipped": "the store holds no generated crops"}
    feats = {site: inputs.reader.features(x) for site, x in generated.items()}
    real_feats = {key: inputs.reader.features(x) for key, x in real.items()}

    def real_of(site: str | None, split: str) -> np.ndarray:
        parts = [f for (s, sp), f in real_feats.items() if sp == split and site in (None, s)]
        return np.concatenate(parts) if parts else np.zeros((0, inputs.reader.model.config.feature_dim))

    fd = {site: fd_against_floor(feats[site], real_of(site, "train"), real_of(site, "held_out"),
                                 resamples=cfg.bootstrap, seed=cfg.seed) for site in sorted(feats)}
    fd["overall"] = fd_against_floor(np.concatenate(list(feats.values())), real_of(None, "train"),
                                     real_of(None, "held_out"), resamples=cfg.bootstrap, seed=cfg.seed)
    # What the VAE alone allows: a generator that made the held-out latents exactly would score this.
    trips = {site: inputs.reader.features(x) for site, x in crops["roundtrip"].items() if site in feats}
    ceiling = {site: fd_against_floor(trips[site], real_of(site, "train"), real_of(site, "held_out"),
                                      resamples=cfg.bootstrap, seed=cfg.seed) for site in sorted(trips)}
    if trips:
        ceiling["overall"] = fd_against_floor(np.concatenate(list(trips.values())), real_of(None, "train"),
                                              real_of(None, "held_out"), resamples=cfg.bootstrap, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    ms_ssim: dict = {}
    for site, x in sorted(generated.items()):
        pool = torch.cat([v for (s, _), v in real.items() if s == site])
        same_size = pool[np.sort(rng.choice(len(pool), min(len(x), len(pool)), replace=False))]
        try:
            ms_ssim[site] = {name: diversity(v, kernel_size=cfg.ms_ssim_kernel, scales=cfg.ms_ssim_scales,
                                             resamples=cfg.bootstrap, seed=cfg.seed, value_range=inputs.value_range)
                             for name, v in (("generated", x), ("real", same_size))}
        except ValueError as error:  # MONAI's check of kernel and scales against the crop size
            raise StageError(f"evaluate_synthesis.ms_ssim_kernel / ms_ssim_scales do not fit the {crops['size']} "
                             f"crops: {error}") from None
    correct = {site: int((inputs.reader.crops_site(x).argmax(1) == inputs.sites.index(site)).sum())
               for site, x in generated.items()}
    total = sum(len(x) for x in generated.values())
    return {"crop_size": crops["size"], "samples": {s: len(x) for s, x in sorted(generated.items())},
            "frechet_distance": fd, "frechet_distance_vae_roundtrip": ceiling, "ms_ssim": ms_ssim,
            "style_accuracy": sum(correct.values()) / total,
            "style_accuracy_ci95": proportion_ci(sum(correct.values()), total),
            "style_accuracy_per_site": {s: correct[s] / len(generated[s]) for s in sorted(generated)}}


# --------------------------------------------------------------------------- goals and figures
def goals(metrics: dict) -> dict:
    """The synthesis issue's targets on the demo, met or missed (None: not measured)."""
    def check(value: float | None, target: float | None, ok: bool | None) -> dict:
        return {"value": value, "target": target, "met": ok}

    cf = metrics.get("counterfactual", {})
    content = metrics.get("content", {})
    style = metrics.get("translation_style_accuracy")
    fd = metrics.get("generation", {}).get("frechet_distance", {}).get("overall", {})
    ratio = content.get("ratio_to_roundtrip")
    return {
        "counterfactual_closer_than_baselines_at_least_0.80": check(
            cf.get("closer_than_baselines"), 0.80,
            None if "closer_than_baselines" not in cf else cf["closer_than_baselines"] >= 0.80),
        "content_dice_at_least_0.9_of_roundtrip": check(
            ratio, 0.9, None if ratio is None or np.isnan(ratio) else ratio >= 0.9),
        "style_accuracy_at_least_0.90": check(style, 0.90, None if style is None else style >= 0.90),
        "frechet_distance_at_most_2x_floor": check(
            fd.get("ratio"), 2.0, None if fd.get("ratio") is None else fd["ratio"] <= 2.0),
    }


def plot_pairs(rows: list[dict], target: Path, limit: int, value_range: tuple[float, float]) -> Path:
    """Middle slices (of ``A``'s overlap box with ``s@B``): A | translation | real s@B | histogram-matched, in grey
    levels spanning the harmonized ``value_range``."""
    shown = [r for r in rows if r["counterfactual"] is not None][:max(limit, 1)]
    fig, axes = plt.subplots(max(len(shown), 1), 4, figsize=(10, 2.6 * max(len(shown), 1)), squeeze=False)
    for row, ax in zip(shown, axes):
        cf = row["counterfactual"]
        panels = (("a", f"{row['source']}\n(s@A)"), ("translation", f"→ {row['target_site']}"),
                  ("target", f"{cf['b']}\n(real s@B)"), ("a_histmatch", "s@A histogram-matched"))
        for a, (name, title) in zip(ax, panels):
            mae = f"\nMAE {cf['scores'][name]['mae_hu']:.0f} HU" if name in cf["scores"] else ""
            a.imshow(cf["_slices"][name][::-1, ::-1], cmap="gray", vmin=value_range[0], vmax=value_range[1])
            a.set_title(title + mae, fontsize=7)
            a.axis("off")
    if not shown:
        axes[0, 0].text(0.5, 0.5, "no counterfactual pair", ha="center", va="center")
        for a in axes[0]:
            a.axis("off")
    fig.tight_layout()
    return save_figure(fig, target)


def plot_summary(metrics: dict, target: Path) -> Path:
    """Fréchet and kernel distances vs floor, Dice, counterfactual MAE and style accuracy, each with its interval."""
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))

    def bars(ax, labels: list[str], values: list[float], intervals: list[list[float]], offset: float = 0.0,
             label: str | None = None) -> None:
        x = np.arange(len(labels)) + offset
        ax.bar(x, values, width=0.38, label=label)
        # the interval as a line, not as error bars: a bootstrap interval of the Fréchet distance
        # can lie above its estimate (resampling repeats samples, which inflates the distance)
        ax.vlines(x, [lo for lo, _ in intervals], [hi for _, hi in intervals], color="black", lw=1.2)
        ax.set_xticks(np.arange(len(labels)) + 0.19, labels, fontsize=7, rotation=30)

    fd = {k: v for k, v in metrics.get("generation", {}).get("frechet_distance", {}).items() if "fd" in v}
    if fd:
        names = list(fd)
        bars(axes[0], names, [fd[n]["fd"] for n in names], [fd[n]["fd_ci95"] for n in names], label="generated")
        bars(axes[0], names, [fd[n]["floor"] for n in names], [fd[n]["floor_ci95"] for n in names], 0.38,
             "real (floor)")
        axes[0].legend(fontsize=7)
    axes[0].set_title("evaluator-space Fréchet distance", fontsize=9)
    kid = {k: v for k, v in fd.items() if "kid" in v}
    if kid:
        names = list(kid)
        bars(axes[4], names, [kid[n]["kid"] for n in names], [kid[n]["kid_ci95"] for n in names], label="generated")
        bars(axes[4], names, [kid[n]["kid_floor"] for n in names], [kid[n]["kid_floor_ci95"] for n in names], 0.38,
             "real (floor)")
        axes[4].axhline(0, color="grey", lw=0.8)
        axes[4].set_yscale("symlog", linthresh=1.0)  # one site's distance can be 1000x another's; signs matter
        axes[4].legend(fontsize=7)
    axes[4].set_title("kernel distance (KID; 0: same distribution)", fontsize=9)
    content = metrics.get("content", {})
    if "translation" in content:
        names = [n for n in ("translation", "a_vae", "a_vae_textured", "a") if n in content]
        bars(axes[1], names, [content[n]["mean"] for n in names], [content[n]["ci95"] for n in names])
    axes[1].set_title("content: organ Dice vs A's labels", fontsize=9)
    cf = metrics.get("counterfactual", {})
    if "pairs" in cf:
        names = [m for m in METHODS if "mae_hu" in cf[m]]
        bars(axes[2], names, [cf[m]["mae_hu"]["mean"] for m in names], [cf[m]["mae_hu"]["ci95"] for m in names])
    axes[2].set_title(f"counterfactual: MAE to real s@B (HU), {cf.get('pairs', 0)} pairs", fontsize=9)
    style = [(n, metrics.get(f"{n}_style_accuracy"), metrics.get(f"{n}_style_accuracy_ci95"))
             for n in ("translation", "generation")]
    style = [s for s in style if s[1] is not None]
    if style:
        bars(axes[3], [s[0] for s in style], [s[1] for s in style], [s[2] for s in style])
    axes[3].set_ylim(0, 1.05)
    axes[3].set_title("style accuracy (site head → target)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, target)


# --------------------------------------------------------------------------- stage
def run(cfg: EvaluateSynthesisConfig, paths: Paths) -> StageResult:
    """Measure the synthesis store with the frozen evaluator; write metrics, goals and figures."""
    torch.manual_seed(cfg.seed)
    inputs = SynthesisInputs(cfg, paths)
    rows = translation_rows(inputs, cfg)
    generation = generation_summary(inputs, crop_sets(inputs, cfg), cfg)
    metrics: dict = {"translations": len(rows), "generated": sum(r.kind == "generation" for r in inputs.records),
                     "sites": inputs.sites, "label_ids": inputs.label_ids, "synthesis_run": inputs.meta.get("run_key"),
                     "generation": generation}
    if rows:
        correct = sum(r["predicted_site"] == r["target_site"] for r in rows)
        metrics |= {"translation_style_accuracy": correct / len(rows),
                    "translation_style_accuracy_ci95": proportion_ci(correct, len(rows)),
                    "content": content_summary(rows, inputs.label_ids, cfg),
                    "counterfactual": counterfactual_summary(rows, cfg), "median_hu": hu_summary(inputs, rows, cfg)}
    if "style_accuracy" in generation:
        metrics["generation_style_accuracy"] = generation["style_accuracy"]
        metrics["generation_style_accuracy_ci95"] = generation["style_accuracy_ci95"]
    metrics["goals"] = goals(metrics)
    metrics["rows"] = [{k: v for k, v in r.items() if k not in ("dice", "counterfactual")}
                       | {"dice_mean": {n: float(np.nanmean(d)) for n, d in r["dice"].items()},
                          "counterfactual": None if r["counterfactual"] is None else
                          {k: v for k, v in r["counterfactual"].items() if not k.startswith("_")}} for r in rows]

    reports = paths.reports / STAGE
    outputs = {"metrics": write_json(reports / "metrics.json", metrics),
               "pairs": plot_pairs(rows, reports / "pairs.png", cfg.figure_pairs, inputs.value_range),
               "summary": plot_summary(metrics, reports / "summary.png")}
    log.info("%s: %s", STAGE, {name: (goal["value"], goal["met"]) for name, goal in metrics["goals"].items()})
    return StageResult(STAGE, outputs, metrics)
