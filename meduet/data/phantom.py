"""Anatomy ("content") of the demo CT phantoms: analytic organs in millimetres.

Frame. Every coordinate in this module is a point of the patient's **RAS+ frame** (the
NIfTI convention), in mm: +x points to the patient's Right, +y Anterior, +z Superior. The
origin lies on the mid-sagittal plane (x = 0), near the body's centre (y = 0) and at the
centre of the scanned range (z = 0). SimpleITK's physical space is LPS (DICOM): an RAS
point ``(x, y, z)`` is the ITK point ``(-x, -y, z)``.

A subject is a body outline (skin, fat and muscle layers around a visceral cavity, filled
with visceral fat), organs (ellipsoids and tubes along z) and, optionally, a liver lesion.
Shapes live in a *reference* frame; a smooth random deformation maps every world point
``p`` to its reference point ``q = p + u(p)``. Rendering evaluates that map and the
analytic shapes at exactly the voxel centres asked for, so each scanner grid gets a label
map of its own without resampling anything.

Label table (``LABELS``) and true tissue HU (``TISSUE_HU``, contrast-enhanced, portal
venous phase)::

    0 background  -1000      5 spleen        115      10 lung_right  -850
    1 skin           35      6 kidney_right  160      11 lung_left   -850
    2 fat          -100      7 kidney_left   160      12 heart        140
    3 muscle         50      8 spine         300      13 lesion        45
    4 liver         105      9 aorta         170

Within an organ the HU varies mildly (``TEXTURE_HU`` times a smooth field in [-1, 1],
defined in the world frame so it stays separable and cheap); some organs add structure
(cortical rim and discs of the spine, renal sinus, myocardium). A chest scan covers the
lower thorax (lungs, heart, liver dome, upper spleen), an abdomen scan the upper abdomen
(liver, spleen, kidneys). Only chest subjects have lungs and heart; an organ outside the
scanned range is simply absent from the image.
"""

from __future__ import annotations

import math
from enum import IntEnum

import numpy as np

from meduet.data.phantom_shapes import Body, BodyPart, Deformation, Organ, Subject, TextureWave, Vec3, WarpMode

# Spawn keys of the random streams (``SeedSequence(seed, spawn_key=(stream, index, ...))``):
# keyed by subject index, never drawn one after another, so subject k is the same whatever
# the number of subjects, sites or their order.
CONTENT_STREAM = 0
SCANNER_STREAM = 1


class Label(IntEnum):
    BACKGROUND = 0
    SKIN = 1
    FAT = 2
    MUSCLE = 3
    LIVER = 4
    SPLEEN = 5
    KIDNEY_RIGHT = 6
    KIDNEY_LEFT = 7
    SPINE = 8
    AORTA = 9
    LUNG_RIGHT = 10
    LUNG_LEFT = 11
    HEART = 12
    LESION = 13


LABELS: dict[int, str] = {int(label): label.name.lower() for label in Label}

TISSUE_HU: dict[Label, float] = {
    Label.BACKGROUND: -1000.0, Label.SKIN: 35.0, Label.FAT: -100.0, Label.MUSCLE: 50.0,
    Label.LIVER: 105.0, Label.SPLEEN: 115.0, Label.KIDNEY_RIGHT: 160.0, Label.KIDNEY_LEFT: 160.0,
    Label.SPINE: 300.0, Label.AORTA: 170.0, Label.LUNG_RIGHT: -850.0, Label.LUNG_LEFT: -850.0,
    Label.HEART: 140.0, Label.LESION: 45.0,
}
# Amplitude (HU) of the within-tissue texture; lungs and bone are the most heterogeneous.
TEXTURE_HU: dict[Label, float] = {
    Label.BACKGROUND: 0.0, Label.SKIN: 4.0, Label.FAT: 12.0, Label.MUSCLE: 8.0, Label.LIVER: 8.0,
    Label.SPLEEN: 6.0, Label.KIDNEY_RIGHT: 8.0, Label.KIDNEY_LEFT: 8.0, Label.SPINE: 50.0,
    Label.AORTA: 4.0, Label.LUNG_RIGHT: 35.0, Label.LUNG_LEFT: 35.0, Label.HEART: 6.0, Label.LESION: 10.0,
}
_TISSUE_LUT = np.array([TISSUE_HU[label] for label in Label], dtype=np.float32)
_TEXTURE_LUT = np.array([TEXTURE_HU[label] for label in Label], dtype=np.float32)


