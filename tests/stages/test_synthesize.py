"""synthesize: translations on the source's grid, generated crops, resume image by image (real Ray tasks)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from meduet.artifacts.diffusion import save_dit
from meduet.artifacts.factors import load_factors
from meduet.artifacts.synthesis import read_synthesis
from meduet.artifacts.vae import save_vae
from meduet.config import MeduetConfig, Paths
from meduet.data.latents import read_manifest, read_scale
from meduet.harmonize.manifest import CaseRecord, write_manifest
from meduet.harmonize.manifest import read_manifest as read_harmonized
from meduet.io.images import write_image
from meduet.models.architectures import DIT_PRESETS
from meduet.models.dit import ConditionedDiT
from meduet.models.vae import PRESETS as VAE_PRESETS
from meduet.models.vae import build_vae
from meduet.stages import StageError, extract_factors, synthesize
from tests.stages.test_factors import _save_tiny_model
from tests.stages.test_pretrain import _write_cache

SPACING = (1.5, 1.5, 1.5)


def _config(**overrides) -> MeduetConfig:
    return MeduetConfig.model_validate({
        "extract_factors": {"batch_size": 4},
        "synthesize": {"sampling_steps": 3, "translations": 2, "samples_per_site": 2, "batch_size": 4, "workers": 2,
                       **overrides},
        "ray": {"local_num_cpus": 2, "max_failures": 0},
    })


BODY = 40  # harmonized images are body in [:40, :40, :40] of 48^3: of the 8 windows of 32^3 (origins 0 and 16 per
BODY_WINDOWS = list(range(7))  # axis), all but the last (16, 16, 16) are at least half body (0.75^k, k axes at 16)


def _harmonized(paths: Paths) -> None:
    """A harmonized image per latent (4x its grid, a distinct origin each, body in a corner block, with white
    noise of sd 0.2 on it) and the manifest naming them."""
    records = []
    for n, latent in enumerate(read_manifest(paths.latents)):
        array = np.zeros([4 * s for s in latent.latent_shape[1:]], dtype=np.float32)
        array[:BODY, :BODY, :BODY] = 0.5 + 0.2 * np.random.default_rng(n).standard_normal((BODY,) * 3)
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(SPACING)
        image.SetOrigin((10.0 * n, -5.0, 2.5 * n))
        rel = f"{latent.dataset}/imagesTr/{latent.case_id}.nii.gz"
        write_image(image, paths.harmonized / rel)
        records.append(CaseRecord(key=latent.key, dataset=latent.dataset, case_id=latent.case_id,
                                  domain=latent.domain, body_part="x", split="train", status="ok", image=rel,
                                  out_spacing=list(SPACING), window=[-175.0, 250.0, 0.0, 1.0]))
    write_manifest(paths.harmonized / "manifest.csv", records)


def _project(root: Path, cfg: MeduetConfig) -> Paths:
    paths = Paths.resolve(cfg, root)
    _write_cache(paths.latents, per_domain=3)  # per site: 2 train, 1 held-out (4, 12, 12, 12) latent
    _save_tiny_model(paths, ["site_a", "site_b"], read_scale(paths.latents))
    extract_factors.run(cfg.extract_factors, paths, ray=cfg.ray)
    _harmonized(paths)
    torch.manual_seed(0)
    arch = dataclasses.replace(DIT_PRESETS["tiny"], content_dim=32, style_dim=8)
    dit = ConditionedDiT(arch)
    meduet_sha = hashlib.sha256((paths.models / "pretrain" / "meduet.pt").read_bytes()).hexdigest()
    save_dit(paths.models / "diffusion" / "dit.pt", model=dit.state_dict(), ema=dit.state_dict(), architecture=arch,
             config={"objective": "rflow", "flow_time": "uniform"}, scale_factor=read_scale(paths.latents),
             meduet_sha256=meduet_sha, init_report=None, steps=0, validation={})
    vae_arch = VAE_PRESETS["tiny"]
    save_vae(paths.models / "vae" / "vae.pt", state=build_vae(vae_arch).state_dict(), architecture=vae_arch,
             config={}, train_cases=[], held_out_cases=[])
    return paths


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory):
    cfg = _config()
    paths = _project(tmp_path_factory.mktemp("synthesis_project"), cfg)
    return cfg, paths, synthesize.run(cfg.synthesize, paths, ray=cfg.ray)


def test_translations_lie_on_the_source_grid_and_crops_on_the_dit_input(synthesized) -> None:
    cfg, paths, result = synthesized
    records, meta = read_synthesis(paths.synthesis)
    translations = [r for r in records if r.kind == "translation"]
    generated = [r for r in records if r.kind == "generation"]
    # the held-out volume of each site, into the other site's style; 2 crops per site
    assert sorted((r.source_key, r.target_site) for r in translations) == [
        ("site_a__case2", "site_b"), ("site_b__case2", "site_a")]
    assert all(r.source_split == "held_out" for r in translations)
    assert sorted(r.target_site for r in generated) == ["site_a", "site_a", "site_b", "site_b"]
    assert all(r.source_split == "train" for r in generated)
    harmonized = {case.key: case for case in read_harmonized(paths.harmonized / "manifest.csv")}
    for record in translations:
        header = sitk.ReadImage(str(paths.harmonized / harmonized[record.source_key].image))
        image = sitk.ReadImage(str(paths.synthesis / record.image))
        assert image.GetSize() == header.GetSize() == (48, 48, 48)
        assert image.GetOrigin() == header.GetOrigin() and image.GetSpacing() == header.GetSpacing()
        assert np.load(paths.synthesis / record.latent).shape == (4, 12, 12, 12)
    for record in generated:
        assert sitk.ReadImage(str(paths.synthesis / record.image)).GetSize() == (32, 32, 32)
        assert np.isfinite(np.load(paths.synthesis / record.latent)).all()
    assert len({r.seed for r in records}) == len(records)
    assert meta["objective"] == "rflow" and set(meta["site_styles"]) == {"site_a", "site_b"}
    assert result.metrics["translations"] == 2 and result.metrics["generated"] == 4
    stds = [float(np.load(paths.synthesis / r.latent).std()) for r in records]
    assert result.metrics["latent_std_mean"] == pytest.approx(np.mean(stds), abs=1e-4)
    for figure in ("translations.png", "generated.png"):
        assert (paths.reports / "synthesize" / figure).stat().st_size > 2000


def test_window_generation_draws_the_content_of_training_windows_that_are_mostly_body(synthesized,
                                                                                    tmp_path: Path) -> None:
    cfg, paths, _ = synthesized
    arrays, factor_records, meta = load_factors(paths.factors)
    harmonized = {r.key: paths.harmonized / r.image for r in read_harmonized(paths.harmonized / "manifest.csv")}
    window = cfg.synthesize.model_copy(update={"generation_content": "window"})
    level = window.body_threshold  # the fixture harmonizes to [0, 1]: the share is the intensity
    donors = synthesize.content_donors(window, arrays=arrays, factor_records=factor_records,
                                       harmonized_images=harmonized, window=tuple(meta["window"]), body_level=level)
    train = [r for r in factor_records if r.split == "train"]
    assert sorted((d.volume.key, d.window) for d in donors) == sorted((r.key, i) for r in train for i in BODY_WINDOWS)
    for donor in donors:  # each row is that window of that volume
        rows = np.flatnonzero(arrays["window_volume"] == donor.volume.row)
        assert donor.array == "teacher_window_content" and donor.row == rows[donor.window]
    volume = synthesize.content_donors(cfg.synthesize, arrays=arrays, factor_records=factor_records,
                                       harmonized_images=harmonized, window=tuple(meta["window"]), body_level=level)
    assert [(d.volume.key, d.array, d.row, d.window) for d in volume] == [
        (r.key, "teacher_content", r.row, None) for r in train]
    stricter = window.model_copy(update={"min_body_fraction": 0.6})  # 0.5625 windows (2 axes at 16) drop out
    assert {d.window for d in synthesize.content_donors(stricter, arrays=arrays, factor_records=factor_records,
                                                        harmonized_images=harmonized, body_level=level,
                                                        window=tuple(meta["window"]))} == {0, 1, 2, 4}
    with pytest.raises(StageError, match="no window of a training volume is 50% body"):  # the body block is
        synthesize.content_donors(window, arrays=arrays, factor_records=factor_records,  # 0.5 + N(0, 0.2): none
                                  harmonized_images=harmonized, window=tuple(meta["window"]), body_level=2.0)
    # the stage: every generated crop names its window, drawn at the seed of the volume run's crop
    here = dataclasses.replace(paths, synthesis=tmp_path / "synthesis", reports=tmp_path / "reports")
    synthesize.run(window.model_copy(update={"workers": 1}), here, ray=cfg.ray)
    records, meta = read_synthesis(here.synthesis)
    records = [r for r in records if r.kind == "generation"]
    assert len(records) == 4 and all(r.source_window in BODY_WINDOWS for r in records)
    assert meta["settings"]["generation_content"] == "window"
    by_volume, _ = read_synthesis(paths.synthesis)
    for record in records:
        twin = next(r for r in by_volume if r.key == record.key)
        assert twin.source_window is None and twin.seed == record.seed


def test_site_texture_adds_noise_to_the_body_of_the_same_decodes(synthesized, tmp_path: Path) -> None:
    cfg, paths, _ = synthesized
    here = dataclasses.replace(paths, synthesis=tmp_path / "synthesis", reports=tmp_path / "reports")
    synthesize.run(cfg.synthesize.model_copy(update={"texture": "site", "workers": 1}), here, ray=cfg.ray)
    records, meta = read_synthesis(here.synthesis)
    plain = {r.key: r for r in read_synthesis(paths.synthesis)[0]}
    textures = meta["site_textures"]
    assert set(textures) == {"site_a", "site_b"} and all(t["amplitude"] > 0 for t in textures.values())
    low, high = meta["value_range"]
    threshold = cfg.synthesize.body_threshold
    for record in records:
        twin = plain[record.key]
        assert twin.seed == record.seed
        np.testing.assert_array_equal(np.load(here.synthesis / record.latent), np.load(paths.synthesis / twin.latent))
        image, bare = (sitk.GetArrayFromImage(sitk.ReadImage(str(root / r.image))) for root, r in
                       ((here.synthesis, record), (paths.synthesis, twin)))
        body = bare > threshold
        np.testing.assert_array_equal(image[~body], bare[~body])  # air untouched
        added = (image - bare)[body & (bare > low + 0.2) & (bare < high - 0.2)]  # away from the clipping
        assert image[body].min() >= low and image[body].max() <= high
        assert added.std() == pytest.approx(textures[record.target_site]["amplitude"], rel=0.25)


def test_window_generation_must_read_body_as_the_evaluator_does() -> None:
    with pytest.raises(ValueError, match="must equal train_evaluator's"):
        MeduetConfig.model_validate({"synthesize": {"generation_content": "window", "min_body_fraction": 0.3}})
    MeduetConfig.model_validate({"synthesize": {"generation_content": "volume", "min_body_fraction": 0.3}})


def test_a_rerun_remakes_only_what_is_missing_and_bit_identically(synthesized) -> None:
    cfg, paths, _ = synthesized
    records, _ = read_synthesis(paths.synthesis)
    lost, kept = records[0], records[1]
    before = np.load(paths.synthesis / lost.latent)
    kept_mtime = (paths.synthesis / kept.image).stat().st_mtime_ns
    (paths.synthesis / lost.image).unlink()
    rerun = synthesize.run(cfg.synthesize.model_copy(update={"workers": 1}), paths, ray=cfg.ray)  # workers: not part
    assert (paths.synthesis / kept.image).stat().st_mtime_ns == kept_mtime  # of the run key
    np.testing.assert_array_equal(np.load(paths.synthesis / lost.latent), before)
    assert rerun.metrics["translations"] == 2 and rerun.metrics["generated"] == 4


def test_augmentations_translate_labelled_training_scans_and_reuse_the_other_images(synthesized) -> None:
    cfg, paths, _ = synthesized
    before, _ = read_synthesis(paths.synthesis)
    mtimes = {r.key: (paths.synthesis / r.image).stat().st_mtime_ns for r in before}
    cases = read_harmonized(paths.harmonized / "manifest.csv")
    labelled = [c.model_copy(update={"label": c.image}) if c.case_id != "case0" else c for c in cases]
    write_manifest(paths.harmonized / "manifest.csv", labelled)  # case0 of each site has no labels
    try:
        result = synthesize.run(cfg.synthesize.model_copy(update={"augmentations_per_scan": 1}), paths, ray=cfg.ray)
    finally:
        write_manifest(paths.harmonized / "manifest.csv", cases)
    records, _ = read_synthesis(paths.synthesis)
    augmentations = [r for r in records if r.kind == "augmentation"]
    # the labelled training scan of each site, into the other site's style, on its own grid
    assert sorted((r.source_key, r.target_site) for r in augmentations) == [
        ("site_a__case1", "site_b"), ("site_b__case1", "site_a")]
    assert all(r.source_split == "train" and r.image.startswith("augmentations/") for r in augmentations)
    harmonized = {case.key: case for case in cases}
    for record in augmentations:
        header = sitk.ReadImage(str(paths.harmonized / harmonized[record.source_key].image))
        assert sitk.ReadImage(str(paths.synthesis / record.image)).GetOrigin() == header.GetOrigin()
    # the other images are those of the run before, untouched, with their seeds
    assert {r.key: r.seed for r in records if r.kind != "augmentation"} == {r.key: r.seed for r in before}
    assert all((paths.synthesis / r.image).stat().st_mtime_ns == mtimes[r.key] for r in before)
    assert result.metrics["augmentations"] == 2 and result.metrics["translations"] == 2
    assert len({r.seed for r in records}) == len(records)


def test_other_settings_start_the_store_afresh(synthesized) -> None:
    cfg, paths, _ = synthesized
    before = {p.name for p in (paths.synthesis / "records").iterdir()}
    changed = cfg.synthesize.model_copy(update={"samples_per_site": 1, "translations": 1, "workers": 1,
                                                "translation_content": "vector"})  # the authors' global content
    result = synthesize.run(changed, paths, ray=cfg.ray)
    records, meta = read_synthesis(paths.synthesis)
    assert result.metrics["translations"] == 1 and len(records) == 3
    assert meta["settings"]["translation_content"] == "vector"
    run_keys = [p for p in (paths.synthesis / "records").iterdir()]
    assert len(run_keys) == 1 and run_keys[0].name not in before  # the old run's records are gone...
    assert len(list(run_keys[0].glob("*.json"))) == 3
    images = sorted(p.relative_to(paths.synthesis).as_posix() for p in paths.synthesis.rglob("*.nii.gz"))
    assert images == sorted(r.image for r in records)  # ...and so are its images


def test_a_dit_of_another_meduet_file_is_refused(synthesized, tmp_path: Path) -> None:
    cfg, paths, _ = synthesized
    other = Paths.resolve(cfg, tmp_path)
    for folder in ("latents", "factors", "harmonized"):
        getattr(other, folder).parent.mkdir(parents=True, exist_ok=True)
        getattr(other, folder).symlink_to(getattr(paths, folder))
    other.models.mkdir(parents=True)
    for model in ("diffusion", "vae"):
        (other.models / model).symlink_to(paths.models / model)
    _save_tiny_model(other, ["site_a", "site_b", "site_c"], 1.0)  # another MeDUET file
    with pytest.raises(StageError, match="not the MeDUET file the DiT"):
        synthesize.run(cfg.synthesize, other, ray=cfg.ray)
