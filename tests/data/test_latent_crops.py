"""LatentCropSampler: shapes, scaling, padding, labels and (seed, step, rank) determinism."""

from pathlib import Path

import numpy as np
import pytest
import torch

from meduet.data.latent_crops import GroupedCropSampler, LatentCropSampler, pair_across_sites
from meduet.data.latents import LatentRecord, save_array, write_manifest, write_scale


def _latents(root: Path, shapes: list[tuple[int, ...]]) -> list[Path]:
    rng = np.random.default_rng(0)
    return [save_array(root / f"l{i}.npy", rng.normal(size=shape).astype(np.float32)) for i, shape in enumerate(shapes)]


@pytest.mark.parametrize("crop", [4, 6])
def test_batch_shapes_labels_and_determinism(tmp_path, crop):
    paths = _latents(tmp_path, [(4, 10, 9, 8), (4, 8, 8, 12)])
    sampler = LatentCropSampler(paths, [0, 1], crop, scale=1.0, seed=3)
    x, domain = sampler.batch(step=5, batch_size=6, rank=1)
    assert x.shape == (6, 4, crop, crop, crop) and x.dtype == torch.float32
    assert domain.dtype == torch.int64 and set(domain.tolist()) <= {0, 1}
    again_x, again_domain = LatentCropSampler(paths, [0, 1], crop, scale=1.0, seed=3).batch(5, 6, 1)
    assert torch.equal(x, again_x) and torch.equal(domain, again_domain)  # a resumed run sees the same batch
    assert not torch.equal(x, sampler.batch(5, 6, 0)[0])  # another worker
    assert not torch.equal(x, sampler.batch(6, 6, 1)[0])  # another step
    assert not torch.equal(x, LatentCropSampler(paths, [0, 1], crop, scale=1.0, seed=4).batch(5, 6, 1)[0])


def test_whole_latent_crop_is_a_scaled_flip_or_rotation(tmp_path):
    (path,) = _latents(tmp_path, [(4, 4, 4, 4)])
    latent = torch.from_numpy(np.load(path))
    x, domain = LatentCropSampler([path], [1], 4, scale=2.5, seed=0).batch(0, 8)
    assert domain.tolist() == [1] * 8
    for crop in x:
        # the same values in another arrangement; each channel keeps its own values
        torch.testing.assert_close(crop.flatten(1).sort().values, (2.5 * latent).flatten(1).sort().values)
    assert len({tuple(crop.flatten().tolist()) for crop in x}) > 1  # augmentations vary


def test_small_latents_are_zero_padded(tmp_path):
    (path,) = _latents(tmp_path, [(4, 3, 8, 5)])
    x, _ = LatentCropSampler([path], [0], 6, scale=1.0, seed=0).batch(0, 4)
    assert x.shape == (4, 4, 6, 6, 6)
    # 3 * 6 * 5 of the 6^3 voxels per channel hold latent values; the rest is padding
    assert all(int((crop[0] != 0).sum()) == 3 * 6 * 5 for crop in x)


def test_from_cache_reads_the_scale_and_labels(tmp_path):
    paths = _latents(tmp_path, [(4, 6, 6, 6), (4, 6, 6, 6)])
    stats = write_scale(tmp_path, [np.load(p) for p in paths])
    records = [LatentRecord(key=f"k{i}", dataset="d", case_id=f"c{i}", domain=f"site_{i}", domain_index=i,
                            body_part="x", split="train", latent=p.name, latent_shape=[4, 6, 6, 6],
                            affine=list(np.eye(4).ravel()), orig_spacing=[1.0, 1.0, 1.0], image_sha256="0",
                            vae_sha256="0") for i, p in enumerate(paths)]
    write_manifest(tmp_path, records)
    sampler = LatentCropSampler.from_cache(tmp_path, records, 6, seed=0)
    assert sampler.scale == pytest.approx(stats["scale_factor"]) and sampler.domains == [0, 1]


def test_invalid_inputs_are_named(tmp_path):
    paths = _latents(tmp_path, [(4, 6, 6, 6), (6, 6, 6)])
    with pytest.raises(ValueError, match="no training latents"):
        LatentCropSampler([], [], 4, 1.0, 0)
    with pytest.raises(ValueError, match="2 latents but 1 domain labels"):
        LatentCropSampler(paths, [0], 4, 1.0, 0)
    with pytest.raises(ValueError, match=r"l1.npy: expected a \(C, d, h, w\) latent"):
        LatentCropSampler(paths, [0, 1], 4, 1.0, 0)


