"""The typed configuration tree: one pydantic model per ``params.yaml`` section.

``load_config`` validates a params file once, at the edge; everything below the stages
receives plain typed values. Every model forbids unknown keys so a typo is an error that
names the key, never a silently ignored setting.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from meduet.models.architectures import DIT_PRESETS, MAX_VOXELS_PER_SPLIT, MEDUET_PRESETS
from meduet.stages import STAGES, report_dir_name

# Pretrained weights enter here: dvc.yaml lists this folder as a dependency of train-vae.
PRETRAINED_DIR = "data/pretrained"

PositiveFloat = Annotated[float, Field(gt=0)]
Spacing = tuple[PositiveFloat, PositiveFloat, PositiveFloat]
Size3 = tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]]


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file, key and value."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------- paths / storage
class PathsConfig(StrictModel):
    """Where stages read and write, relative to the folder holding ``params.yaml``."""

    demo_dir: str = "data/demo"
    harmonized_dir: str = "data/harmonized"
    reports_dir: str = "reports"
    models_dir: str = "models"
    latents_dir: str = "data/latents"
    factors_dir: str = "data/factors"
    synthesis_dir: str = "data/synthesis"
    work_dir: str = ".work"


class StorageConfig(StrictModel):
    """Remote object storage. Credentials never live here: they come from the environment
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) or the usual AWS config files."""

    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, Ceph, a local moto server); None means AWS."
    )
    s3_region: str | None = None
    dvc_remote_url: str | None = Field(
        default=None, description="DVC remote, e.g. s3://bucket/meduet; None disables push/pull."
    )

    @field_validator("dvc_remote_url")
    @classmethod
    def _remote_scheme(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value and not value.startswith("/"):
            raise ValueError("must be a URL such as s3://bucket/prefix or an absolute path")
        return value


# --------------------------------------------------------------------------- demo data
class SiteStyle(StrictModel):
    """How one (simulated) scanner site renders the same anatomy."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    spacing: Spacing = Field(description="voxel spacing (x, y, z) in mm; z is the slice thickness (contiguous slices)")
    fov_mm: tuple[PositiveFloat, PositiveFloat] = Field(
        description="in-plane field of view (x, y) in mm; the reconstruction circle's diameter is the smaller one"
    )
    hu_offset: float = Field(default=0.0, description="calibration offset added to true HU")
    hu_gain: PositiveFloat = Field(default=1.0, description="calibration gain applied to true HU")
    hu_gamma: PositiveFloat = Field(
        default=1.0, description="calibration nonlinearity: power on attenuation relative to water, (HU + 1000) / 1000"
    )
    noise_std: Annotated[float, Field(ge=0)] = Field(default=10.0, description="noise standard deviation in HU")
    noise_corr_mm: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="in-plane Gaussian sigma (mm) of the noise texture; 0 = white noise"
    )
    kernel: Literal["smooth", "standard", "sharp"] = Field(
        default="standard", description="reconstruction kernel: Gaussian blur (smooth, standard) or edge enhancement"
    )
    bias: Annotated[float, Field(ge=0, le=0.5)] = Field(
        default=0.0, description="beam-hardening cupping: fractional attenuation loss at the body centre"
    )
    pad_value: float = Field(default=-1024.0, description="HU stored outside the reconstruction circle")
    orientation: Literal["RAS", "LPS", "permuted"] = Field(
        default="RAS", description="storage order of the array axes; 'permuted' stores sagittal slices (PIR)"
    )
    file_format: Literal["nii.gz", "nrrd", "mha", "dicom"] = "nii.gz"


def _default_sites() -> list[SiteStyle]:
    return [
        SiteStyle(name="site_a", spacing=(0.9, 0.9, 2.5), fov_mm=(330, 330), hu_offset=0, hu_gain=1.0,
                  noise_std=8, noise_corr_mm=0.8, kernel="smooth", bias=0.0, pad_value=-1024,
                  orientation="RAS", file_format="nii.gz"),
        SiteStyle(name="site_b", spacing=(1.1, 1.1, 3.0), fov_mm=(360, 360), hu_offset=24, hu_gain=1.06,
                  noise_std=22, noise_corr_mm=0.0, kernel="sharp", bias=0.08, pad_value=-2048,
                  orientation="LPS", file_format="nrrd"),
        SiteStyle(name="site_c", spacing=(0.8, 0.8, 1.5), fov_mm=(300, 300), hu_offset=-30, hu_gain=0.94,
                  hu_gamma=1.08, noise_std=14, noise_corr_mm=1.5, kernel="standard", bias=0.04,
                  pad_value=-3024, orientation="permuted", file_format="mha"),
        SiteStyle(name="site_d", spacing=(1.25, 1.25, 5.0), fov_mm=(400, 400), hu_offset=12, hu_gain=1.0,
                  hu_gamma=0.94, noise_std=30, noise_corr_mm=2.0, kernel="smooth", bias=0.12,
                  pad_value=-1024, orientation="LPS", file_format="dicom"),
    ]


class DemoDataConfig(StrictModel):
    """Generator of CT-like multi-site phantoms with known ground truth."""

    seed: int = 0
    cases_per_site: Annotated[int, Field(ge=1)] = 4
    chest_fraction: Annotated[float, Field(ge=0, le=1)] = 0.5
    lesion_probability: Annotated[float, Field(ge=0, le=1)] = 0.5
    body_length_mm: PositiveFloat = Field(default=160.0, description="cranio-caudal extent scanned per case")
    sites: list[SiteStyle] = Field(default_factory=_default_sites, min_length=1)
    workers: Annotated[int, Field(ge=1)] = 2
    compression_level: Annotated[int, Field(ge=0, le=9)] = Field(
        default=1, description="zlib level of written images (0 = uncompressed .nrrd/.mha; .nii.gz always gzip)"
    )

    @field_validator("sites")
    @classmethod
    def _unique_site_names(cls, sites: list[SiteStyle]) -> list[SiteStyle]:
        names = [s.name for s in sites]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        return sites


