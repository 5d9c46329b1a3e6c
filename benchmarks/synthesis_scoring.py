"""A DiT's samples scored as the pipeline scores them, for the benchmarks: ``synthesize``, then
``evaluate-synthesis``, in a folder of their own beside a store whose latents, factors, VAE,
MeDUET and synthesis evaluator they share (``dvc repro train_diffusion extract_factors
train_evaluator`` or ``make run`` first).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meduet.artifacts.diffusion import dit_path, save_dit
from meduet.artifacts.evaluator import evaluator_path
from meduet.artifacts.pretrained import meduet_path
from meduet.artifacts.vae import vae_path
from meduet.config import MeduetConfig, Paths
from meduet.models.architectures import DiTArchitecture
from meduet.stages import evaluate_synthesis, synthesize

MODEL_FILES = {"pretrain": meduet_path, "vae": vae_path, "evaluator": evaluator_path, "diffusion": dit_path}
# The synthesize section's defaults here: generated crops only, sampled in this process.
GENERATION_ONLY = {"translations": 0, "augmentations_per_scan": 0, "workers": 1}


def link_models(folder: Path, shared: Paths, which: tuple[str, ...]) -> None:
    """``folder/models/<x>`` -> the ``shared`` store's model folder, for each ``x`` in ``which``."""
    (folder / "models").mkdir(parents=True, exist_ok=True)
    for name in which:
        link = folder / "models" / name
        if not link.exists():
            link.symlink_to(MODEL_FILES[name](shared).parent)


def score_samples(cfg: MeduetConfig, paths: Paths, folder: Path, *, dit_state: dict[str, Any] | None = None,
                  sampling: dict[str, Any] | None = None) -> dict[str, Any]:
    """``evaluate-synthesis``'s metrics of what ``synthesize`` makes in ``folder``.

    Args:
        cfg: the configuration (its ``synthesize``, ``evaluate_synthesis`` and ``ray`` sections).
        paths: the store whose models are used; its ``models/diffusion/dit.pt`` is the trained DiT.
        folder: where the images, reports and the DiT file of ``dit_state`` go.
        dit_state: a training checkpoint's state (``dit``, ``ema``, ``step``): these weights are
            sampled instead of the file's, written as a DiT file with the trained one's other entries,
            so the stages check and read it as they would the final one.
        sampling: updates of the ``synthesize`` section over :data:`GENERATION_ONLY`.
    """
    link_models(folder, paths, ("pretrain", "vae", "evaluator"))
    here = dataclasses.replace(paths, models=folder / "models", reports=folder / "reports",
                               synthesis=folder / "synthesis", work=folder / "work")
    if dit_state is None:
        link_models(folder, paths, ("diffusion",))
    else:
        final = torch.load(dit_path(paths), map_location="cpu", weights_only=True)
        save_dit(dit_path(here), model=dit_state["dit"], ema=dit_state["ema"],
                 architecture=DiTArchitecture.from_dict(final["architecture"]), config=final["config"],
                 scale_factor=final["scale_factor"], meduet_sha256=final["meduet_sha256"],
                 init_report=final["init_report"], steps=int(dit_state["step"]),
                 validation={"model": None, "ema": None})
    section = cfg.synthesize.model_copy(update={**GENERATION_ONLY, **(sampling or {})})
    # workers 1 samples in this process: on all of its threads
    synthesize.run(section, here, cfg.ray.model_copy(update={"cpus_per_task": torch.get_num_threads()}))
    return evaluate_synthesis.run(cfg.evaluate_synthesis, here).metrics


def generation_scores(metrics: dict[str, Any]) -> dict[str, Any]:
    """The generated crops' headline numbers from ``evaluate-synthesis``'s metrics: the overall Fréchet
    distance (interval, floor, ratio, sample count; per site with its floor; the VAE round trips' own
    distance, the ceiling, where measured), the kernel distance (interval, floor) and the style accuracy
    (Wilson interval, per site)."""
    generation = metrics["generation"]
    fd = generation["frechet_distance"]["overall"]
    ceiling = generation.get("frechet_distance_vae_roundtrip", {})
    return {"fd": fd["fd"], "fd_ci95": fd["fd_ci95"], "floor": fd["floor"], "ratio": fd["ratio"],
            "fd_per_site": {s: [v["fd"], v["floor"]] for s, v in generation["frechet_distance"].items()
                            if s != "overall" and "fd" in v},
            "vae_ceiling_fd": {s: v["fd"] for s, v in ceiling.items() if "fd" in v},
            "samples": fd["samples"], "kid": fd["kid"], "kid_ci95": fd["kid_ci95"], "kid_floor": fd["kid_floor"],
            "style_accuracy": generation["style_accuracy"],
            "style_accuracy_ci95": generation["style_accuracy_ci95"],
            "style_accuracy_per_site": generation["style_accuracy_per_site"]}


def translation_scores(metrics: dict[str, Any]) -> dict[str, Any]:
    """The translations' headline numbers from ``evaluate-synthesis``'s metrics: style accuracy (Wilson
    interval), organ Dice against the round trip's (and the textured round trip's, with texture), the
    counterfactual's share won and MAE (HU)."""
    content, cf = metrics["content"], metrics["counterfactual"]
    return {"translations": metrics["translations"],
            "translation_style_accuracy": metrics["translation_style_accuracy"],
            "translation_style_accuracy_ci95": metrics["translation_style_accuracy_ci95"],
            "dice_ratio_to_roundtrip": content["ratio_to_roundtrip"],
            "dice_ratio_to_textured_roundtrip": content.get("ratio_to_textured_roundtrip"),
            "counterfactual_closer": cf.get("closer_than_baselines"),
            "counterfactual_mae_hu": cf["translation"]["mae_hu"]["mean"] if "translation" in cf else None}


def mean_sd(rows: list[dict[str, Any]], key: str) -> str:
    """``mean ± sd`` (sample sd) of ``key`` over the rows that have it; the value alone for one row, ``-`` for none."""
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return "-"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else f"{values[0]:.2f}"
