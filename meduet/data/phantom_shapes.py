"""The demo phantom's shapes: organs, body outline, smooth deformation, texture, a subject.

Coordinates are RAS+ millimetres (see ``meduet.data.phantom`` for the frame and the labels).
Shapes live in a *reference* frame; ``Deformation`` maps a world point ``p`` to its reference
point ``q = p + u(p)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Vec3 = tuple[float, float, float]
BodyPart = Literal["chest", "abdomen"]

@dataclass(frozen=True)
class Organ:
    """One labelled solid in the reference frame.

    The solid is an ellipsoid, or an elliptic tube along z when ``tube`` is set. Its local
    coordinates ``l`` are normalised by the radii (the surface is ``|l| = 1``) after a
    rotation by ``yaw_deg`` about +z (from +x toward +y).

    Attributes:
        name: organ name (``Label`` name, or a variant such as ``paraspinal_right``).
        label: value written into the label map.
        centre: reference-frame centre (RAS mm); ``centre[2]`` is unused for tubes.
        radii: semi-axes in mm along the local axes; ``radii[2]`` is unused for tubes.
        yaw_deg: rotation about +z.
        tube: unbounded along z (spine, aorta, paraspinal muscles).
        cut: ``(nx, ny, nz, d)``: keep only ``n . l <= d`` (liver edge, lung bases).
        notch: ``(offset, radius)``: remove the ball of ``radius`` centred at local
            ``(offset, 0, 0)`` (the renal hilum).
        rim: ``(from_radius, hu)``: add ``hu`` where ``|l| > from_radius`` (cortical bone,
            myocardium).
        core: ``(to_radius, hu)``: add ``hu`` where ``|l| < to_radius`` (renal sinus).
        bands: ``(period_mm, thickness_mm, phase_mm, hu)``: add ``hu`` in slabs along
            reference z (intervertebral discs).
        in_cavity: paint only inside the visceral cavity (organs press against the wall).
        over_label: paint only over voxels already holding this label (a liver lesion).
    """

    name: str
    label: int
    centre: Vec3
    radii: Vec3
    yaw_deg: float = 0.0
    tube: bool = False
    cut: tuple[float, float, float, float] | None = None
    notch: tuple[float, float] | None = None
    rim: tuple[float, float] | None = None
    core: tuple[float, float] | None = None
    bands: tuple[float, float, float, float] | None = None
    in_cavity: bool = True
    over_label: int | None = None

    def __post_init__(self) -> None:
        if self.tube and self.cut is not None and self.cut[2] != 0:
            raise ValueError(f"{self.name}: a tube has no local z, so its cut plane must have nz = 0")

    def from_local(self, lvec: np.ndarray) -> Vec3:
        """Reference point (RAS mm) of normalised local coordinates ``lvec``, shape (3,)."""
        c, s = math.cos(math.radians(self.yaw_deg)), math.sin(math.radians(self.yaw_deg))
        dx, dy = lvec[0] * self.radii[0], lvec[1] * self.radii[1]
        dz = 0.0 if self.tube else lvec[2] * self.radii[2]
        return (self.centre[0] + c * dx - s * dy, self.centre[1] + s * dx + c * dy, self.centre[2] + dz)


@dataclass(frozen=True)
class Body:
    """The trunk: an elliptic cylinder with skin, fat and muscle layers.

    Semi-axes grow by ``taper_per_100mm`` (a fraction) per 100 mm toward the head.
    Everything inside the muscle layer is the visceral cavity.
    """

    centre_y: float
    semi_x: float
    semi_y: float
    taper_per_100mm: float
    skin_mm: float
    fat_mm: float
    muscle_mm: float

    @property
    def wall_mm(self) -> float:
        return self.skin_mm + self.fat_mm + self.muscle_mm

    def ellipse_metric(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, inset_mm: float = 0.0) -> np.ndarray:
        """``(x/a)^2 + ((y - yc)/b)^2`` of the outline shrunk by ``inset_mm`` (<= 1 inside).

        Args:
            x, y, z: broadcastable RAS coordinates in mm (e.g. (1,1,W), (1,H,1), (D,1,1)).

        Returns:
            The metric, broadcast shape of the inputs, float32.
        """
        grow = (1.0 + self.taper_per_100mm * np.asarray(z, dtype=np.float32) / 100.0).astype(np.float32)
        inv_a2 = 1.0 / (self.semi_x * grow - inset_mm) ** 2
        inv_b2 = 1.0 / (self.semi_y * grow - inset_mm) ** 2
        return x * x * inv_a2 + (y - np.float32(self.centre_y)) ** 2 * inv_b2


@dataclass(frozen=True)
class WarpMode:
    """One sinusoid of the deformation: it moves coordinate ``axis`` as a function of the
    two other coordinates (in x, y, z order): ``u = A sin(2 pi (f1 p1 + f2 p2) + phase)``."""

    axis: int
    amplitude_mm: float
    freq: tuple[float, float]  # cycles per mm along the two other axes
    phase: float


@dataclass(frozen=True)
class Deformation:
    """Smooth map from world to reference frame, ``q = p + u(p)``.

    Each displacement component depends only on the two *other* coordinates, so the fields
    are 2-D tables broadcast over the grid (three additions per voxel) and the Jacobian is
    ``I`` plus off-diagonal terms bounded by ``2 pi A f`` per mode (kept well below 1, so
    the map is invertible).
    """

    modes: tuple[WarpMode, ...]

    def fields(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Displacements on the grid of axes ``x`` (W,), ``y`` (H,), ``z`` (D,).

        Returns:
            ``(ux, uy, uz)`` float32 of shapes (D, H, 1), (D, 1, W), (1, H, W).
        """
        axes = (np.asarray(x, np.float64), np.asarray(y, np.float64), np.asarray(z, np.float64))
        out = [np.zeros((len(z), len(y), 1)), np.zeros((len(z), 1, len(x))), np.zeros((1, len(y), len(x)))]
        for mode in self.modes:
            a, b = (i for i in range(3) if i != mode.axis)
            # Broadcast the two other axes to their places in (D, H, W) = (z, y, x).
            pa = axes[a].reshape([-1 if 2 - k == a else 1 for k in range(3)])
            pb = axes[b].reshape([-1 if 2 - k == b else 1 for k in range(3)])
            arg = 2 * np.pi * (mode.freq[0] * pa + mode.freq[1] * pb) + mode.phase
            out[mode.axis] = out[mode.axis] + mode.amplitude_mm * np.sin(arg)
        return tuple(u.astype(np.float32) for u in out)  # type: ignore[return-value]

    def displacement(self, point: Vec3) -> np.ndarray:
        """``u(p)`` at one world point, shape (3,)."""
        u = np.zeros(3)
        for mode in self.modes:
            a, b = (i for i in range(3) if i != mode.axis)
            u[mode.axis] += mode.amplitude_mm * math.sin(
                2 * math.pi * (mode.freq[0] * point[a] + mode.freq[1] * point[b]) + mode.phase)
        return u

    def max_displacement(self) -> np.ndarray:
        """Upper bound of ``|u|`` per axis, shape (3,) (mm)."""
        bound = np.zeros(3)
        for mode in self.modes:
            bound[mode.axis] += abs(mode.amplitude_mm)
        return bound

    def to_world(self, q: Vec3, tol_mm: float = 1e-6) -> Vec3:
        """The world point ``p`` with ``p + u(p) = q`` (fixed-point iteration, a contraction)."""
        p = np.asarray(q, dtype=float)
        for _ in range(200):
            nxt = np.asarray(q) - self.displacement(tuple(p))
            if np.max(np.abs(nxt - p)) < tol_mm:
                return tuple(float(v) for v in nxt)  # type: ignore[return-value]
            p = nxt
        raise RuntimeError(f"deformation is not invertible near {q}")


