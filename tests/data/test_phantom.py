"""Phantom content: label table, sampling streams, lesions, rendering in the RAS frame."""

from __future__ import annotations

import numpy as np
import pytest

from meduet.data.phantom import LABELS, TEXTURE_HU, TISSUE_HU, Label, render, sample_subject


def subject(index: int = 0, **overrides: float):
    values = {"seed": 0, "index": index, "chest_fraction": 0.5, "lesion_probability": 0.5,
              "body_length_mm": 160.0, **overrides}
    return sample_subject(**values)


def coarse_axes(step: float = 4.0, length: float = 160.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.arange(-180, 180 + 1e-6, step)
    y = np.arange(-140, 140 + 1e-6, step)
    z = np.arange(-length / 2 + step / 2, length / 2, step)
    return x, y, z


def test_label_table_is_contiguous_and_complete() -> None:
    assert LABELS == {0: "background", 1: "skin", 2: "fat", 3: "muscle", 4: "liver", 5: "spleen",
                      6: "kidney_right", 7: "kidney_left", 8: "spine", 9: "aorta", 10: "lung_right",
                      11: "lung_left", 12: "heart", 13: "lesion"}
    assert set(TISSUE_HU) == set(TEXTURE_HU) == set(Label)
    assert TISSUE_HU[Label.LESION] < TISSUE_HU[Label.LIVER]  # hypodense lesion: visible


def test_subject_depends_only_on_seed_and_index() -> None:
    assert subject(2).to_dict() == subject(2).to_dict()
    assert subject(2).to_dict() != subject(3).to_dict()
    assert subject(2).to_dict() != subject(2, seed=1).to_dict()


def test_lesion_probability_changes_no_organ() -> None:
    with_lesion, without = subject(1, lesion_probability=1.0), subject(1, lesion_probability=0.0)
    assert with_lesion.lesion is not None and without.lesion is None
    assert with_lesion.organs == without.organs and with_lesion.body == without.body


@pytest.mark.parametrize(("fraction", "part"), [(0.0, "abdomen"), (1.0, "chest")])
def test_body_part_decides_chest_organs(fraction: float, part: str) -> None:
    s = subject(0, chest_fraction=fraction)
    assert s.body_part == part
    chest = {Label.LUNG_RIGHT, Label.LUNG_LEFT, Label.HEART} <= {o.label for o in s.organs}
    assert chest == (part == "chest")


def test_deformation_to_world_inverts_the_map() -> None:
    deformation = subject(0).deformation
    q = (40.0, -20.0, 10.0)
    p = np.asarray(deformation.to_world(q))
    np.testing.assert_allclose(p + deformation.displacement(tuple(p)), q, atol=1e-5)
    assert np.all(np.abs(p - q) <= deformation.max_displacement() + 1e-9)


@pytest.mark.parametrize("chest_fraction", [0.0, 1.0])
def test_render_places_organs_anatomically(chest_fraction: float) -> None:
    s = subject(0, chest_fraction=chest_fraction, lesion_probability=1.0)
    x, y, z = coarse_axes()
    labels, hu = render(s, x, y, z)
    assert labels.shape == hu.shape == (len(z), len(y), len(x)) and labels.dtype == np.uint8
    present = set(np.unique(labels).tolist())
    chest = {Label.LUNG_RIGHT, Label.LUNG_LEFT, Label.HEART}
    assert {Label.SKIN, Label.FAT, Label.MUSCLE, Label.LIVER, Label.SPINE, Label.AORTA, Label.LESION} <= present
    if chest_fraction == 1.0:
        assert chest <= present
    else:
        assert not chest & present

    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")

    def centroid(label: Label) -> np.ndarray:
        mask = labels == label
        return np.array([xx[mask].mean(), yy[mask].mean(), zz[mask].mean()])

    # RAS: the liver lies on the patient's right (+x), the spleen on the left, the spine posterior.
    assert centroid(Label.LIVER)[0] > 20 and centroid(Label.SPLEEN)[0] < -20
    assert centroid(Label.SPINE)[1] < centroid(Label.AORTA)[1] < 0
    # The lesion is drawn where the ground truth says, inside the liver.
    np.testing.assert_allclose(centroid(Label.LESION), s.to_dict()["lesion"]["centre_world_mm"], atol=3.0)
    assert np.abs(hu[labels == Label.LIVER].mean() - TISSUE_HU[Label.LIVER]) < 5


def test_render_is_pointwise() -> None:
    """A voxel's label depends on its centre only: a sub-grid renders to the same labels."""
    s = subject(3)
    x, y, z = coarse_axes(step=5.0)
    full, _ = render(s, x, y, z)
    part, _ = render(s, x[5:40], y[::3], z[10:14])
    np.testing.assert_array_equal(part, full[10:14, ::3, 5:40])


def test_no_lesion_label_without_lesion() -> None:
    labels, _ = render(subject(0, lesion_probability=0.0), *coarse_axes())
    assert not np.any(labels == Label.LESION)
