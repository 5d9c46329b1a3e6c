"""meduet.diffusion.texture: a site's fine texture measured against round trips and drawn back."""

import numpy as np
import pytest
import torch

from meduet.diffusion.texture import SiteTexture, add_texture, blur, fit_texture, missing_variances, unit_noise

SHAPE = (64, 64, 64)


def _scan(sigma: float, amplitude: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth 'anatomy' (what a round trip keeps) and it plus known texture (the real scan)."""
    generator = torch.Generator().manual_seed(seed)
    anatomy = 0.5 + 3 * blur(torch.randn(SHAPE, generator=generator, dtype=torch.float64), 6.0)
    return (anatomy + amplitude * unit_noise(SHAPE, sigma, generator)).float(), anatomy.float()


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_the_fit_finds_the_noise_a_round_trip_lost(sigma: float) -> None:
    fitted = fit_texture(missing_variances([_scan(sigma, 0.05, seed) for seed in (0, 1)], threshold=-np.inf))
    assert fitted.sigma == sigma and fitted.amplitude == pytest.approx(0.05, rel=0.03)


def test_nothing_is_fitted_where_the_round_trip_has_as_much_texture_as_the_scan() -> None:
    real, _ = _scan(0.0, 0.05, 0)
    assert fit_texture(missing_variances([(real, real)], threshold=-np.inf)) == SiteTexture(0.0, 0.0)


def test_texture_lands_on_body_voxels_only_within_the_range_and_follows_the_generator() -> None:
    image = torch.zeros(SHAPE)
    image[8:40, 8:40, 8:40] = 0.5
    image[20:24, 20:24, 20:24] = 0.99  # near the top: clipped
    texture = SiteTexture(amplitude=0.05, sigma=1.0)

    def draw(seed: int) -> torch.Tensor:
        return add_texture(image, texture, threshold=0.05, value_range=(0.0, 1.0),
                           generator=torch.Generator().manual_seed(seed))
    out = draw(0)
    assert torch.equal(out[image <= 0.05], image[image <= 0.05]) and out.max() <= 1.0
    added = (out - image)[8:20, 8:40, 8:40]
    assert float(added.std()) == pytest.approx(0.05, rel=0.1) and abs(float(added.mean())) < 0.005
    assert torch.equal(draw(0), out) and not torch.equal(draw(1), out)
    assert torch.equal(add_texture(image, SiteTexture(0.0, 0.0), threshold=0.05, value_range=(0.0, 1.0),
                                   generator=torch.Generator()), image)