def test_each_crop_carries_the_site_label_of_the_latent_it_was_cut_from(tmp_path):
    # Three latents, each a constant (its id), with site labels in another order than the files.
    paths = [save_array(tmp_path / f"l{i}.npy", np.full((4, 9, 9, 9), float(i + 1), np.float32)) for i in range(3)]
    site_of = {1.0: 2, 2.0: 0, 3.0: 1}
    sampler = LatentCropSampler(paths, [2, 0, 1], 6, scale=0.5, seed=0)
    seen = set()
    for step in range(4):
        x, domain = sampler.batch(step, 8)
        for crop, site in zip(x, domain.tolist(), strict=True):
            values = crop.unique()
            assert len(values) == 1  # one source latent per crop, no padding at this size
            source = float(values[0]) / 0.5
            assert site == site_of[source], (source, site)
            seen.add(source)
    assert seen == {1.0, 2.0, 3.0}


def _constant_latents(root: Path, count: int) -> list[Path]:
    """Latents filled with their own id 1..count, so every crop names its source."""
    return [save_array(root / f"c{i}.npy", np.full((4, 9, 9, 9), float(i + 1), np.float32)) for i in range(count)]


def test_pair_across_sites_crosses_whenever_possible():
    sites = [0, 0, 0, 1, 1, 2]
    for volumes in ([0, 1, 3, 4], [0, 1, 2, 3, 4, 5], [0, 3, 1, 5]):
        ordered = pair_across_sites(volumes, sites)
        assert sorted(ordered) == sorted(volumes)
        assert all(sites[ordered[g]] != sites[ordered[-1 - g]] for g in range(len(ordered) // 2)), ordered
    assert sorted(pair_across_sites([0, 1, 2, 3], sites)) == [0, 1, 2, 3]  # 3 of site 0: one pair cannot cross


def test_grouped_batch_layout_partners_and_epochs(tmp_path):
    sites = [0, 0, 1, 1, 2, 2, 3, 3]
    sampler = GroupedCropSampler(_constant_latents(tmp_path, 8), sites, 6, scale=1.0, seed=0, crops_per_volume=2,
                                 cross_site_partners=True, epoch_sampling=True)
    seen = []
    for step in range(4):  # 4 volumes per step, 8 volumes: two epochs
        x, domain, group, canonical = sampler.grouped_batch(step, 8)
        assert group.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and canonical.shape == x.shape
        source = [int(crop.unique().item()) - 1 for crop in x]
        assert source[0::2] == source[1::2]  # the crops of a slot come from one volume
        assert domain.tolist() == [sites[v] for v in source]
        assert all(domain[i] != domain[7 - i] for i in range(8))  # partners i, B-1-i cross sites
        seen += source[0::2]
        again = sampler.grouped_batch(step, 8)
        assert torch.equal(x, again[0])  # (seed, step) alone decide a batch: resumable
    assert sorted(seen[:8]) == list(range(8)) and sorted(seen[8:]) == list(range(8))  # each volume once an epoch
    with pytest.raises(ValueError, match="multiple of 2 x 2"):
        sampler.grouped_batch(0, 6)


def test_canonical_crops_are_the_augmented_crops_before_flips_and_rotations(tmp_path):
    rng = np.random.default_rng(0)
    paths = [save_array(tmp_path / f"r{i}.npy", rng.normal(size=(2, 9, 9, 9)).astype(np.float32)) for i in range(2)]
    sampler = GroupedCropSampler(paths, [0, 1], 6, scale=2.0, seed=0)
    x, _, _, canonical = sampler.grouped_batch(3, 8)
    for crop, plain in zip(x, canonical):
        # some flip/rot90 of the canonical crop (the 48 symmetries of a cube include it) ...
        found = any(torch.equal(crop, torch.rot90(plain.flip(flips), k, dims=plane)) for flips in
                    ([], [1], [2], [3], [1, 2], [1, 3], [2, 3], [1, 2, 3]) for plane in ((1, 2), (1, 3), (2, 3))
                    for k in range(4))
        assert found
        # ... cut from the latent in its stored orientation: a window of one of the (scaled) sources
        windows = [torch.from_numpy(np.load(p))[:, i:i + 6, j:j + 6, k:k + 6] * 2.0 for p in paths
                   for i in range(4) for j in range(4) for k in range(4)]
        assert any(torch.equal(plain, w) for w in windows)
