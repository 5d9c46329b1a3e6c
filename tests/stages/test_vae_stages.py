"""train-vae and encode-latents on a tiny harmonized dataset (a real local Ray)."""

import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from meduet.artifacts.vae import load_vae
from meduet.config import MeduetConfig, Paths
from meduet.data.latents import load_latent, read_manifest, read_scale
from meduet.harmonize.manifest import read_manifest as read_harmonized
from meduet.models.vae import PRESETS, build_vae, encode_volume
from meduet.stages import StageError, encode_latents, train_vae
from tests.stages.trainers import TRAINERS

VAE = TRAINERS["train-vae"]


@pytest.fixture(scope="module")
def trained(uninterrupted_run) -> tuple[MeduetConfig, Paths]:
    """Two sites of two phantoms harmonized to 2 mm and the VAE trained on them: the session's
    uninterrupted train-vae run (tests/stages/trainers.py), also the kill/resume test's reference."""
    root = uninterrupted_run("train-vae")
    cfg = MeduetConfig.model_validate({**VAE.params, "encode_latents": {"workers": 2, "store_std": True}})
    return cfg, Paths.resolve(cfg, root)


def test_train_vae_writes_weights_metrics_and_figures(trained):
    cfg, paths = trained
    saved = torch.load(paths.models / "vae" / "vae.pt", weights_only=True)
    assert saved["held_out_cases"] == ["site_a__site_a_1", "site_b__site_b_1"]  # one per site
    assert saved["config"]["steps"] == VAE.steps and saved["architecture"]["num_channels"] == [8, 16, 32]
    metrics = json.loads((paths.reports / "train_vae" / "metrics.json").read_text())
    assert metrics["evaluated_on"] == "held_out" and set(metrics["per_site"]) == {"site_a", "site_b"}
    for site in metrics["per_site"].values():  # finite, plausible numbers (NaN fails every comparison)
        assert site["cases"] == 1 and 0 < site["psnr"] < 60 and -1 <= site["ssim"] <= 1 and 0 < site["mae_raw"] < 1000
    overall = metrics["overall"]  # over the 2 held-out volumes, each mean with its bootstrap interval
    for key in ("psnr", "ssim", "mae_raw"):
        interval = overall[f"{key}_ci95"]
        assert interval is None or interval[0] <= round(overall[key], 4) <= interval[1]
    assert overall["psnr_ci95"] is not None  # two volumes never reconstruct equally well
    assert 0 < metrics["final_loss"] < 10
    history = (paths.reports / "train_vae" / "history.csv").read_text().splitlines()
    assert history[0].startswith("step,loss") and len(history) == 1 + VAE.steps
    for figure in ("loss.png", "reconstructions.png"):
        assert (paths.reports / "train_vae" / figure).stat().st_size > 2000


def test_pretrained_weights_skip_training_and_mismatches_are_named(trained, tmp_path, caplog):
    cfg, paths = trained
    weights = tmp_path / "autoencoder.pt"
    torch.save({"state_dict": torch.load(paths.models / "vae" / "vae.pt", weights_only=True)["state_dict"]}, weights)
    other = Paths.resolve(cfg, tmp_path)
    other = Paths(**{**other.__dict__, "harmonized": paths.harmonized})
    with caplog.at_level(logging.INFO, logger="meduet.progress"):
        result = train_vae.run(cfg.vae.model_copy(update={"pretrained": str(weights)}), other, ray=cfg.ray)
    assert "final_loss" not in result.metrics
    evaluation = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train_vae-evaluation:")]
    assert [line.split(",")[0] for line in evaluation] == ["train_vae-evaluation: 1/2 cases (50%)",
                                                           "train_vae-evaluation: 2/2 cases (100%)"]
    # every declared output exists, the history empty (dvc.yaml lists it as a plot)
    assert (other.reports / "train_vae" / "history.csv").read_text() == "step,loss,l1,g_adv,d_loss\n"
    supplied = torch.load(weights, weights_only=True)["state_dict"]
    saved = torch.load(other.models / "vae" / "vae.pt", weights_only=True)["state_dict"]
    assert saved.keys() == supplied.keys()
    for key, value in supplied.items():  # exactly the supplied weights, not a fresh or trained model
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0, msg=key)
    torch.save(build_vae(PRESETS["small"]).state_dict(), weights)
    with pytest.raises(StageError, match=r"autoencoder.pt: weights do not match .* with another shape"):
        train_vae.run(cfg.vae.model_copy(update={"pretrained": str(weights)}), other, ray=cfg.ray)


def test_encode_latents_caches_means_with_metadata_and_resumes(trained):
    cfg, paths = trained
    result = encode_latents.run(cfg.encode_latents, paths, ray=cfg.ray)
    assert (result.metrics["cases"], result.metrics["encoded"]) == (4, 4), result.metrics
    records = {r.key: r for r in read_manifest(paths.latents)}
    harmonized = {r.key: r for r in read_harmonized(paths.harmonized / "manifest.csv")}
    model = load_vae(paths.models / "vae" / "vae.pt")[0]
    for key, record in records.items():
        source = harmonized[key]
        assert record.latent_shape == [4, *(n // 4 for n in reversed(source.out_size))]  # (C, d, h, w)
        assert record.split == ("held_out" if key.endswith("_1") else "train")
        assert record.domain_index == ["site_a", "site_b"].index(record.domain)
        image = sitk.ReadImage(str(paths.harmonized / source.image))
        volume = torch.from_numpy(sitk.GetArrayFromImage(image))[None, None]
        np.testing.assert_allclose(load_latent(paths.latents, record), encode_volume(model, volume, 10**9)[0][0],
                                   atol=1e-5)
        # the latent affine sends latent voxel (0,0,0) to the centre of image voxels 0..3
        affine = np.array(record.affine).reshape(4, 4)
        first_centre = np.array(image.TransformContinuousIndexToPhysicalPoint((1.5, 1.5, 1.5))) * [-1, -1, 1]
        np.testing.assert_allclose(affine[:3, 3], first_centre, atol=1e-4)
        assert (paths.latents / record.latent_std).is_file()
    assert read_scale(paths.latents) > 0

    again = encode_latents.run(cfg.encode_latents, paths, ray=cfg.ray)
    assert (again.metrics["encoded"], again.metrics["reused"]) == (0, 4)


def test_encode_latents_killed_before_its_manifest_resumes_from_per_case_records(trained):
    cfg, paths = trained
    encode_latents.run(cfg.encode_latents, paths, ray=cfg.ray)
    latents = {p: p.read_bytes() for p in paths.latents.rglob("*.npy")}
    # A run killed after encoding every case but before writing its manifest; one case's
    # record was torn mid-write, so that case (only) is encoded again.
    (paths.latents / "manifest.csv").unlink()
    torn = paths.latents / "records" / "site_b__site_b_1.json"
    torn.write_text(torn.read_text()[:40])
    again = encode_latents.run(cfg.encode_latents, paths, ray=cfg.ray)
    assert (again.metrics["encoded"], again.metrics["reused"]) == (1, 3)
    assert {p: p.read_bytes() for p in paths.latents.rglob("*.npy")} == latents  # same latents, none lost
    assert len(read_manifest(paths.latents)) == 4 and torn.read_text().startswith("{")


def test_broken_vae_file_is_a_clear_error(trained, tmp_path):
    path = tmp_path / "vae.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(StageError, match=r"vae.pt: not a readable VAE checkpoint"):
        load_vae(path)
    with pytest.raises(StageError, match="run the train-vae stage first"):
        load_vae(tmp_path / "missing.pt")
