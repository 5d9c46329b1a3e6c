"""Site identifiability of the factors: probes against their permutation null, per window count and region.

Three views of the same question (how much site does a factor carry?):

- ``volume_means``: a volume's factor is the mean of its windows' factors (all of them, a
  random ``k`` of them, or only those in a region); a probe on those is one point.
- ``windows_curve``: probe accuracy against the number of windows averaged per volume
  (averaging removes per-window noise, so site cues too weak for one window can add up).
- ``covered_region`` / ``inside``: the physical box every volume covers, so that content is
  judged on the same anatomy at every site and a site's field of view or slice coverage
  (geometry, not appearance) cannot pass as site information.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from meduet.data.windows import world_boxes
from meduet.engine.probes import site_probe


def volume_means(window_x: np.ndarray, window_volume: np.ndarray, volumes: int,
                 keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-volume mean of the kept windows' features.

    Args:
        window_x: ``(W, F)`` per-window features; window_volume: ``(W,)`` volume row of each.
        keep: ``(W,)`` bool, the windows to average (all when None).

    Returns:
        ``(volumes, F)`` means (NaN rows for volumes without a kept window) and ``(volumes,)`` counts.
    """
    keep = np.ones(len(window_volume), dtype=bool) if keep is None else keep
    counts = np.bincount(window_volume[keep], minlength=volumes)
    sums = np.zeros((volumes, window_x.shape[1]))
    np.add.at(sums, window_volume[keep], window_x[keep])
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None], counts


def sample_windows(window_volume: np.ndarray, volumes: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``(W,)`` bool: ``count`` windows per volume drawn without replacement (all if it has fewer)."""
    keep = np.zeros(len(window_volume), dtype=bool)
    for v in range(volumes):
        members = np.flatnonzero(window_volume == v)
        keep[rng.choice(members, size=min(count, len(members)), replace=False)] = True
    return keep


def windows_curve(window_x: np.ndarray, window_volume: np.ndarray, y: np.ndarray, counts: Sequence[int], *,
                  draws: int, permutations: int, probe: dict, seed: int) -> list[dict]:
    """Probe accuracy against the number of windows averaged per volume.

    Each count is probed on ``draws`` independent random window draws (mean and sd over
    them); its null comes from the first draw. The last point averages every window.

    Args:
        counts: window counts ``k`` to average (each volume uses all of its windows when it
            has fewer than ``k``: ``volumes_with_k`` says how many had ``k``).
        probe: ``site_probe`` keyword arguments (folds, l2, max_iter).
    """
    rng = np.random.default_rng(seed)
    volumes = len(y)
    per_volume = np.bincount(window_volume, minlength=volumes)
    points = []
    for count in [*counts, int(per_volume.max())]:
        accuracies, null = [], {}
        for draw in range(draws if count < per_volume.max() else 1):
            x, _ = volume_means(window_x, window_volume, volumes, sample_windows(window_volume, volumes, count, rng))
            result = site_probe(x, y, permutations=permutations if draw == 0 else 0, seed=seed, **probe)
            accuracies.append(result["accuracy_mean"])
            null = null or {k: result[k] for k in ("null_mean", "null_p95", "p_value") if k in result}
        points.append({"windows": count, "all": count >= per_volume.max(),
                       "volumes_with_k": int((per_volume >= count).sum()), "accuracy_mean": float(np.mean(accuracies)),
                       "accuracy_sd_over_draws": float(np.std(accuracies)), "draws": len(accuracies), **null})
    return points


def volume_box(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """World box ``(2, 3)`` of a ``(C, d, h, w)`` latent with voxel → RAS ``affine (4, 4)``."""
    return world_boxes(np.zeros((1, 3), dtype=np.int64), tuple(shape[1:]), affine)[0]


def covered_region(boxes: Sequence[np.ndarray]) -> np.ndarray:
    """The box ``(2, 3)`` every volume covers: the intersection of their ``(2, 3)`` boxes (empty: lo > hi)."""
    stacked = np.stack(boxes)
    return np.stack([stacked[:, 0].max(0), stacked[:, 1].min(0)])


def inside(window_box: np.ndarray, region: np.ndarray, tolerance_mm: float) -> np.ndarray:
    """``(W,)`` bool: windows ``(W, 2, 3)`` whose box lies in ``region`` grown by ``tolerance_mm``."""
    return ((window_box[:, 0] >= region[0] - tolerance_mm).all(1)
            & (window_box[:, 1] <= region[1] + tolerance_mm).all(1))
