from pathlib import Path

import torch

from meduet.data.volumes import CropSampler, Volume, holdout_split


def test_holdout_split_is_per_site_and_deterministic():
    volumes = [Volume(f"{site}_{i}", site, Path(f"{site}_{i}.nii.gz"), (-175, 250, 0, 1))
               for site in ("a", "b") for i in range(4)] + [Volume("c_0", "c", Path("c.nii.gz"), (0, 1, 0, 1))]
    train, held = holdout_split(volumes, 0.25)
    assert [v.key for v in held] == ["a_3", "b_3"]  # one per site; the single-case site keeps its case
    assert len(train) == 7 and holdout_split(volumes, 0.25) == (train, held)
    assert holdout_split(volumes, 0.0) == (volumes, [])


def test_crop_sampler_batches_depend_only_on_seed_step_and_rank():
    volumes = [torch.rand(1, 20, 24, 28), torch.rand(1, 8, 40, 40)]
    sampler = CropSampler(volumes, (16, 16, 16), seed=3)
    batch = sampler.batch(step=5, batch_size=3)
    assert batch.shape == (3, 1, 16, 16, 16)
    torch.testing.assert_close(batch, CropSampler(volumes, (16, 16, 16), seed=3).batch(step=5, batch_size=3))
    assert not torch.equal(batch, sampler.batch(step=6, batch_size=3))
    assert not torch.equal(batch, sampler.batch(step=5, batch_size=3, rank=1))
