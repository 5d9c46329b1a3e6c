"""A tiny demo configuration: four sites (every format and orientation), coarse grids."""

from __future__ import annotations

from pathlib import Path

from meduet.config import DemoDataConfig, SiteStyle
from meduet.data.demo import DemoSummary, generate_demo

# Fields of view cover the whole body, so no site truncates an organ: what differs between
# sites is spacing, slice thickness, kernel, noise, calibration, orientation and format.
TINY_SITES = [
    SiteStyle(name="tiny_nii", spacing=(4.0, 4.0, 5.0), fov_mm=(360, 340), kernel="smooth", noise_std=8,
              noise_corr_mm=4.0, orientation="RAS", file_format="nii.gz"),
    SiteStyle(name="tiny_nrrd", spacing=(4.5, 4.5, 6.0), fov_mm=(360, 360), kernel="sharp", noise_std=20,
              hu_offset=24, hu_gain=1.06, bias=0.08, pad_value=-2048, orientation="LPS", file_format="nrrd"),
    SiteStyle(name="tiny_mha", spacing=(3.5, 3.5, 4.0), fov_mm=(350, 350), kernel="standard", noise_std=14,
              hu_offset=-30, hu_gain=0.94, hu_gamma=1.08, pad_value=-3024, orientation="permuted",
              file_format="mha"),
    SiteStyle(name="tiny_dcm", spacing=(5.0, 5.0, 8.0), fov_mm=(370, 370), kernel="smooth", noise_std=30,
              noise_corr_mm=6.0, hu_offset=12, hu_gamma=0.94, bias=0.12, orientation="LPS", file_format="dicom"),
]


def tiny_config(**overrides: object) -> DemoDataConfig:
    """Three subjects at four sites, about 0.1 M voxels per volume."""
    values = {"seed": 0, "cases_per_site": 3, "body_length_mm": 100.0, "workers": 1, "sites": TINY_SITES,
              **overrides}
    return DemoDataConfig(**values)


def generate(cfg: DemoDataConfig, out_dir: Path) -> DemoSummary:
    return generate_demo(
        sites=cfg.sites, seed=cfg.seed, cases_per_site=cfg.cases_per_site, chest_fraction=cfg.chest_fraction,
        lesion_probability=cfg.lesion_probability, body_length_mm=cfg.body_length_mm, out_dir=out_dir,
        workers=cfg.workers, compression_level=cfg.compression_level,
    )
