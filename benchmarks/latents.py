"""Latent cache: random-crop loading from ``.npy`` (this project) vs ``.nii.gz`` latents.

MeDUET's public code stores latents as compressed NIfTI and decompresses a whole volume
for every crop; the cache here stores one ``.npy`` per case and memory-maps it, so a crop
reads only its own bytes. Also prints the VAE's encode throughput for the presets, this
project's network (``build_vae``) beside MONAI's MAISI autoencoder as shipped with the same
shape (its own group norm), measured alternately in the same run.

    python benchmarks/latents.py [--cases 16] [--samples 400] [--crop 24] [--presets tiny small]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from machine import describe  # benchmarks/machine.py (this script's folder)
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

from meduet.data.latents import save_array
from meduet.models.architectures import MAX_VOXELS_PER_SPLIT
from meduet.models.vae import PRESETS, build_vae, encode_volume, maisi_options

LATENT_SHAPE = (4, 40, 48, 40)  # (C, d, h, w): a 160 × 192 × 160 voxel volume at 4× compression


def write_caches(folder: Path, cases: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    rng = np.random.default_rng(seed)
    npy, nii = [], []
    for i in range(cases):
        latent = rng.normal(size=LATENT_SHAPE).astype(np.float32)
        npy.append(save_array(folder / f"case_{i}.npy", latent))
        # channels last, as a 4-D NIfTI (what the reference code writes)
        path = folder / f"case_{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.moveaxis(latent, 0, -1), np.eye(4)), path)
        nii.append(path)
    return npy, nii


def crops(n: int, cases: int, crop: int, seed: int = 1) -> list[tuple[int, tuple[int, int, int]]]:
    rng = np.random.default_rng(seed)
    return [(int(rng.integers(cases)), tuple(int(rng.integers(s - crop + 1)) for s in LATENT_SHAPE[1:]))
            for _ in range(n)]


def load_npy(paths: list[Path], plan, crop: int) -> float:
    start = time.perf_counter()
    for case, (z, y, x) in plan:
        block = np.load(paths[case], mmap_mode="r")[:, z:z + crop, y:y + crop, x:x + crop]
        torch.from_numpy(np.ascontiguousarray(block))
    return time.perf_counter() - start


def load_nii(paths: list[Path], plan, crop: int) -> float:
    start = time.perf_counter()
    for case, (z, y, x) in plan:
        volume = np.asarray(nib.load(paths[case]).dataobj, dtype=np.float32)  # decompresses everything
        torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume[z:z + crop, y:y + crop, x:x + crop], -1, 0)))
    return time.perf_counter() - start


def encode_throughput(model: torch.nn.Module, shape: tuple[int, int, int], repeats: int = 3) -> float:
    """Voxels per second encoding one ``shape`` volume (posterior mean), best of ``repeats`` after a warm-up."""
    torch.manual_seed(0)
    model = model.eval()
    volume = torch.rand(1, 1, *shape)
    encode_volume(model, volume, max_voxels=MAX_VOXELS_PER_SPLIT)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        encode_volume(model, volume, max_voxels=MAX_VOXELS_PER_SPLIT)
        best = min(best, time.perf_counter() - start)
    return float(np.prod(shape)) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--crop", type=int, default=24)
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=list(PRESETS))
    parser.add_argument("--encode-shape", type=int, nargs=3, default=[96, 128, 96], metavar=("D", "H", "W"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as tmp:
        npy, nii = write_caches(Path(tmp), args.cases)
        plan = crops(args.samples, args.cases, args.crop)
        load_npy(npy, plan[:10], args.crop)  # warm the page cache for both, fairly
        load_nii(nii, plan[:10], args.crop)
        t_nii = load_nii(nii, plan, args.crop)
        t_npy = load_npy(npy, plan, args.crop)
    n = args.samples
    print(f"\nmachine: {describe()}")
    print(f"random {args.crop}^3 crops from {args.cases} latents of shape {LATENT_SHAPE} (C, d, h, w)\n")
    print(f"{'storage':<32}{'samples/s':>12}{'ratio':>8}")
    print(f"{'.nii.gz (decompress per crop)':<32}{n / t_nii:>12.1f}{1.0:>8.1f}")
    print(f"{'.npy memory-mapped (this cache)':<32}{n / t_npy:>12.1f}{t_nii / t_npy:>8.1f}")

    shape = tuple(args.encode_shape)
    print(f"\nVAE encode throughput, volume {shape}, posterior mean, {torch.get_num_threads()} thread(s)\n")
    print(f"{'preset':<10}{'MAISI as shipped, Mvoxels/s':>30}{'this project, Mvoxels/s':>26}{'ratio':>8}")
    for preset in args.presets:
        stock = encode_throughput(AutoencoderKlMaisi(**maisi_options(PRESETS[preset])), shape)
        ours = encode_throughput(build_vae(PRESETS[preset]), shape)
        print(f"{preset:<10}{stock / 1e6:>30.2f}{ours / 1e6:>26.2f}{ours / stock:>8.2f}")


if __name__ == "__main__":
    main()