# --------------------------------------------------------------------------- harmonize
class DatasetSource(StrictModel):
    """One input dataset: an MSD (``dataset.json``) or nnU-Net raw folder, local or s3://."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    root: str = Field(description="folder path (relative to params.yaml) or s3:// URI")
    domain: str = Field(description="site / scanner id used as the domain label")
    body_part: str = "unknown"
    layout: Literal["auto", "msd", "nnunet"] = "auto"
    include_unlabeled: bool = Field(default=True, description="also take images without labels (MSD 'test')")


class IntensityConfig(StrictModel):
    """Intensity normalisation; ``ct`` windows HU, ``mr`` scales robust percentiles."""

    modality: Literal["ct", "mr"] = "ct"
    a_min: float = -175.0
    a_max: float = 250.0
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = True
    lower_percentile: Annotated[float, Field(ge=0, le=100)] = 0.5
    upper_percentile: Annotated[float, Field(ge=0, le=100)] = 99.5

    @model_validator(mode="after")
    def _ordered(self) -> IntensityConfig:
        if self.a_max <= self.a_min:
            raise ValueError(f"a_max ({self.a_max}) must be greater than a_min ({self.a_min})")
        if self.upper_percentile <= self.lower_percentile:
            raise ValueError("upper_percentile must be greater than lower_percentile")
        return self


class HarmonizeConfig(StrictModel):
    datasets: list[DatasetSource] = Field(default_factory=list)
    target_spacing: Spacing = (1.5, 1.5, 1.5)
    interpolation: Literal["linear", "bspline"] = "linear"
    intensity: IntensityConfig = Field(default_factory=IntensityConfig)
    crop_foreground: bool = True
    foreground_threshold: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.0, description="share of the intensity window above its lower bound (a_min; b_min once scaled) that "
        "a voxel must exceed to be foreground: 0 = anything brighter than the window's floor, whatever b_min/b_max are"
    )
    foreground_margin: Annotated[int, Field(ge=0)] = 2
    min_size: Size3 = (64, 64, 64)
    divisible_by: Annotated[int, Field(ge=1)] = 16
    compression_level: Annotated[int, Field(ge=0, le=9)] = 1
    workers: Annotated[int, Field(ge=1)] = 2
    executor: Literal["auto", "pool", "ray"] = Field(
        default="auto", description="pool = local processes; ray = Ray tasks across a cluster's nodes (the "
        "harmonized folder must then be storage every node sees); auto = ray when a cluster is named (ray.address "
        "or RAY_ADDRESS), else pool"
    )
    fail_fast: bool = False

    @field_validator("datasets")
    @classmethod
    def _unique_dataset_names(cls, datasets: list[DatasetSource]) -> list[DatasetSource]:
        names = [d.name for d in datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        return datasets


# --------------------------------------------------------------------------- VAE and latents
class VAEConfig(StrictModel):
    """The 3-D KL-VAE tokenizer (stage ``train-vae``)."""

    preset: Literal["maisi", "small", "tiny"] = Field(
        default="tiny", description="maisi = the published MAISI autoencoder shape; small/tiny for CPU"
    )
    pretrained: str | None = Field(
        default=None, description=f"existing weights (e.g. MAISI autoencoder.pt) under {PRETRAINED_DIR}/ (a DVC "
        "dependency of train-vae, so replacing the file reruns the stage) or s3://; skips training"
    )
    crop_size: Size3 = Field(default=(32, 32, 32), description="training crop (D, H, W), multiples of 4")
    batch_size: Annotated[int, Field(ge=1)] = 2
    steps: Annotated[int, Field(ge=1)] = 300
    lr: PositiveFloat = 1e-4
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    kl_weight: Annotated[float, Field(ge=0)] = 1e-6
    adv_weight: Annotated[float, Field(ge=0)] = 0.0
    adv_start: Annotated[int, Field(ge=0)] = 0
    disc_channels: Annotated[int, Field(ge=1)] = 32
    grad_clip: PositiveFloat = 1.0
    amp: bool = Field(default=True, description="bf16 autocast when training on GPU")
    holdout_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.25
    max_voxels_per_split: Annotated[int, Field(ge=1)] = Field(
        default=MAX_VOXELS_PER_SPLIT, description="memory bound for whole-volume encode/decode (MAISI tensor splitting)"
    )
    log_every: Annotated[int, Field(ge=1)] = 10
    seed: int = 0

    @field_validator("pretrained")
    @classmethod
    def _tracked_weights(cls, value: str | None) -> str | None:
        if value is None or value.startswith("s3://"):
            return value
        path = PurePosixPath(value)
        if path.is_absolute() or ".." in path.parts or path.parts[:2] != tuple(PRETRAINED_DIR.split("/")):
            raise ValueError(f"local weights must lie under {PRETRAINED_DIR}/ (relative to params.yaml), the folder "
                             f"dvc.yaml lists as train-vae's dependency, so that replacing them reruns the stage; got "
                             f"{value!r} (for weights elsewhere: dvc import-url <uri> {PRETRAINED_DIR}/<name>)")
        return value

    @field_validator("crop_size")
    @classmethod
    def _crop_multiple_of_4(cls, crop: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(c % 4 for c in crop):
            raise ValueError(f"every crop dimension must be a multiple of 4 (the VAE's compression), got {crop}")
        return crop


class EncodeLatentsConfig(StrictModel):
    """Encoding every harmonized volume with the frozen VAE (stage ``encode-latents``)."""

    store_std: bool = Field(default=False, description="also store the posterior standard deviation")
    max_voxels_per_split: Annotated[int, Field(ge=1)] = MAX_VOXELS_PER_SPLIT
    workers: Annotated[int, Field(ge=1)] = Field(default=1, description="parallel encoders (Ray tasks)")


# --------------------------------------------------------------------------- MeDUET pretraining
class PretrainLossWeights(StrictModel):
    """Weights of ``L = L_rec + domain (L_dc + L_ds) + mftd L_MFTD + siqc L_SiQC`` (the paper's defaults)."""

    domain: Annotated[float, Field(ge=0)] = Field(default=0.2, description="lambda1 on the site losses")
    mftd: Annotated[float, Field(ge=0)] = Field(default=0.5, description="lambda2 on MFTD")
    siqc: Annotated[float, Field(ge=0)] = Field(default=0.3, description="lambda3 on SiQC")
    mftd_content: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.5, description="lambda_c: the content share inside MFTD (style gets 1 - lambda_c)"
    )


# Method switches of each recipe: "faithful" is the authors' recipe; "improved" the best configuration
# measured (benchmarks/disentanglement_ablation.py, 3 seeds; README, disentanglement): the clean-content
# adversary over 4 crops of a volume; "all" every change at once.
_FAITHFUL: dict[str, Any] = {"crops_per_volume": 1, "clean_adversary": 0.0, "cross_site_partners": False,
                             "same_site_negatives": False, "decorrelation": 0.0, "site_alignment": 0.0,
                             "grl_ramp": False, "ema_horizon": None, "epoch_sampling": False}
RECIPES: dict[str, dict[str, Any]] = {
    "faithful": _FAITHFUL,
    "improved": {**_FAITHFUL, "crops_per_volume": 4, "clean_adversary": 1.0},
    "all": {"crops_per_volume": 4, "clean_adversary": 1.0, "cross_site_partners": True, "same_site_negatives": True,
            "decorrelation": 0.1, "site_alignment": 10.0, "grl_ramp": True, "ema_horizon": (0.01, 0.1),
            "epoch_sampling": True},
}