# --------------------------------------------------------------------------- sampling
def sample_subject(
    *, seed: int, index: int, chest_fraction: float, lesion_probability: float, body_length_mm: float
) -> Subject:
    """Draw subject ``index`` of the phantom population defined by ``seed``.

    Four independent streams (body part, lesion, anatomy, texture) are spawned from
    ``SeedSequence(seed, spawn_key=(CONTENT_STREAM, index))``, so changing
    ``lesion_probability`` flips lesions without moving any organ, and the anatomy is
    always drawn in full (chest organs included) whatever the body part.

    Args:
        seed: population seed.
        index: subject (case) index, >= 0.
        chest_fraction: probability of a chest scan (lungs and heart) rather than abdomen.
        lesion_probability: probability of a liver lesion.
        body_length_mm: cranio-caudal extent of the scan, centred at world z = 0.

    Returns:
        The subject.
    """
    streams = np.random.SeedSequence(seed, spawn_key=(CONTENT_STREAM, index)).spawn(4)
    part_rng, lesion_rng, anatomy_rng, texture_rng = (np.random.default_rng(s) for s in streams)
    body_part: BodyPart = "chest" if part_rng.random() < chest_fraction else "abdomen"
    has_lesion = lesion_rng.random() < lesion_probability

    rng = anatomy_rng
    length = body_length_mm
    # Chest scans put the diaphragm a quarter up the range, abdomen scans near the top.
    scan_centre = (0.25 if body_part == "chest" else -0.45) * length + rng.uniform(-0.05, 0.05) * length
    body = Body(
        centre_y=rng.uniform(-6, 6), semi_x=rng.uniform(150, 175), semi_y=rng.uniform(105, 128),
        taper_per_100mm=rng.uniform(-0.06, 0.06), skin_mm=rng.uniform(1.8, 3.0),
        fat_mm=rng.uniform(8, 26), muscle_mm=rng.uniform(8, 14),
    )
    organs = _sample_organs(rng, body, scan_centre)
    deformation = _sample_deformation(rng)
    if body_part == "abdomen":
        organs = tuple(o for o in organs if o.label not in (Label.LUNG_RIGHT, Label.LUNG_LEFT, Label.HEART))
    liver = next(o for o in organs if o.label == Label.LIVER)
    lesion = _sample_lesion(lesion_rng, liver, deformation, length) if has_lesion else None
    return Subject(
        index=index, body_part=body_part, scan_centre_trunk_mm=float(scan_centre), body=body, organs=organs,
        lesion=lesion, deformation=deformation, texture=_sample_texture(texture_rng),
    )


def _scaled(rng: np.random.Generator, radii: Vec3, spread: float = 0.12) -> Vec3:
    return tuple(float(r * rng.uniform(1 - spread, 1 + spread)) for r in radii)  # type: ignore[return-value]


