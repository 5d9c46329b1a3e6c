"""Where a voxel lies in the body: context channels for a segmenter that sees one small window at a time.

After the CT window every voxel darker than its lower bound reads the same, so a window inside a
lung is indistinguishable from one in the air around the patient, and nothing in a window tells
the left lung from the right. These channels carry what the whole volume knows:

- ``body``: 1 inside the patient's outline (the largest connected component above the air
  level, holes filled in every axial plane, so the lungs and airways count as body), else 0;
- ``lateral`` and ``anterior``: each voxel's position across the body's bounding box along the
  left-right and posterior-anterior axes, -1 at one edge of the body and +1 at the other.

Harmonized volumes share one orientation (RAS), so in a NumPy image ``(D, H, W)`` axis 0 is the
body's long axis (axial planes are ``[z]``), axis 1 the anterior-posterior one and axis 2 the
left-right one, with the same sign in every volume.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from meduet.models.architectures import BODY_CHANNELS as CHANNELS

# Share of the image's range above its floor (the window's lower bound: air) that counts as tissue.
_TISSUE_SHARE = 0.02


def body_mask(image: np.ndarray, floor: float) -> np.ndarray:
    """``(D, H, W)`` bool: the patient's outline with the axial holes (lungs, airways) filled.

    Args:
        image: ``(D, H, W)`` harmonized image.
        floor: the intensity of air (the harmonization window's lower bound; the padding value).
    """
    top = float(image.max())
    tissue = image > floor + _TISSUE_SHARE * (top - floor)
    if not tissue.any():
        return tissue
    components, count = ndimage.label(tissue)
    if count > 1:  # keep the patient, drop the table and stray specks
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        tissue = components == int(sizes.argmax())
    return np.stack([ndimage.binary_fill_holes(plane) for plane in tissue])


def body_channels(image: np.ndarray, floor: float) -> np.ndarray:
    """``(3, D, H, W)`` float32: ``CHANNELS`` of a harmonized image ``(D, H, W)`` (see the module)."""
    body = body_mask(image, floor)
    out = np.zeros((len(CHANNELS), *image.shape), dtype=np.float32)
    out[0] = body
    if not body.any():
        return out
    for channel, axis in ((1, 2), (2, 1)):
        present = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        lo, hi = float(present[0]), float(present[-1])
        coord = (np.arange(image.shape[axis], dtype=np.float32) - (lo + hi) / 2) / max((hi - lo) / 2, 1.0)
        shape = [1, 1, 1]
        shape[axis] = -1
        out[channel] = np.clip(coord, -1.5, 1.5).reshape(shape)
    return out


def segmenter_image(image: np.ndarray, floor: float, *, body_context: bool) -> np.ndarray:
    """The image input of the segmenter: ``(1, D, H, W)``, or ``(1 + 3, D, H, W)`` with the body channels."""
    image = image.astype(np.float32, copy=False)[None]
    if not body_context:
        return image
    return np.concatenate([image, body_channels(image[0], floor)])