class PretrainMethod(StrictModel):
    """Changes to the authors' recipe that make content site-free; each one a switch (None: the recipe's value).

    See README, "Deviations from the authors' recipe", for the reason and measured effect of each.
    """

    recipe: Literal["faithful", "improved", "all"] = Field(
        default="improved", description="faithful = the authors' recipe (every change off); improved = the best "
        "measured (the clean-content adversary over 4 crops of a volume); all = every change"
    )
    crops_per_volume: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="M: batches of B/M volumes x M crops, so site losses can pool a volume's crops"
    )
    clean_adversary: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="weight of the site classifiers on clean (unmixed) factors pooled per volume, "
        "content behind the gradient reversal: the representation that is evaluated, at its scale"
    )
    cross_site_partners: bool | None = Field(default=None, description="the mixing partner comes from another site")
    same_site_negatives: bool | None = Field(
        default=None, description="SiQC content negatives only from the query's site (site cues cannot help)"
    )
    decorrelation: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="weight of the squared cross-correlation of pooled clean content and style"
    )
    site_alignment: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="weight of the spread of per-site means of pooled clean content, in units of "
        "its spread (a queue of recent crops)"
    )
    grl_ramp: bool | None = Field(
        default=None, description="reversal strength ramps 0 -> 1 as 2/(1+exp(-10 p)) - 1 (DANN)"
    )
    ema_horizon: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] | None = Field(
        default=None, description="teacher averaging window as a fraction of the run, start and end (momentum "
        "1 - 1/(fraction * steps)); None keeps ema_start/ema_end"
    )
    epoch_sampling: bool | None = Field(default=None, description="volumes drawn without replacement per epoch")
    queue_size: Annotated[int, Field(ge=2)] = Field(
        default=2048, description="pooled crops kept for site_alignment (its noise floor falls as 1/queue_size)"
    )

    @model_validator(mode="after")
    def _fill_from_recipe(self) -> PretrainMethod:
        explicit = self.model_fields_set
        for name, value in RECIPES[self.recipe].items():
            if name not in explicit:
                object.__setattr__(self, name, value)
        return self


class PretrainConfig(StrictModel):
    """MeDUET self-supervised pretraining on the latent cache (stage ``pretrain``)."""

    preset: Literal["base", "small", "tiny"] = Field(
        default="tiny", description="base = the paper's ViT-B on 24^3 latents; small/tiny for CPU"
    )
    crop: Annotated[int, Field(ge=1)] = Field(
        default=8, description="latent crop edge (d = h = w); must equal the preset's input size"
    )
    batch_size: Annotated[int, Field(ge=2)] = Field(
        default=4, description="crops per worker and micro-step; even (sample i mixes with B-1-i)"
    )
    steps: Annotated[int, Field(ge=1)] = 300
    lr: PositiveFloat = 1e-4
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    weight_decay: Annotated[float, Field(ge=0)] = 1e-2
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    grad_clip: PositiveFloat = 1.0
    grad_accumulation: Annotated[int, Field(ge=1)] = Field(default=1, description="micro-batches per optimizer step")
    amp: bool = Field(default=True, description="bf16 autocast when training on GPU")
    cpu_bf16: bool = Field(
        default=False, description="bf16 autocast on CPU too, where the CPU has native bf16 (AVX512-BF16/AMX): "
        "about 1.7x faster and leaner steps for the base preset; ignored (fp32) on other CPUs"
    )
    mask_ratio: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.5, description="fraction of partner tokens in a mixed sequence (SiQC needs 0.5)"
    )
    weights: PretrainLossWeights = Field(default_factory=PretrainLossWeights)
    mftd_start_fraction: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.2, description="MFTD is switched on from step mftd_start_fraction * steps"
    )
    ema_start: Annotated[float, Field(ge=0, le=1)] = Field(default=0.997, description="teacher momentum at step 0")
    ema_end: Annotated[float, Field(ge=0, le=1)] = Field(default=0.9997, description="teacher momentum at the end")
    learnable_logit_scale: bool = Field(default=False, description="train SiQC's temperatures (needs use_siqc)")
    use_mftd: bool = Field(default=True, description="ablation switch: masked factor-token distillation")
    use_siqc: bool = Field(default=True, description="ablation switch: swap-invariance quadruplet contrast")
    use_grl: bool = Field(
        default=True, description="ablation switch: off sets the reversal strength to 0, so the content site "
        "classifier still trains but sends no gradient into the encoder (a detach)"
    )
    method: PretrainMethod = Field(default_factory=PretrainMethod)
    objective: Literal["meduet", "mae"] = Field(
        default="meduet", description="meduet = the method; mae = the masked-autoencoder baseline of the same "
        "network (mixing, site heads, MFTD and SiQC off: the hidden tokens are dropped), section pretrain_mae"
    )
    log_every: Annotated[int, Field(ge=1)] = 10
    seed: int = 0

    @field_validator("batch_size")
    @classmethod
    def _even_batch(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"must be even (sample i is mixed with sample B-1-i), got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        preset = MEDUET_PRESETS[self.preset]
        if self.crop % preset.patch_size:
            raise ValueError(f"crop {self.crop} is not divisible by preset {self.preset!r}'s patch size "
                             f"{preset.patch_size}")
        if (self.crop,) * 3 != tuple(preset.input_size):
            raise ValueError(f"crop {self.crop} must equal preset {self.preset!r}'s input size "
                             f"{preset.input_size} (fixed sin-cos positions)")
        if self.ema_start > self.ema_end:
            raise ValueError(f"ema_start ({self.ema_start}) must not exceed ema_end ({self.ema_end})")
        if self.use_siqc and self.objective == "meduet" and self.mask_ratio != 0.5:
            raise ValueError(f"use_siqc needs mask_ratio 0.5 (equal token groups), got {self.mask_ratio}")
        if self.learnable_logit_scale and not self.use_siqc:
            raise ValueError("learnable_logit_scale needs use_siqc (the scales are SiQC's temperatures)")
        if self.batch_size % (2 * self.method.crops_per_volume) and "crops_per_volume" not in \
                self.method.model_fields_set:  # the recipe's M: the largest that fits this batch
            fits = [m for m in range(self.method.crops_per_volume, 0, -1) if self.batch_size % (2 * m) == 0]
            object.__setattr__(self.method, "crops_per_volume", fits[0])
        if self.batch_size % (2 * self.method.crops_per_volume):
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of 2 x method.crops_per_volume "
                             f"({self.method.crops_per_volume}): an even number of volumes pair up for mixing")
        return self