def _sample_organs(rng: np.random.Generator, body: Body, scan_centre: float) -> tuple[Organ, ...]:
    """Organs placed relative to the cavity, in paint order (later overwrites earlier)."""
    a = body.semi_x - body.wall_mm  # cavity semi-axes at z = 0
    b = body.semi_y - body.wall_mm
    yc = body.centre_y
    back = yc - b  # posterior edge of the cavity

    def at(x: float, y: float, z_trunk: float, spread: float = 8.0) -> Vec3:
        # Trunk z -> world z, plus an independent jitter per coordinate.
        return (float(x + rng.uniform(-spread, spread)), float(y + rng.uniform(-spread, spread)),
                float(z_trunk - scan_centre + rng.uniform(-spread, spread)))

    spine_r = _scaled(rng, (21.0, 17.0, 0.0), 0.08)
    spine_y = back + 36 + rng.uniform(-4, 4)
    disc_period = rng.uniform(26, 30)
    aorta_r = rng.uniform(10, 13)
    right_dome, left_dome = 0.0, -12.0  # trunk z of the hemidiaphragms
    lung_r = _scaled(rng, (0.5 * a, 0.92 * b, 125.0), 0.06)
    lung_right_c = at(0.47 * a, yc - 0.02 * b, 85.0, spread=5.0)
    lung_left_c = at(-0.47 * a, yc - 0.02 * b, 80.0, spread=5.0)
    lung_r_left = _scaled(rng, lung_r, 0.04)
    organs = [
        Organ("paraspinal_right", Label.MUSCLE, at(0.27 * a, back + 4, 0, 3), _scaled(rng, (28.0, 22.0, 0.0)),
              tube=True, in_cavity=False),
        Organ("paraspinal_left", Label.MUSCLE, at(-0.27 * a, back + 4, 0, 3), _scaled(rng, (28.0, 22.0, 0.0)),
              tube=True, in_cavity=False),
        Organ("lung_right", Label.LUNG_RIGHT, lung_right_c, lung_r,
              cut=(0.0, 0.0, -1.0, (lung_right_c[2] - (right_dome - scan_centre)) / lung_r[2])),
        Organ("lung_left", Label.LUNG_LEFT, lung_left_c, lung_r_left,
              cut=(0.0, 0.0, -1.0, (lung_left_c[2] - (left_dome - scan_centre)) / lung_r_left[2])),
        Organ("heart", Label.HEART, at(-0.18 * a, yc + 0.35 * b, 40.0, 6.0), _scaled(rng, (58.0, 44.0, 52.0)),
              yaw_deg=35 + rng.uniform(-10, 10), rim=(0.8, -70.0)),
        Organ("liver", Label.LIVER, at(0.38 * a, yc + 0.05 * b, -52.0), _scaled(rng, (78.0, 66.0, 68.0)),
              yaw_deg=rng.uniform(-12, 12), cut=(-math.sqrt(0.5), 0.0, -math.sqrt(0.5), 0.45)),
        Organ("spleen", Label.SPLEEN, at(-0.62 * a, yc - 0.3 * b, -42.0), _scaled(rng, (28.0, 50.0, 48.0)),
              yaw_deg=-35 + rng.uniform(-10, 10)),
        # Hila face antero-medially: the notch sits on the local axis turned that way.
        Organ("kidney_right", Label.KIDNEY_RIGHT, at(0.5 * a, back + 42, -108.0), _scaled(rng, (26.0, 30.0, 52.0)),
              yaw_deg=-30 + rng.uniform(-10, 10), notch=(-0.95, 0.45), core=(0.5, -120.0)),
        Organ("kidney_left", Label.KIDNEY_LEFT, at(-0.5 * a, back + 42, -98.0), _scaled(rng, (26.0, 30.0, 52.0)),
              yaw_deg=30 + rng.uniform(-10, 10), notch=(0.95, 0.45), core=(0.5, -120.0)),
        Organ("aorta", Label.AORTA, (float(-rng.uniform(14, 22)), float(spine_y + spine_r[1] + aorta_r + 4), 0.0),
              (aorta_r, aorta_r, 0.0), tube=True),
        Organ("spine", Label.SPINE, (float(rng.uniform(-3, 3)), float(spine_y), 0.0), spine_r, tube=True,
              rim=(0.85, 350.0), bands=(disc_period, 6.0, rng.uniform(0, disc_period), -230.0)),
    ]
    return tuple(organs)


