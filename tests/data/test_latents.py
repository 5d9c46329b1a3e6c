import numpy as np

from meduet.data.latents import (
    LatentRecord, latent_affine, load_latent, read_manifest, read_scale, save_array, write_manifest, write_scale,
)


def _record(key: str, shape: list[int]) -> LatentRecord:
    affine = latent_affine(np.diag([1.5, 1.5, 1.5, 1.0]) + np.array([[0, 0, 0, -10.0], [0] * 4, [0] * 4, [0] * 4]))
    return LatentRecord(key=key, dataset="ds", case_id=key, domain="site_b", domain_index=1, body_part="chest",
                        split="train", latent=f"ds/{key}.npy", latent_shape=shape, affine=affine.reshape(-1).tolist(),
                        orig_spacing=[0.9, 0.9, 2.5], image_sha256="ab" * 32, vae_sha256="cd" * 32)


def test_cache_round_trip_keeps_arrays_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    latents = {k: rng.normal(size=(4, 6, 8, 10)).astype(np.float32) for k in ("a", "b")}
    records = [_record(k, list(v.shape)) for k, v in latents.items()]
    for record, latent in zip(records, latents.values()):
        save_array(tmp_path / record.latent, latent)
    write_manifest(tmp_path, records)
    back = read_manifest(tmp_path)
    assert back == records
    for record in back:
        loaded = load_latent(tmp_path, record)
        assert isinstance(loaded, np.memmap)
        np.testing.assert_array_equal(loaded, latents[record.key])
    stats = write_scale(tmp_path, list(latents.values()))
    assert read_scale(tmp_path) == stats["scale_factor"]
    scaled = stats["scale_factor"] * np.concatenate([v.ravel() for v in latents.values()]).astype(np.float64)
    assert abs(scaled.std() - 1.0) < 1e-6


def test_latent_affine_maps_latent_voxels_to_the_centre_of_their_image_block():
    image = np.diag([1.5, 2.0, 3.0, 1.0])
    image[:3, 3] = [-10, 20, 5]
    latent = latent_affine(image)
    # latent voxel (1, 0, 2) covers image voxels 4..7, 0..3, 8..11 → centre 5.5, 1.5, 9.5
    expected = image @ np.array([5.5, 1.5, 9.5, 1.0])
    np.testing.assert_allclose(latent @ np.array([1, 0, 2, 1.0]), expected)