# --------------------------------------------------------------------------- factor evaluation
class ExtractFactorsConfig(StrictModel):
    """Whole-volume content/style vectors from the pretrained model (stage ``extract-factors``)."""

    weights: list[Literal["teacher", "student"]] = Field(
        default=["teacher", "student"], min_length=1,
        description="saved weights that encode, each kept: the EMA teacher and/or the student; the first is the "
        "primary (headline metrics, swap tests)"
    )

    @field_validator("weights")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"weights must not repeat, got {value}")
        return value
    batch_size: Annotated[int, Field(ge=1)] = Field(default=16, description="sliding windows per forward pass")
    workers: Annotated[int, Field(ge=1)] = Field(
        default=1, description="volume chunks encoded in parallel as Ray tasks (1: in this process)")


def _subject_pattern(value: str) -> str:
    try:
        groups = re.compile(value).groups
    except re.error as error:
        raise ValueError(f"not a regular expression: {error}") from error
    if groups < 1:
        raise ValueError(f"needs a capture group for the subject, got {value!r}")
    return value


# A regular expression whose first group is the subject in a case id (travelling subjects).
SubjectPattern = Annotated[str, AfterValidator(_subject_pattern)]


class EvaluateDisentanglementConfig(StrictModel):
    """Site probes, windows curve, region-matched probes, cross-site retrieval and swap tests
    of the factors (stage ``evaluate-disentanglement``)."""

    folds: Annotated[int, Field(ge=2)] = Field(
        default=5, description="cross-validation folds (stratified by site; at most the rarest site's volumes)"
    )
    l2: Annotated[float, Field(ge=0)] = Field(default=1e-2, description="L2 penalty per sample on the probe weights")
    max_iter: Annotated[int, Field(ge=1)] = Field(default=200, description="L-BFGS iterations per probe fit")
    permutations: Annotated[int, Field(ge=0)] = Field(
        default=200, description="label permutations of each probe's null (0: no null)"
    )
    window_counts: list[Annotated[int, Field(ge=1)]] = Field(
        default=[1, 4, 16, 64], description="windows averaged per volume along the curve (plus all of them)"
    )
    curve_draws: Annotated[int, Field(ge=1)] = Field(default=5, description="random window draws per curve point")
    curve_permutations: Annotated[int, Field(ge=0)] = Field(default=50, description="null permutations per curve point")
    jobs: Annotated[int, Field(ge=1)] = Field(default=2, description="processes sharing a probe's permutations")
    subject_pattern: SubjectPattern = Field(
        default=r"_(\d+)$", description="regex whose first group is the subject in a case id (travelling "
        "subjects: the same subject scanned at several sites); cases without a match take no part in retrieval"
    )
    swap_pairs: Annotated[int, Field(ge=0)] = Field(
        default=16, description="(A, B) pairs of different sites for the swap test; 0 skips it"
    )
    counterfactual_pairs: Annotated[int, Field(ge=0)] = Field(
        default=48, description="same-subject pairs of the counterfactual swap; 0 skips it"
    )
    counterfactual_decode: Annotated[int, Field(ge=0)] = Field(
        default=8, description="of the counterfactual pairs, how many are also decoded with the VAE and scored by "
        "PSNR against the real image (about 4 s per decode on 2 CPU cores; 0: latent space only)"
    )
    max_voxels_per_split: Annotated[int, Field(ge=1)] = Field(
        default=MAX_VOXELS_PER_SPLIT, description="whole-volume VAE decode memory bound (the counterfactual's decodes)"
    )
    batch_size: Annotated[int, Field(ge=1)] = Field(default=16, description="sliding windows per forward pass")
    seed: int = 0



# --------------------------------------------------------------------------- analysis: segmentation
# The demo's label table (meduet.data.phantom.LABELS), by label value.
DEMO_LABELS = ["background", "skin", "fat", "muscle", "liver", "spleen", "kidney_right", "kidney_left", "spine",
               "aorta", "lung_right", "lung_left", "heart", "lesion"]


class FinetuneConfig(StrictModel):
    """Segmentation fine-tuning of the MeDUET encoder on the latent cache (stage ``finetune``)."""

    init: Literal["scratch", "mae", "meduet"] = Field(
        default="meduet", description="scratch = random encoder of the pretrained shape; mae = the masked-autoencoder "
        "baseline's encoder (stage pretrain-mae); meduet = the pretrained MeDUET encoder (EMA teacher weights each)"
    )
    decoder: Literal["upsample", "refine"] = Field(
        default="refine", description="upsample = the authors' latent logits upsampled 4x trilinearly; refine = "
        "a decoder refining at image resolution with skip features of the harmonized image"
    )
    labels_per_site: Annotated[int, Field(ge=1)] | Literal["all"] = Field(
        default="all", description="training subjects per site whose labels are used (label efficiency: 1, 2, 4, "
        "all); seed 0 takes each site's first ones by case key, seed 1 the next ones (finetune_runs.labelled_cases); "
        "the others stay unlabelled"
    )
    label_names: list[str] = Field(
        default_factory=lambda: list(DEMO_LABELS), min_length=2,
        description="class names by label value (background first); the label maps must not exceed their count"
    )
    features: Annotated[int, Field(ge=1)] = Field(default=16, description="channels of the latent-resolution head")
    image_features: Annotated[int, Field(ge=1)] = Field(
        default=8, description="channels of the image-resolution refinement (refine only)"
    )
    body_context: bool = Field(
        default=True, description="the head also reads where each window lies in the patient (inside the body "
        "outline or not, left-right and front-back position: meduet.data.body), computed from the whole harmonized "
        "volume; without it a window inside a lung reads as the air around the patient"
    )
    batch_size: Annotated[int, Field(ge=1)] = Field(default=4, description="windows per worker and micro-step")
    steps: Annotated[int, Field(ge=1)] = 600
    lr: PositiveFloat = Field(default=1e-2, description="learning rate of the segmentation head")
    encoder_lr_scale: PositiveFloat = Field(
        default=1.0, description="the encoder's learning rate as a multiple of lr (the same for every init: a "
        "pretrained encoder trained at the head's rate may lose what pretraining gave it)"
    )
    weight_decay: Annotated[float, Field(ge=0)] = 1e-2
    warmup_steps: Annotated[int, Field(ge=0)] = 10
    grad_clip: PositiveFloat = 1.0
    grad_accumulation: Annotated[int, Field(ge=1)] = Field(default=1, description="micro-batches per optimizer step")
    amp: bool = Field(default=True, description="bf16 autocast when training on GPU")
    cpu_bf16: bool = Field(default=False, description="bf16 autocast on CPUs with native bf16 too")
    foreground_fraction: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.67, description="share of training windows centred on a voxel of one class (foreground_balance)"
    )
    foreground_balance: Literal["case", "dataset"] = Field(
        default="dataset", description="how a foreground window's class is drawn: case = a random training case, then "
        "one of its classes; dataset = one of the classes any training case holds, then a case holding it (a class "
        "only some cases show, e.g. the lungs of the chest-including subjects, gets as many windows as the others)"
    )
    style_augmentation: bool = Field(
        default=False, description="style-bank augmentation: some training windows' encoder tokens moved towards "
        "the running mean style (domain generalisation; meduet.models.segmenter.StyleBank)"
    )
    style_alpha: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] = Field(
        default=(0.2, 0.5), description="range of the style mixing weight"
    )
    style_probability: Annotated[float, Field(ge=0, le=1)] = Field(default=0.3, description="windows augmented")
    style_momentum: Annotated[float, Field(ge=0, lt=1)] = Field(default=0.9, description="EMA of the style bank")
    synthetic_fraction: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.3, description="share of training windows drawn from synthesized (style-swapped) cases when a run "
        "has any: finetune_sweep's meduet+synth arm"
    )
    overlap: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.25, description="overlap of the sliding windows that segment a whole volume (Gaussian-blended)"
    )
    window_batch: Annotated[int, Field(ge=1)] = Field(default=8, description="windows per forward when segmenting")
    surface_tolerance_mm: PositiveFloat = Field(default=2.0, description="tolerance of the surface Dice (mm)")
    large_organ_min_ml: PositiveFloat = Field(
        default=500.0, description="organs whose true volume in the held-out label maps averages at least this "
        "(mL) are the large organs of the all-labels goal (mean Dice >= 0.85); the demo's: fat, muscle, liver, lungs, "
        "heart")
    log_every: Annotated[int, Field(ge=1)] = 10
    seed: int = 0


