"""Counterfactual swap: subject ``s`` scanned at site ``A``, rendered in site ``B``'s style, against the real ``s@B``.

Only a travelling-subject study can ask this (the demo scans every subject at every site).
For a same-subject pair ``(s@A, s@B)``, every window of ``s@A`` keeps its content tokens and
takes style tokens from another subject scanned at ``B`` (the window nearest in world
position), is decoded the way training decodes (``MeduetModel.reconstruct``) and the windows
are put back together on ``s@A``'s latent grid. The result is compared with the real ``s@B``
resampled onto that grid, where both cover the body (axis-aligned boxes, so the overlap is
a box):

- in latent space (scaled latent units): MSE of the swap, of ``s@A`` itself, and of ``s@A``'s
  round trip through the same decoder with its own style (``roundtrip``: the decoder smooths
  whatever it renders, so a smooth prediction can beat ``s@A`` without any style at all;
  beating the round trip is the fair test);
- after the VAE decoder (optional): PSNR of the decoded swap and round trip, of ``s@A``'s
  harmonized image and of its VAE reconstruction against ``s@B``'s harmonized image.

Another subject's style is used so that ``s@B``'s own anatomy cannot leak into the swap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import PSNRMetric

from meduet.data.windows import sliding_windows, window_origins, world_boxes
from meduet.engine.probes import proportion_ci
from meduet.harmonize.intensity import to_unit
from meduet.io.images import ras_affine
from meduet.losses.mixing import random_mix_mask
from meduet.models.architectures import MAX_VOXELS_PER_SPLIT
from meduet.models.meduet import MeduetModel
from meduet.models.vae import decode_latent


@dataclass
class Scan:
    """One volume of the latent cache as the counterfactual test needs it."""

    key: str
    site: int
    subject: str | None
    latent: torch.Tensor  # (C, d, h, w), scaled by the cache's scale factor
    affine: np.ndarray  # (4, 4) latent voxel (i, j, k) → RAS mm
    image: Path | None = None  # the harmonized image it was encoded from


# --------------------------------------------------------------------------- geometry
def resample_onto(src: torch.Tensor, src_affine: np.ndarray, dst_shape: tuple[int, int, int],
                  dst_affine: np.ndarray) -> tuple[torch.Tensor, tuple[slice, slice, slice]] | None:
    """Trilinear resampling of ``src (C, d, h, w)`` onto the part of a grid it covers.

    Both grids must be axis-aligned (diagonal affines, as harmonized volumes are).

    Returns:
        the resampled ``(C, *box)`` values and the ``box`` (slices of the destination grid
        ``dst_shape``) where ``src`` has data; None when they do not overlap.
    """
    for affine in (src_affine, dst_affine):
        if np.abs(affine[:3, :3] - np.diag(np.diag(affine[:3, :3]))).max() > 1e-6:
            raise ValueError("resample_onto needs axis-aligned grids (diagonal affines)")
    box, coords = [], []
    for axis, size in enumerate(dst_shape):  # array axis d, h, w ↔ affine column k, j, i
        col = 2 - axis
        world = dst_affine[col, col] * np.arange(size) + dst_affine[col, 3]
        index = (world - src_affine[col, 3]) / src_affine[col, col]
        n_src = src.shape[1 + axis]
        valid = np.flatnonzero((index >= -1e-6) & (index <= n_src - 1 + 1e-6))
        if len(valid) == 0:
            return None
        box.append(slice(int(valid[0]), int(valid[-1]) + 1))
        coords.append(torch.from_numpy(2 * index[valid] / max(n_src - 1, 1) - 1).float())
    grid_d, grid_h, grid_w = torch.meshgrid(*coords, indexing="ij")
    grid = torch.stack([grid_w, grid_h, grid_d], dim=-1)[None]  # (1, D, H, W, 3): x = w, y = h, z = d
    values = torch.nn.functional.grid_sample(src[None].float(), grid, mode="bilinear", align_corners=True)
    return values[0], tuple(box)


def assemble(windows: torch.Tensor, origins: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """Put ``(n, C, k, k, k)`` windows back on a ``(C, *shape)`` grid (overlaps averaged, padding dropped)."""
    total = torch.zeros(windows.shape[1], *shape)
    count = torch.zeros(shape)
    size = windows.shape[2:]
    for window, origin in zip(windows, origins):
        dst = tuple(slice(max(o, 0), min(o + k, n)) for o, k, n in zip(origin, size, shape))
        src = tuple(slice(d.start - o, d.stop - o) for d, o in zip(dst, origin))
        total[(slice(None), *dst)] += window[(slice(None), *src)]
        count[dst] += 1
    return total / count.clamp(min=1)


# --------------------------------------------------------------------------- rendering
@dataclass
class _Tokens:
    content: torch.Tensor  # (n, N, E)
    style: torch.Tensor  # (n, N, S)
    cls: torch.Tensor  # (n, 1, E)
    origins: np.ndarray  # (n, 3) window origins, array indices
    centres: np.ndarray  # (n, 3) window centres, RAS mm


@torch.no_grad()
def encode_scan(model: MeduetModel, scan: Scan, batch_size: int) -> _Tokens:
    window = model.config.input_size
    parts = [model.encode_full(batch) for batch in sliding_windows(scan.latent, window).split(batch_size)]
    origins = window_origins(tuple(scan.latent.shape[1:]), window)
    centres = world_boxes(origins, window, scan.affine).mean(1)
    return _Tokens(*(torch.cat(p) for p in zip(*parts)), origins=origins, centres=centres)


@torch.no_grad()
def render(model: MeduetModel, tokens: _Tokens, style: torch.Tensor, shape: tuple[int, int, int], batch_size: int,
           seed: int) -> torch.Tensor:
    """Decode ``tokens``' content with ``style (n, N, S)`` and reassemble the ``(C, *shape)`` latent."""
    generator = torch.Generator().manual_seed(seed)
    halves = random_mix_mask(len(style), model.config.num_tokens, model.config.mask_ratio, generator=generator)
    windows = []
    for content, sty, cls, half in zip(tokens.content.split(batch_size), style.split(batch_size),
                                       tokens.cls.split(batch_size), halves.split(batch_size), strict=True):
        windows.append(model.unpatchify(model.reconstruct(model.entangle(content, sty), cls, half)))
    return assemble(torch.cat(windows), tokens.origins, shape)