def _sample_deformation(rng: np.random.Generator, modes_per_axis: int = 2) -> Deformation:
    modes = []
    for axis in range(3):
        for _ in range(modes_per_axis):
            wavelength, angle = rng.uniform(150, 320), rng.uniform(0, 2 * np.pi)
            # |grad u| <= 2 pi A / wavelength <= 0.17 per mode: comfortably invertible.
            modes.append(WarpMode(axis=axis, amplitude_mm=float(rng.uniform(1, 4)),
                                  freq=(float(np.cos(angle) / wavelength), float(np.sin(angle) / wavelength)),
                                  phase=float(rng.uniform(0, 2 * np.pi))))
    return Deformation(tuple(modes))


def _sample_texture(rng: np.random.Generator, waves: int = 3) -> tuple[TextureWave, ...]:
    return tuple(
        TextureWave(freq=tuple(float(1 / rng.uniform(7, 22)) for _ in range(3)),  # type: ignore[arg-type]
                    phase=tuple(float(rng.uniform(0, 2 * np.pi)) for _ in range(3)),  # type: ignore[arg-type]
                    weight=1.0 / waves)
        for _ in range(waves)
    )


def _sample_lesion(rng: np.random.Generator, liver: Organ, deformation: Deformation, length: float,
                   tries: int = 200) -> Organ:
    """A sphere inside the liver, clear of its cut edge, inside the scanned z range.

    Candidates are drawn in the liver's normalised coordinates; the first with a positive
    margin (mm) to every constraint wins, else the best one (tiny scan ranges).
    """
    radius = float(rng.uniform(6, 15))
    r_min = min(liver.radii)
    dz = float(deformation.max_displacement()[2])
    best, best_margin = liver.centre, -math.inf
    for _ in range(tries):
        direction = rng.normal(size=3)
        lvec = direction / np.linalg.norm(direction) * 0.6 * rng.random() ** (1 / 3)
        centre = liver.from_local(lvec)
        margins = [
            (1 - float(np.linalg.norm(lvec))) * r_min - radius,  # inside the ellipsoid
            length / 2 - abs(centre[2]) - radius - dz,  # inside the scan range
        ]
        if liver.cut is not None:  # clear of the cut plane
            margins.append((liver.cut[3] - float(np.dot(liver.cut[:3], lvec))) * r_min - radius)
        if min(margins) > best_margin:
            best, best_margin = centre, min(margins)
        if best_margin >= 0:
            break
    centre: Vec3 = (float(best[0]), float(best[1]), float(best[2]))
    return Organ("lesion", Label.LESION, centre, (radius, radius, radius), over_label=Label.LIVER)