FULL_SWEEP: dict[str, Any] = {"inits": ["scratch", "mae", "meduet"], "labels_per_site": [1, 2, 4, "all"],
                              "seeds": [0, 1, 2], "leave_one_site_out": True}


class FinetuneSweepConfig(StrictModel):
    """Label-efficiency and leave-one-site-out fine-tuning over initialisations and seeds (stage ``finetune-sweep``).

    Every cell is the ``finetune`` section with its ``init``, ``labels_per_site`` and ``seed``
    replaced, and its ``steps`` where ``steps`` is set (the same recipe for every initialisation).
    """

    inits: list[Literal["scratch", "mae", "meduet"]] = Field(default=["scratch", "mae", "meduet"], min_length=1)
    labels_per_site: list[Annotated[int, Field(ge=1)] | Literal["all"]] = Field(
        default=[1], min_length=1, description="label-efficiency points: labelled training subjects per site"
    )
    seeds: list[int] = Field(default=[0], min_length=1, description="fine-tuning seeds of every cell")
    steps: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="fine-tuning steps of every cell; null: finetune.steps (the demo's params keep "
        "its reduced sweep at 300 so that make run stays within its budget; README: analysis)"
    )
    leave_one_site_out: bool = Field(
        default=False, description="also train on every site but one (all their labels) and score the left-out "
        "site's held-out subjects, each site in turn"
    )
    style_arm: bool = Field(
        default=True, description="leave one site out also fine-tunes MeDUET with style-bank augmentation (arm "
        "meduet+style: finetune.style_augmentation on), the domain-generalisation recipe"
    )
    synthetic_arm: bool = Field(
        default=False, description="label efficiency also fine-tunes MeDUET with each labelled scan's style-swapped "
        "translations from the synthesis store added to its training cases (arm meduet+synth; the store needs "
        "synthesize.augmentations_per_scan > 0); leave one site out never uses them (they would show the unseen "
        "site's style)"
    )
    full: bool = Field(default=False, description=f"the whole protocol, whatever the lists say: {FULL_SWEEP}")

    @model_validator(mode="after")
    def _full(self) -> FinetuneSweepConfig:
        if self.full:
            for name, value in FULL_SWEEP.items():
                object.__setattr__(self, name, value)
        for name in ("inits", "labels_per_site", "seeds"):
            values = getattr(self, name)
            if len(set(map(str, values))) != len(values):
                raise ValueError(f"{name} must not repeat, got {values}")
        return self