@dataclass(frozen=True)
class TextureWave:
    """``weight * cos(2 pi fx x + px) cos(2 pi fy y + py) cos(2 pi fz z + pz)``: separable,
    so it costs two multiply-adds per voxel on any axis-aligned grid."""

    freq: Vec3
    phase: Vec3
    weight: float


@dataclass(frozen=True)
class Subject:
    """Everything that defines one phantom's content.

    ``organs`` are painted in order (a later organ overwrites an earlier one), the lesion
    last. All geometry is in the reference frame except ``scan_centre_trunk_mm`` (where
    world z = 0 lies along the trunk, with trunk z = 0 at the right diaphragm dome).
    """

    index: int
    body_part: BodyPart
    scan_centre_trunk_mm: float
    body: Body
    organs: tuple[Organ, ...]
    lesion: Organ | None
    deformation: Deformation
    texture: tuple[TextureWave, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ground truth; organ and lesion centres also mapped to the world frame."""
        out = dataclasses.asdict(self)
        for record, organ in zip(out["organs"], self.organs):
            record["centre_world_mm"] = None if organ.tube else list(self.deformation.to_world(organ.centre))
        lesion = None
        if self.lesion is not None:
            lesion = {"present": True, "radius_mm": self.lesion.radii[0],
                      "centre_world_mm": list(self.deformation.to_world(self.lesion.centre)),
                      "centre_reference_mm": list(self.lesion.centre)}
        out["lesion"] = lesion or {"present": False, "radius_mm": None, "centre_world_mm": None,
                                   "centre_reference_mm": None}
        return out