# --------------------------------------------------------------------------- rendering
def render(subject: Subject, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label map and true HU at the voxel centres of an axis-aligned RAS grid.

    Args:
        subject: the phantom.
        x: (W,) ascending RAS x of voxel centres, mm.
        y: (H,) ascending RAS y, mm.
        z: (D,) ascending RAS z, mm.

    Returns:
        ``labels`` (D, H, W) uint8 and ``hu`` (D, H, W) float32.
    """
    x32, y32, z32 = (np.asarray(v, dtype=np.float32) for v in (x, y, z))
    ux, uy, uz = subject.deformation.fields(x, y, z)
    q = (x32[None, None, :] + ux, y32[None, :, None] + uy, z32[:, None, None] + uz)  # 3 x (D, H, W)

    body = subject.body
    zcol = z32[:, None, None]
    labels = np.zeros(q[0].shape, dtype=np.uint8)
    # Nested outlines: 0 outside, 1 skin, 2 fat, 3 muscle (Label values 1..3 by design).
    for inset in (0.0, body.skin_mm, body.skin_mm + body.fat_mm):
        labels += body.ellipse_metric(q[0], q[1], zcol, inset) <= 1
    cavity = body.ellipse_metric(q[0], q[1], zcol, body.wall_mm) <= 1
    labels[cavity] = Label.FAT  # visceral fat fills what the organs leave

    detail = np.zeros(labels.shape, dtype=np.float32)
    reach = subject.deformation.max_displacement()
    organs = subject.organs + ((subject.lesion,) if subject.lesion is not None else ())
    for organ in organs:
        box = _index_box(organ, (x, y, z), reach)
        if box is not None:
            _paint(organ, labels, detail, cavity, q, box)

    hu = _TISSUE_LUT[labels] + _TEXTURE_LUT[labels] * texture_field(subject.texture, x, y, z) + detail
    return labels, hu


def texture_field(waves: tuple[TextureWave, ...], x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Smooth texture in [-1, 1] on the grid of axes x (W,), y (H,), z (D,) -> (D, H, W) float32."""
    out = np.zeros((len(z), len(y), len(x)), dtype=np.float32)
    for wave in waves:
        cx, cy, cz = (np.cos(2 * np.pi * f * np.asarray(a, dtype=np.float64) + p).astype(np.float32)
                      for f, p, a in zip(wave.freq, wave.phase, (x, y, z)))
        out += (np.float32(wave.weight) * cz[:, None, None] * cy[None, :, None]) * cx[None, None, :]
    return out


def _index_box(organ: Organ, axes: tuple[np.ndarray, np.ndarray, np.ndarray],
               reach: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Index slices (z, y, x) of the grid that can hold ``organ``, or None if none can."""
    extent = max(organ.radii[0], organ.radii[1])  # any yaw stays within the larger semi-axis
    slices = []
    for dim, coords in enumerate(axes):
        if dim == 2 and organ.tube:
            slices.append(slice(0, len(coords)))
            continue
        half = (extent if dim < 2 else organ.radii[2]) + reach[dim] + 1e-3
        lo = int(np.searchsorted(coords, organ.centre[dim] - half, side="left"))
        hi = int(np.searchsorted(coords, organ.centre[dim] + half, side="right"))
        if hi <= lo:
            return None
        slices.append(slice(lo, hi))
    return slices[2], slices[1], slices[0]


def _paint(organ: Organ, labels: np.ndarray, detail: np.ndarray, cavity: np.ndarray,
           q: tuple[np.ndarray, np.ndarray, np.ndarray], box: tuple[slice, slice, slice]) -> None:
    """Write ``organ`` into ``labels`` and its extra HU into ``detail`` (in place, within ``box``)."""
    qx, qy, qz = (c[box] for c in q)
    cos, sin = math.cos(math.radians(organ.yaw_deg)), math.sin(math.radians(organ.yaw_deg))
    dx, dy = qx - np.float32(organ.centre[0]), qy - np.float32(organ.centre[1])
    lx = (np.float32(cos) * dx + np.float32(sin) * dy) * np.float32(1 / organ.radii[0])
    ly = (np.float32(cos) * dy - np.float32(sin) * dx) * np.float32(1 / organ.radii[1])
    r2 = lx * lx + ly * ly
    lz = np.float32(0.0)
    if not organ.tube:
        lz = (qz - np.float32(organ.centre[2])) * np.float32(1 / organ.radii[2])
        r2 += lz * lz
    inside = r2 <= 1
    if organ.cut is not None:
        nx, ny, nz, d = organ.cut
        inside &= np.float32(nx) * lx + np.float32(ny) * ly + np.float32(nz) * lz <= d
    if organ.notch is not None:
        offset, radius = organ.notch
        inside &= r2 - 2 * np.float32(offset) * lx + np.float32(offset * offset) > radius * radius
    if organ.in_cavity:
        inside &= cavity[box]
    if organ.over_label is not None:
        inside &= labels[box] == organ.over_label

    labels[box][inside] = organ.label
    extra = np.zeros(inside.shape, dtype=np.float32)
    if organ.rim is not None:
        extra += np.float32(organ.rim[1]) * (r2 > organ.rim[0] ** 2)
    if organ.core is not None:
        extra += np.float32(organ.core[1]) * (r2 < organ.core[0] ** 2)
    if organ.bands is not None:
        period, thickness, phase, hu = organ.bands
        extra += np.float32(hu) * (np.mod(qz - np.float32(phase), np.float32(period)) < thickness)
    np.copyto(detail[box], extra, where=inside)  # also clears detail of what was painted over
