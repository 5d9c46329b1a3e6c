"""Body context: the outline holds the lungs and not the table; positions run from -1 to +1 across the body."""

from __future__ import annotations

import numpy as np
import pytest

from meduet.data.body import CHANNELS, body_channels, body_mask, segmenter_image


def _torso() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A harmonized ``(D, H, W)`` torso in [0, 1]: a tissue cylinder with two air-dark lungs, on a separate table."""
    z, y, x = np.meshgrid(np.arange(24), np.arange(40), np.arange(48), indexing="ij")
    body = ((x - 24) / 18) ** 2 + ((y - 18) / 12) ** 2 < 1  # the body runs x 7..41, y 7..29
    lungs = (((np.abs(x - 24) - 8) / 5) ** 2 + ((y - 18) / 7) ** 2 < 1) & (z > 4) & (z < 20)
    table = (y >= 33) & (y <= 35)  # below the body, separated by air
    image = np.zeros(z.shape, np.float32)
    image[body] = 0.45
    image[lungs] = 0.0  # below the CT window, as air
    image[table] = 0.9
    image += np.random.default_rng(0).normal(0, 0.002, image.shape).astype(np.float32) * (image > 0)
    return image, {"body": body, "lungs": lungs, "table": table}


def test_the_outline_fills_the_lungs_and_leaves_out_the_table_and_the_air() -> None:
    image, parts = _torso()
    mask = body_mask(image, floor=0.0)
    assert mask[parts["lungs"]].all() and mask[parts["body"]].all()
    assert not mask[parts["table"]].any()
    assert not mask[~parts["body"]].any()  # nothing outside the drawn body
    assert not body_mask(np.zeros((4, 5, 6), np.float32), floor=0.0).any()


def test_a_lung_opened_to_the_volumes_edge_still_counts_as_body() -> None:
    """Filled plane by plane: a lung the scan's top slice cuts through is not a 3-D hole, yet it is body."""
    image, parts = _torso()
    cut = image[8:]  # the first slices now cut the lungs open
    assert body_mask(cut, floor=0.0)[parts["lungs"][8:]].all()


def test_positions_run_across_the_bodys_box_and_vary_along_their_own_axis_only() -> None:
    image, parts = _torso()
    context = body_channels(image, floor=0.0)
    assert context.shape == (len(CHANNELS), *image.shape) and context.dtype == np.float32
    np.testing.assert_array_equal(context[0], body_mask(image, 0.0).astype(np.float32))
    lateral, anterior = context[1], context[2]
    assert lateral[0, 0, 7] == pytest.approx(-1.0) and lateral[0, 0, 41] == pytest.approx(1.0)
    assert anterior[0, 7, 0] == pytest.approx(-1.0) and anterior[0, 29, 0] == pytest.approx(1.0)
    assert lateral[:, :, 24] == pytest.approx(0.0) and anterior[:, 18, :] == pytest.approx(0.0)
    assert np.ptp(lateral, axis=(0, 1)).max() == 0 and np.ptp(anterior, axis=(0, 2)).max() == 0
    assert lateral.min() >= -1.5 and lateral.max() <= 1.5  # far air is clipped
    # the left lung and the right one differ where nothing else in a small window does
    left, right = parts["lungs"] & (np.arange(48) < 24), parts["lungs"] & (np.arange(48) > 24)
    assert lateral[left].max() < 0 < lateral[right].min()


def test_the_segmenters_image_is_the_intensity_then_the_context_when_asked() -> None:
    image, _ = _torso()
    plain = segmenter_image(image, 0.0, body_context=False)
    assert plain.shape == (1, *image.shape) and np.array_equal(plain[0], image)
    full = segmenter_image(image, 0.0, body_context=True)
    assert full.shape == (4, *image.shape)
    np.testing.assert_array_equal(full[0], image)
    np.testing.assert_array_equal(full[1:], body_channels(image, 0.0))
    # a raised floor (another window's b_min) is air too
    np.testing.assert_array_equal(body_mask(image - 1.0, floor=-1.0), body_mask(image, floor=0.0))
