"""The per-case harmonization settings of a ``harmonize`` section (shared by the stage and ``meduet predict``)."""

from __future__ import annotations

from meduet.config import HarmonizeConfig, config_hash
from meduet.harmonize.case import CaseSettings
from meduet.harmonize.intensity import CTWindow, MRPercentiles


def case_settings(cfg: HarmonizeConfig) -> CaseSettings:
    """Plain per-case settings; the hash covers exactly what changes a case's output."""
    i = cfg.intensity
    normalizer = (CTWindow(i.a_min, i.a_max, i.b_min, i.b_max, i.clip) if i.modality == "ct"
                  else MRPercentiles(i.lower_percentile, i.upper_percentile, i.b_min, i.b_max, i.clip))
    # where cases run (workers, executor) and fail_fast never change a case's output
    output_affecting = cfg.model_copy(update={"datasets": [], "workers": 1, "executor": "auto", "fail_fast": False})
    return CaseSettings(
        spacing=tuple(cfg.target_spacing), interpolation=cfg.interpolation, normalizer=normalizer,
        crop_foreground=cfg.crop_foreground, foreground_threshold=cfg.foreground_threshold,
        margin=cfg.foreground_margin, min_size=tuple(cfg.min_size), divisible_by=cfg.divisible_by,
        compression_level=cfg.compression_level, settings_hash=config_hash(output_affecting),
    )
