"""The synthesis evaluator network: shapes, argument checks, and that it learns site on an easy set."""

import pytest
import torch

from meduet.models.architectures import EvaluatorArchitecture
from meduet.models.evaluator import EvaluatorNet


@pytest.mark.parametrize(("channels", "size"), [((4, 8), (16, 16, 16)), ((4, 8, 8), (16, 24, 32))])
def test_heads_and_features_have_the_documented_shapes(channels, size) -> None:
    model = EvaluatorNet(EvaluatorArchitecture(channels=channels, num_sites=3, num_labels=5)).eval()
    x = torch.rand(2, 1, *size)
    site, seg = model(x)
    assert site.shape == (2, 3) and seg.shape == (2, 5, *size)
    assert model.features(x).shape == (2, sum(channels)) == (2, model.config.feature_dim)
    torch.testing.assert_close(model.classify(x), site)


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="at least 2 positive levels"):
        EvaluatorArchitecture(channels=(8,), num_sites=2, num_labels=2)
    with pytest.raises(ValueError, match="num_sites and num_labels"):
        EvaluatorArchitecture(channels=(4, 8), num_sites=1, num_labels=2)
    model = EvaluatorNet(EvaluatorArchitecture(channels=(4, 8), num_sites=2, num_labels=2))
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.rand(1, 1, 16, 16, 18))


def _easy_sites(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same smooth 'anatomy'; site 0 quiet, site 1 with strong white noise and an intensity offset."""
    base = torch.nn.functional.avg_pool3d(torch.rand(n, 1, 12, 12, 12, generator=generator), 5, 1, 2)
    site = torch.arange(n) % 2
    noise = 0.15 * torch.randn(n, 1, 12, 12, 12, generator=generator)
    return base + site.view(-1, 1, 1, 1, 1) * (noise + 0.1), site


def test_evaluator_learns_site_on_an_easy_set() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = EvaluatorNet(EvaluatorArchitecture(channels=(4, 8), num_sites=2, num_labels=2, dropout=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        x, site = _easy_sites(8, generator)
        loss = torch.nn.functional.cross_entropy(model.classify(x), site)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, site = _easy_sites(32, generator)  # unseen samples
    with torch.no_grad():
        accuracy = (model.eval().classify(x).argmax(1) == site).float().mean()
    assert accuracy >= 0.85, accuracy  # chance: 0.5 (eval mode: batch-norm running statistics)