# --------------------------------------------------------------------------- latent diffusion
class TrainDiffusionConfig(StrictModel):
    """The factor-conditioned latent DiT (stage ``train-diffusion``)."""

    preset: Literal["base", "small", "tiny"] = Field(
        default="tiny", description="base = DiT-B/4 on 24^3 latents; small/tiny for CPU (each on the crop and "
        "patches of the MeDUET preset of the same name, so their tokens align)"
    )
    crop: Annotated[int, Field(ge=1)] = Field(
        default=8, description="latent crop edge; must equal the preset's input size (and the pretrained MeDUET's)"
    )
    batch_size: Annotated[int, Field(ge=1)] = Field(default=8, description="crops per worker and micro-step")
    steps: Annotated[int, Field(ge=1)] = 1000
    lr: PositiveFloat = 1e-4
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup_steps: Annotated[int, Field(ge=0)] = 20
    grad_clip: PositiveFloat = 1.0
    grad_accumulation: Annotated[int, Field(ge=1)] = Field(default=1, description="micro-batches per optimizer step")
    objective: Literal["ddpm", "rflow"] = Field(
        default="rflow", description="rflow = rectified flow, velocity prediction; ddpm = 1000-step linear beta, "
        "epsilon-prediction (its few-step samples diverge unless the model is trained far longer: README)"
    )
    flow_time: Literal["uniform", "logit_normal"] = Field(default="uniform", description="rflow's training times")
    init: Literal["scratch", "meduet", "meduet_repa"] = Field(
        default="meduet", description="scratch; meduet = patch embedding and block weights from the pretrained "
        "MeDUET encoder; meduet_repa = that plus representation alignment to MeDUET's content tokens"
    )
    repa_weight: Annotated[float, Field(ge=0)] = Field(default=0.5, description="weight of REPA (meduet_repa)")
    repa_layer: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="1-based DiT block whose tokens REPA aligns; None = a third of the depth"
    )
    cond_drop: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.2, description="probability of replacing content, style (and content tokens) by their null "
        "embeddings, for classifier-free guidance"
    )
    spatial_content: bool = Field(
        default=True, description="also condition on MeDUET's content tokens (translation: A's layout, B's style); "
        "false = global content and style vectors only, as the authors"
    )
    style_condition: Literal["crop", "volume"] = Field(
        default="volume", description="the style a training crop is conditioned on: volume = the style of the whole "
        "volume it came from (window mean, as extract-factors pools it and synthesize's site styles are made; "
        "measured better: README); crop = the crop's own teacher style (token mean, the sample's own factors)"
    )
    ema_decay: Annotated[float, Field(ge=0, le=1)] = Field(default=0.9999, description="EMA of the DiT's weights")
    amp: bool = Field(default=True, description="bf16 autocast when training on GPU")
    cpu_bf16: bool = Field(default=False, description="bf16 autocast on CPUs with native bf16 too")
    val_crops: Annotated[int, Field(ge=0)] = Field(
        default=32, description="held-out crops of the validation loss (fixed noise and timesteps); 0 skips it"
    )
    val_every: Annotated[int, Field(ge=0)] = Field(
        default=0, description="every this many steps the held-out validation loss of the weights joins the "
        "history (the convergence curve); a multiple of log_every; 0: only at the end"
    )
    log_every: Annotated[int, Field(ge=1)] = 10
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> TrainDiffusionConfig:
        if self.val_every % self.log_every:
            raise ValueError(f"val_every {self.val_every} must be a multiple of log_every {self.log_every} "
                             f"(validation values are written with the history rows)")
        preset = DIT_PRESETS[self.preset]
        if (self.crop,) * 3 != tuple(preset.input_size):
            raise ValueError(f"crop {self.crop} must equal preset {self.preset!r}'s input size {preset.input_size}")
        if self.repa_layer is not None and self.repa_layer > preset.depth:
            raise ValueError(f"repa_layer {self.repa_layer} exceeds preset {self.preset!r}'s depth {preset.depth}")
        return self

    @property
    def repa_block(self) -> int:
        """The block REPA aligns: ``repa_layer`` or a third of the preset's depth."""
        return self.repa_layer or max(1, DIT_PRESETS[self.preset].depth // 3)


class SynthesizeConfig(StrictModel):
    """Sampling the trained DiT (stage ``synthesize``): translations of held-out scans and new samples."""

    weights: Literal["ema", "model"] = Field(default="ema", description="the DiT's EMA or raw trained weights")
    sampling_steps: Annotated[int, Field(ge=1)] = Field(
        default=20, description="rflow: Euler steps; ddpm: deterministic DDIM steps over the 1000 (the authors "
        "sample 250 ancestral steps)"
    )
    ddpm_clip: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="ddpm only: clamp each step's estimate of the clean latent to +-this (scaled "
        "latent units; None: unbounded)"
    )
    content_scale: float = Field(default=1.0, description="guidance w_c: what content adds over nothing")
    style_scale: float = Field(default=1.0, description="guidance w_s: what style adds over content alone")
    translation_content: Literal["tokens", "vector"] = Field(
        default="tokens", description="what of scan A conditions each window of a translation: its content tokens "
        "(the layout kept) or only their mean, the authors' global content vector (to measure what tokens add)"
    )
    strength: Annotated[float, Field(gt=0, le=1)] = Field(
        default=1.0, description="translation starts from the source latent noised to this fraction of the "
        "path (1: pure noise, the anatomy comes from the content tokens alone)"
    )
    window_overlap: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.5, description="overlap of the sliding windows that tile a whole volume at every step "
        "(predictions averaged where they overlap)"
    )
    translations: Annotated[int, Field(ge=0)] = Field(
        default=12, description="(held-out scan, other site) translations, whole volume; 0 skips them"
    )
    samples_per_site: Annotated[int, Field(ge=0)] = Field(
        default=32, description="new crops per site from a training volume's content vector and the site's "
        "style (generation as the authors do it); 0 skips it. The Fréchet distance needs more crops in all than "
        "the evaluator has features (56 by default), or its covariance is rank-deficient"
    )
    generation_content: Literal["window", "volume"] = Field(
        default="volume", description="a generated crop's content vector: window = one window of a training volume "
        "that is at least min_body_fraction body (a crop's content, the vector the DiT is trained on); volume = "
        "the mean over a training volume's windows, as the authors generate (the default: window measured worse, "
        "Fréchet 35 x the floor against 28 x over 3 seeds, benchmarks/generation_content.py)"
    )
    body_threshold: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.05, description="window generation and texture: the share of the harmonized intensity range "
        "(b_min to b_max) above b_min beyond which a voxel is body "
        "(window generation: as train_evaluator's, whose body crops the generated ones are compared with)"
    )
    min_body_fraction: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.5, description="window generation: the content windows are at least this much body (as "
        "train_evaluator's)"
    )
    texture: Literal["none", "site"] = Field(
        default="none", description="site: each decoded image gets the target site's fine texture (noise and grain "
        "the VAE cannot carry), Gaussian noise fitted to what the site's training volumes lose in their VAE round "
        "trips (meduet.diffusion.texture); none (the default: site lowers the Fréchet ratio 4.8x and lifts the "
        "translations' style accuracy to 0.75, but drops their organ Dice ratio to 0.77 over 3 seeds; README): the "
        "decoder's output as it is"
    )
    texture_volumes_per_site: Annotated[int, Field(ge=1)] = Field(
        default=2, description="texture site: training volumes per site (first by key) the texture is fitted on"
    )
    augmentations_per_scan: Annotated[int, Field(ge=0)] = Field(
        default=0, description="each labelled training scan translated into this many other sites' styles, whole "
        "volume, for fine-tuning with style-swapped volumes (finetune_sweep.synthetic_arm); 0 skips them"
    )
    batch_size: Annotated[int, Field(ge=1)] = Field(default=64, description="windows per DiT forward")
    max_voxels_per_split: Annotated[int, Field(ge=1)] = Field(
        default=MAX_VOXELS_PER_SPLIT, description="whole-volume decode memory bound (the VAE's tensor splitting)"
    )
    workers: Annotated[int, Field(ge=1)] = Field(default=2, description="parallel sampling tasks on Ray (1: here)")
    seed: int = 0


# --------------------------------------------------------------------------- synthesis evaluation
class TrainEvaluatorConfig(StrictModel):
    """The synthesis evaluator (stage ``train-evaluator``): a small 3-D CNN with a site head and an
    organ-segmentation head, trained on random crops of the real harmonized train-split images."""

    channels: tuple[Annotated[int, Field(ge=1)], ...] = Field(
        default=(8, 16, 32), min_length=2, description="feature channels per level (each level halves the grid)"
    )
    crop_size: Size3 = Field(
        default=(32, 32, 32), description="training crop (D, H, W); each edge divisible by 2 ** len(channels)"
    )
    crops_per_site: Annotated[int, Field(ge=1)] = Field(
        default=2, description="crops of each site per step (a batch holds every site equally often)"
    )
    steps: Annotated[int, Field(ge=1)] = 300
    lr: PositiveFloat = 3e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    warmup_steps: Annotated[int, Field(ge=0)] = 10
    grad_clip: PositiveFloat = 1.0
    site_weight: Annotated[float, Field(ge=0)] = Field(default=1.0, description="weight of the site cross-entropy")
    seg_weight: Annotated[float, Field(ge=0)] = Field(default=1.0, description="weight of the organs' Dice + CE")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(default=0.1, description="dropout before the site head")
    overlap: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.25, description="sliding-window overlap of whole-volume segmentation (held-out Dice)"
    )
    max_voxels_per_pass: Annotated[int, Field(ge=1)] = Field(
        default=8_000_000, description="volumes up to this size are segmented in one pass, larger ones in "
        "overlapping crops"
    )
    body_threshold: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.05, description="the share of the harmonized intensity range (b_min to b_max) above b_min beyond "
        "which a voxel is body (air is b_min after windowing); on [0, 1] the intensity itself"
    )
    min_body_fraction: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.5, description="a volume's site is read from its grid crops at least this much body (air "
        "carries no site after windowing)"
    )
    batch_size: Annotated[int, Field(ge=1)] = Field(default=8, description="crops per forward pass in evaluation")
    log_every: Annotated[int, Field(ge=1)] = 10
    seed: int = 0

    @model_validator(mode="after")
    def _crop_fits_levels(self) -> TrainEvaluatorConfig:
        k = 2 ** len(self.channels)
        if any(c % k for c in self.crop_size):
            raise ValueError(f"every crop edge {self.crop_size} must divide by 2 ** len(channels) = {k}")
        return self