def nearest_style(target: _Tokens, donor: _Tokens) -> torch.Tensor:
    """For each window of ``target``, the style tokens of ``donor``'s window nearest in world position."""
    distance = np.linalg.norm(target.centres[:, None] - donor.centres[None], axis=-1)  # (n_t, n_d)
    return donor.style[torch.from_numpy(distance.argmin(1))]


# --------------------------------------------------------------------------- the test
class ImageCache:
    """Harmonized images and VAE decodes, read or computed once each (also used by evaluate-synthesis)."""

    def __init__(self, vae: torch.nn.Module | None, scale: float, max_voxels: int) -> None:
        self.vae, self.scale, self.max_voxels = vae, scale, max_voxels
        self._read: dict[Path, tuple[torch.Tensor, np.ndarray]] = {}
        self._decoded: dict[tuple, torch.Tensor] = {}

    def read(self, path: Path) -> tuple[torch.Tensor, np.ndarray]:
        """``(1, D, H, W)`` intensities and their voxel → RAS affine."""
        if path not in self._read:
            image = sitk.ReadImage(str(path))
            array = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))[None]
            self._read[path] = (array, ras_affine(image))
        return self._read[path]

    def decode(self, latent: torch.Tensor, key: tuple | None = None) -> torch.Tensor:
        """Scaled ``(C, d, h, w)`` latent → ``(1, 4d, 4h, 4w)`` image (kept under ``key`` when given)."""
        if key is not None and key in self._decoded:
            return self._decoded[key]
        assert self.vae is not None
        image = decode_latent(self.vae, (latent / self.scale)[None], self.max_voxels)[0].float()
        if key is not None:
            self._decoded[key] = image
        return image


def _psnr(prediction: torch.Tensor, target: torch.Tensor, value_range: tuple[float, float]) -> float:
    """PSNR of harmonized intensities in ``value_range``, both mapped to [0, 1] (the prediction clipped there)."""
    unit = to_unit(prediction, value_range).clamp(0, 1)
    return float(PSNRMetric(max_val=1.0)(unit[None], to_unit(target, value_range)[None]).mean())


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


def same_subject_pairs(scans: list[Scan], limit: int, seed: int) -> list[tuple[int, int, int]]:
    """``(a, b, donor)`` triples: ``a``, ``b`` the same subject at two sites, ``donor`` another subject at ``b``'s site.

    At most ``limit`` triples, drawn at random (seeded) when there are more.
    """
    rng = np.random.default_rng(seed)
    triples = []
    for a, scan_a in enumerate(scans):
        for b, scan_b in enumerate(scans):
            if scan_a.subject is None or scan_a.subject != scan_b.subject or scan_a.site == scan_b.site:
                continue
            donors = [d for d, s in enumerate(scans) if s.site == scan_b.site and s.subject != scan_a.subject]
            if donors:
                triples.append((a, b, donors[int(rng.integers(len(donors)))]))
    if len(triples) > limit:
        triples = [triples[i] for i in sorted(rng.choice(len(triples), size=limit, replace=False))]
    return triples