class EvaluateSynthesisConfig(StrictModel):
    """Measuring synthesized images with the frozen evaluator (stage ``evaluate-synthesis``)."""

    bootstrap: Annotated[int, Field(ge=10)] = Field(
        default=200, description="bootstrap resamples of every interval (Fréchet distance, Dice, MS-SSIM, HU)"
    )
    real_crops_per_volume: Annotated[int, Field(ge=1)] = Field(
        default=32, description="random body crops (the generated crops' size) drawn from each real volume; "
        "the held-out ones (floor of the Fréchet distance) should outnumber the evaluator's features (56)"
    )
    ms_ssim_kernel: Annotated[int, Field(ge=3)] = Field(
        default=5, description="MS-SSIM Gaussian window (odd); with ms_ssim_scales it must fit the generated "
        "crops (MONAI's check: crop edge // (scales - 1) ** 2 > kernel - 1; 32^3 crops: kernel <= 7 at 3 scales)"
    )
    ms_ssim_scales: Annotated[int, Field(ge=1, le=5)] = Field(
        default=3, description="MS-SSIM scales (the first of MONAI's five weights, renormalised)"
    )
    ssim_window: Annotated[int, Field(ge=3)] = Field(
        default=7, description="Gaussian window (odd) of the counterfactual's 3-D SSIM; 7 chosen when MONAI's "
        "default 11 cost 2.4x the time, kept so results stay comparable (with the separable filter 11 costs about "
        "the same: benchmarks/ssim.py)"
    )
    histogram_levels: Annotated[int, Field(ge=2)] = Field(
        default=256, description="histogram bins of the histogram-matching baseline (SimpleITK)"
    )
    match_points: Annotated[int, Field(ge=1)] = Field(
        default=7, description="quantile match points of the histogram-matching baseline"
    )
    subject_pattern: SubjectPattern = Field(
        default=r"_(\d+)$", description="regex whose first group is the subject in a case id: the real s@B of a "
        "translation of s@A (as evaluate_disentanglement.subject_pattern)"
    )
    max_voxels_per_split: Annotated[int, Field(ge=1)] = Field(
        default=MAX_VOXELS_PER_SPLIT, description="whole-volume VAE decode memory bound (round trips)"
    )
    figure_pairs: Annotated[int, Field(ge=0)] = Field(default=6, description="translation pairs drawn in pairs.png")
    seed: int = 0

    @field_validator("ms_ssim_kernel", "ssim_window")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"must be odd, got {value}")
        return value



# --------------------------------------------------------------------------- distributed training
# Ray Train's controller polls its workers every 2 s by default; a run waits for its polls as it starts,
# ends and checkpoints: at 0.25 s each run took ~4 s less (benchmarks/ray_fit_overhead.py, README).
TRAIN_POLL_S = 0.25


class RayConfig(StrictModel):
    """How training stages reach Ray Train (see ``meduet.distributed``)."""

    address: str | None = Field(
        default=None, description="Ray cluster address; None starts a local one (env RAY_ADDRESS overrides)"
    )
    num_workers: Annotated[int, Field(ge=1)] = 1
    use_gpu: bool = False
    cpus_per_worker: Annotated[float, Field(gt=0)] | Literal["auto"] = Field(
        default="auto", description="CPUs (and torch threads) per training worker; auto = the cluster's CPUs divided "
        "by num_workers, at most one node's (on a 2-core machine: both cores for one worker)"
    )
    cpus_per_task: Annotated[float, Field(gt=0)] = Field(
        default=1.0, description="CPUs (and torch threads) per Ray task of the data stages (harmonize, encode-latents, "
        "extract-factors, synthesize), which run one task per case side by side"
    )
    gpus_per_worker: Annotated[float, Field(ge=0)] = 1.0
    local_num_cpus: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="CPUs a stage may use on this machine: its local Ray cluster's, and the threads "
        "of the work it does itself; None = all of this machine"
    )
    stage_cpus: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict, description="local_num_cpus of named stages (dvc.yaml names), e.g. the ones nothing "
        "can run beside"
    )
    storage: str | None = Field(
        default=None, description="checkpoints/results: local path or s3:// URI; None = <work_dir>/ray_results"
    )
    exchange: str | None = Field(
        default=None, description="s3:// prefix (or a folder every node sees) through which the data stages' Ray "
        "tasks receive their inputs and return their outputs, for a cluster whose nodes share no file system; None = "
        "tasks read and write the project folder (one machine, or a shared file system at the same path)"
    )
    checkpoint_every: Annotated[int, Field(ge=1)] = 50
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2
    max_failures: Annotated[int, Field(ge=0)] = 1
    train_poll_s: Annotated[float, Field(gt=0)] = Field(
        default=TRAIN_POLL_S, description="how often Ray Train's controller polls its workers (Ray's default: 2 s); "
        "a run's start, its end and a checkpoint reported before the last one was collected each wait for a poll"
    )

    @field_validator("stage_cpus")
    @classmethod
    def _known_stages(cls, value: dict[str, int]) -> dict[str, int]:
        known = {report_dir_name(name) for name in STAGES}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}: use dvc.yaml's names, {sorted(known)}")
        return value

    @field_validator("exchange")
    @classmethod
    def _exchange_location(cls, value: str | None) -> str | None:
        if value is not None and not (value.startswith("s3://") or value.startswith("/")):
            raise ValueError(f"must be an s3://bucket/prefix URI or an absolute folder, got {value!r}")
        return value

    def cpus_for(self, stage: str) -> int | None:
        """CPUs ``stage`` (its dvc.yaml name) may use on this machine; None = all."""
        return self.stage_cpus.get(stage, self.local_num_cpus)