def counterfactual_test(model: MeduetModel, scans: list[Scan], *, pairs: int, batch_size: int, seed: int,
                        vae: torch.nn.Module | None = None, decode_pairs: int = 0, scale: float = 1.0,
                        max_voxels: int = MAX_VOXELS_PER_SPLIT, value_range: tuple[float, float] | None = None) -> dict:
    """Run the counterfactual swap on up to ``pairs`` same-subject pairs (see the module docstring).

    Args:
        scans: every volume; ``subject`` None excludes one.
        vae: the frozen VAE; with it (and ``Scan.image`` set) PSNR after decoding is measured too,
            on the first ``decode_pairs`` pairs (a whole-volume decode is the slow part).
        scale: the latent cache's scale factor (to undo before decoding).
        value_range: the harmonized images' ``(b_min, b_max)``; PSNR is taken on them mapped to [0, 1]
            (needed with ``vae``).

    Returns:
        ``pairs``, per-method mean latent MSE and PSNR, ``swap_closer_than_a`` and
        ``swap_closer_than_roundtrip`` (fractions of pairs), and the ``rows`` per pair;
        ``{"skipped": reason}`` without same-subject pairs.
    """
    if vae is not None and value_range is None:
        raise ValueError("counterfactual_test: PSNR after decoding needs the harmonized value_range")
    triples = same_subject_pairs(scans, pairs, seed)
    if not triples:
        return {"skipped": "no subject is scanned at two sites (see evaluate_disentanglement.subject_pattern)"}
    tokens: dict[int, _Tokens] = {}
    roundtrip: dict[int, torch.Tensor] = {}
    images = ImageCache(vae, scale, max_voxels)

    def encoded(v: int) -> _Tokens:
        if v not in tokens:
            tokens[v] = encode_scan(model, scans[v], batch_size)
        return tokens[v]

    rows = []
    for a, b, donor in triples:
        scan_a, scan_b = scans[a], scans[b]
        shape = tuple(scan_a.latent.shape[1:])
        resampled = resample_onto(scan_b.latent, scan_b.affine, shape, scan_a.affine)
        if resampled is None:
            continue
        target, box = resampled
        swap = render(model, encoded(a), nearest_style(encoded(a), encoded(donor)), shape, batch_size, seed + a)
        if a not in roundtrip:
            roundtrip[a] = render(model, encoded(a), encoded(a).style, shape, batch_size, seed + a)
        region = (slice(None), *box)
        row = {"a": scan_a.key, "b": scan_b.key, "style_donor": scans[donor].key,
               "latent_mse_swap": _mse(swap[region], target), "latent_mse_a": _mse(scan_a.latent[region], target),
               "latent_mse_roundtrip": _mse(roundtrip[a][region], target)}
        decodable = scan_a.image is not None and scan_b.image is not None
        if vae is not None and len(rows) < decode_pairs and decodable:
            row.update(_image_scores(images, scan_a, scan_b, swap, roundtrip[a], value_range))
        rows.append(row)
    if not rows:
        return {"skipped": "no same-subject pair overlaps in space"}
    methods = [k for k in rows[0] if k.startswith(("latent_mse_", "psnr_"))]
    decoded = [r for r in rows if "psnr_swap" in r]
    result = {"pairs": len(rows), "decoded_pairs": len(decoded),
              **{k: float(np.mean([r[k] for r in (decoded if k.startswith("psnr_") else rows)])) for k in methods},
              **_fraction("swap_closer_than_a", [r["latent_mse_swap"] < r["latent_mse_a"] for r in rows]),
              **_fraction("swap_closer_than_roundtrip",
                          [r["latent_mse_swap"] < r["latent_mse_roundtrip"] for r in rows])}
    if decoded:
        result["psnr_swap_above_a"] = float(np.mean([r["psnr_swap"] > r["psnr_a"] for r in decoded]))
        result["psnr_swap_above_a_vae"] = float(np.mean([r["psnr_swap"] > r["psnr_a_vae"] for r in decoded]))
    result["rows"] = rows
    return result


def _fraction(name: str, outcomes: list[bool]) -> dict:
    """``name``: the share of true outcomes, ``name_ci95``: its Wilson interval."""
    return {name: float(np.mean(outcomes)), f"{name}_ci95": proportion_ci(int(np.sum(outcomes)), len(outcomes))}


def _image_scores(images: ImageCache, scan_a: Scan, scan_b: Scan, swap: torch.Tensor, roundtrip: torch.Tensor,
                  value_range: tuple[float, float]) -> dict:
    """PSNR against ``s@B``'s harmonized image, on ``s@A``'s image grid where both have data."""
    image_a, affine_a = images.read(scan_a.image)
    image_b, affine_b = images.read(scan_b.image)
    resampled = resample_onto(image_b, affine_b, tuple(image_a.shape[1:]), affine_a)
    if resampled is None:
        return {}
    target, box = resampled
    region = (slice(None), *box)
    candidates = {"swap": images.decode(swap), "roundtrip": images.decode(roundtrip, (scan_a.key, "roundtrip")),
                  "a": image_a, "a_vae": images.decode(scan_a.latent, (scan_a.key, "vae"))}
    return {f"psnr_{name}": _psnr(volume[region], target, value_range) for name, volume in candidates.items()}