# --------------------------------------------------------------------------- orchestration
class OrchestrationConfig(StrictModel):
    """Prefect deployment of the whole pipeline; the stage graph itself lives in dvc.yaml."""

    deployment_name: str = "full-pipeline"
    cron: str | None = Field(default="0 3 * * 0", description="scheduled retraining; None disables the schedule")
    timezone: str = "UTC"
    task_retries: Annotated[int, Field(ge=0)] = 1
    retry_delay_s: Annotated[float, Field(ge=0)] = 10.0
    push: bool = Field(default=True, description="dvc push after the run when a remote is configured")
    parallel_stages: Annotated[int, Field(ge=1)] = Field(
        default=2, description="stages the flow runs side by side, each as soon as its upstream stages are done; on "
        "a local Ray only while their CPUs (ray.local_num_cpus, ray.stage_cpus; null: all) fit this machine's"
    )


class MeduetConfig(StrictModel):
    paths: PathsConfig = Field(default_factory=PathsConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    demo_data: DemoDataConfig = Field(default_factory=DemoDataConfig)
    harmonize: HarmonizeConfig = Field(default_factory=HarmonizeConfig)
    vae: VAEConfig = Field(default_factory=VAEConfig)
    encode_latents: EncodeLatentsConfig = Field(default_factory=EncodeLatentsConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    pretrain_mae: PretrainConfig = Field(
        default_factory=lambda: PretrainConfig(objective="mae"),
        description="the masked-autoencoder baseline (stage pretrain-mae): the pretrain section with these keys "
        "changed and objective mae, so both pretrainings differ only in what the baseline switches off"
    )
    extract_factors: ExtractFactorsConfig = Field(default_factory=ExtractFactorsConfig)
    evaluate_disentanglement: EvaluateDisentanglementConfig = Field(default_factory=EvaluateDisentanglementConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    finetune_sweep: FinetuneSweepConfig = Field(default_factory=FinetuneSweepConfig)
    train_diffusion: TrainDiffusionConfig = Field(default_factory=TrainDiffusionConfig)
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    train_evaluator: TrainEvaluatorConfig = Field(default_factory=TrainEvaluatorConfig)
    evaluate_synthesis: EvaluateSynthesisConfig = Field(default_factory=EvaluateSynthesisConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @model_validator(mode="before")
    @classmethod
    def _mae_inherits_pretrain(cls, data: Any) -> Any:
        """``pretrain_mae`` = ``pretrain`` updated by ``pretrain_mae``'s own keys (nested sections merged)."""
        if not isinstance(data, dict):
            return data
        base, own = data.get("pretrain") or {}, data.get("pretrain_mae") or {}
        if not isinstance(base, dict) or not isinstance(own, dict):
            return data  # field validation names the problem
        return {**data, "pretrain_mae": {**_merged(base, own), "objective": own.get("objective", "mae")}}

    @model_validator(mode="after")
    def _objectives(self) -> MeduetConfig:
        if self.pretrain.objective != "meduet":
            raise ValueError("pretrain.objective must be meduet (the stages after pretrain read MeDUET); the "
                             "masked-autoencoder baseline is section pretrain_mae")
        if self.pretrain_mae.objective != "mae":
            raise ValueError("pretrain_mae.objective must be mae")
        return self

    @model_validator(mode="after")
    def _generation_reads_body_as_the_evaluator(self) -> MeduetConfig:
        """Window generation draws crops of body as evaluate-synthesis's real crops are drawn: the same rule."""
        mine = (self.synthesize.body_threshold, self.synthesize.min_body_fraction)
        theirs = (self.train_evaluator.body_threshold, self.train_evaluator.min_body_fraction)
        if self.synthesize.generation_content == "window" and mine != theirs:
            raise ValueError(f"synthesize.body_threshold and min_body_fraction {mine} must equal train_evaluator's "
                             f"{theirs}: the generated crops are compared with real crops of that much body")
        return self


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update``'s keys, nested dicts merged key by key."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# --------------------------------------------------------------------------- resolved paths
@dataclass(frozen=True)
class Paths:
    """Absolute locations, resolved once from ``paths`` and the params file's folder.

    Also carries how to reach remote storage (``s3_options``), so stages can read
    ``s3://`` inputs without seeing the rest of the configuration.
    """

    root: Path
    demo: Path
    harmonized: Path
    reports: Path
    models: Path
    latents: Path
    factors: Path
    synthesis: Path
    work: Path
    s3_options: dict[str, Any]

    @classmethod
    def resolve(cls, cfg: MeduetConfig, root: str | os.PathLike[str]) -> Paths:
        root = Path(root).resolve()
        p = cfg.paths
        return cls(
            root=root,
            demo=root / p.demo_dir,
            harmonized=root / p.harmonized_dir,
            reports=root / p.reports_dir,
            models=root / p.models_dir,
            latents=root / p.latents_dir,
            factors=root / p.factors_dir,
            synthesis=root / p.synthesis_dir,
            work=root / p.work_dir,
            s3_options=s3_options(cfg.storage),
        )

    def local(self, path_or_uri: str) -> str | Path:
        """A params path as an absolute local path, or unchanged if it is a URI."""
        return path_or_uri if "://" in path_or_uri else self.root / path_or_uri


def s3_options(storage: StorageConfig) -> dict[str, Any]:
    """s3fs keyword arguments; environment variables override params (never secrets)."""
    endpoint = os.environ.get("MEDUET_S3_ENDPOINT_URL", storage.s3_endpoint_url)
    region = os.environ.get("MEDUET_S3_REGION", storage.s3_region)
    client_kwargs: dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if region:
        client_kwargs["region_name"] = region
    return {"client_kwargs": client_kwargs} if client_kwargs else {}


# --------------------------------------------------------------------------- loading
def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``["a.b=3", "c=[1,2]"]`` → ``{"a.b": 3, "c": [1, 2]}`` (values parsed as YAML)."""
    parsed: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key.path=value, got {item!r}")
        parsed[key.strip()] = yaml.safe_load(raw)
    return parsed


def format_validation_error(source: str, error: ValidationError, data: dict[str, Any]) -> str:
    lines = [f"{source}: invalid configuration ({error.error_count()} problem(s))"]
    for err in error.errors():
        key = ".".join(str(part) for part in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (value {err['input']!r})")
        else:
            lines.append(f"  {key} = {err.get('input')!r}: {err['msg']}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> MeduetConfig:
    try:
        return MeduetConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(source, error, data)) from None


def load_config(
    params: str | os.PathLike[str] = "params.yaml", overrides: list[str] | None = None
) -> MeduetConfig:
    """Read and validate a params file, applying ``key.path=value`` overrides first."""
    path = Path(params)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    for key, value in parse_overrides(overrides).items():
        _set_dotted(data, key, value)
    return config_from_dict(data, source=str(path))


def dump_config(cfg: MeduetConfig) -> str:
    """The fully resolved configuration as YAML (what ``meduet config show`` prints)."""
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


def config_hash(section: BaseModel) -> str:
    """Stable short hash of a config section (names runs, keys resumable work)."""
    payload = json.dumps(section.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]
