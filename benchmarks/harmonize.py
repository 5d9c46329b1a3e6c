"""Harmonization throughput: this project's stage vs an equivalent MONAI dictionary chain.

Both read the same input files, reorient to RAS,
resample to the target spacing, window intensities, crop the foreground, pad, and write
``.nii.gz``. Prints volumes/s for each, their ratio, and how far the outputs differ.

    python benchmarks/harmonize.py [--params params.yaml] [--cases 8] [--profile]

``--profile`` runs this stage's pass under ``cProfile`` and splits its time into reading,
resampling, writing (``.nii.gz`` compression) and everything else.

Inputs are the configured datasets' cases, round-robin over sites, first copied to NIfTI
with their original geometry (orientation, spacing) kept: MONAI reads NRRD, MetaImage and
DICOM only through the optional ``itk`` package, which this project does not need.
The demo datasets are generated first if missing.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from machine import describe  # benchmarks/machine.py (this script's folder)

from meduet.config import HarmonizeConfig, Paths, load_config
from meduet.harmonize.case import harmonize_case
from meduet.harmonize.datasets import CaseSpec
from meduet.harmonize.intensity import Window
from meduet.io.images import read_image
from meduet.stages.harmonize import case_settings, discover_all


def monai_chain(cfg: HarmonizeConfig, out_dir: Path):
    """The MONAI transforms a user would write for the same harmonization."""
    from monai.transforms import (
        Compose, DivisiblePadd, EnsureChannelFirstd, LoadImaged, Orientationd, SaveImaged,
        ScaleIntensityRanged, Spacingd, SpatialPadd, CropForegroundd,
    )

    i = cfg.intensity
    keys = ["image", "label"]
    window = Window(i.a_min, i.a_max, i.b_min, i.b_max, i.clip)  # the stage's foreground rule, on MONAI's tensors
    share = cfg.foreground_threshold
    return Compose([
        LoadImaged(keys=keys, allow_missing_keys=True),
        EnsureChannelFirstd(keys=keys, allow_missing_keys=True),
        Orientationd(keys=keys, axcodes="RAS", allow_missing_keys=True),
        Spacingd(keys=keys, pixdim=cfg.target_spacing, mode=("bilinear", "nearest"), allow_missing_keys=True),
        ScaleIntensityRanged(keys="image", a_min=i.a_min, a_max=i.a_max, b_min=i.b_min, b_max=i.b_max, clip=i.clip),
        CropForegroundd(keys=keys, source_key="image", select_fn=lambda x: window.scaled_above(x, share),
                        margin=cfg.foreground_margin, allow_smaller=True, allow_missing_keys=True),
        SpatialPadd(keys=keys, spatial_size=cfg.min_size, allow_missing_keys=True),
        DivisiblePadd(keys=keys, k=cfg.divisible_by, allow_missing_keys=True),
        SaveImaged(keys=keys, output_dir=str(out_dir), output_postfix="", separate_folder=False,
                   resample=False, print_log=False, allow_missing_keys=True),
    ])


def as_nifti(specs: list[CaseSpec], folder: Path) -> list[CaseSpec]:
    """Copies of the cases as NIfTI files, geometry unchanged."""
    copies = []
    for spec in specs:
        paths = {}
        for role, source in (("image", spec.image), ("label", spec.label)):
            if source is not None:
                paths[role] = folder / f"{spec.key}_{role}.nii.gz"
                sitk.WriteImage(read_image(source), str(paths[role]), useCompression=True, compressionLevel=1)
        copies.append(replace(spec, image=paths["image"], label=paths.get("label")))
    return copies


def run_ours(specs: list[CaseSpec], cfg: HarmonizeConfig, out_dir: Path) -> tuple[float, dict[str, Path]]:
    settings = case_settings(cfg)
    start = time.perf_counter()
    outputs = {}
    for spec in specs:
        record = harmonize_case(spec, settings, out_dir)
        assert record.status == "ok", record.reason
        outputs[spec.key] = out_dir / record.image
    return time.perf_counter() - start, outputs


def run_monai(specs: list[CaseSpec], cfg: HarmonizeConfig, out_dir: Path) -> tuple[float, dict[str, Path]]:
    outputs = {}
    start = time.perf_counter()
    for spec in specs:
        case_dir = out_dir / spec.key
        chain = monai_chain(cfg, case_dir)
        item = {"image": str(spec.image)}
        if spec.label is not None:
            item["label"] = str(spec.label)
        chain(item)
        outputs[spec.key] = case_dir / Path(spec.image).name
    return time.perf_counter() - start, outputs


# Native calls by what they do: cProfile's names of SimpleITK's wrapped C++ methods, and of
# zlib-ng's compressor (write_image has ITK write the NIfTI and zlib-ng gzip it).
PHASES = {"read": ("ImageFileReader_Execute",), "resample": ("ResampleImageFilter_Execute",),
          "write (.nii.gz)": ("ImageFileWriter_Execute", "zlib_ng")}


def phase_seconds(profiler: cProfile.Profile) -> dict[str, float]:
    """Own time of the read, resample and write calls, and of everything else."""
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive calls, own, cumulative, callers)}
    total = sum(own for _, _, own, _, _ in stats.values())
    phases = {phase: sum(own for (_, _, name), (_, _, own, _, _) in stats.items() if any(m in name for m in methods))
              for phase, methods in PHASES.items()}
    return {**phases, "everything else": total - sum(phases.values()), "total": total}


def compare(ours: Path, theirs: Path) -> tuple[bool, bool, float, float]:
    """Shape and affine equality, max |difference| and the fraction of voxels differing > 1e-4."""
    a, b = nib.load(ours), nib.load(theirs)
    same_shape = a.shape == b.shape[: len(a.shape)]
    same_affine = bool(np.allclose(a.affine, b.affine, atol=1e-3))
    if not same_shape:
        return same_shape, same_affine, float("nan"), float("nan")
    diff = np.abs(a.get_fdata() - np.squeeze(b.get_fdata()))
    return same_shape, same_affine, float(diff.max()), float((diff > 1e-4).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--cases", type=int, default=8, help="cases to run (spread over all datasets)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for ITK and torch")
    parser.add_argument("--profile", action="store_true", help="split this stage's time into read/resample/write")
    args = parser.parse_args()

    cfg = load_config(args.params)
    paths = Paths.resolve(cfg, Path(args.params).resolve().parent)
    if not paths.demo.exists() and any(d.root.startswith(cfg.paths.demo_dir) for d in cfg.harmonize.datasets):
        from meduet.stages import demo_data
        demo_data.run(cfg.demo_data, paths)
    specs = [s for s in discover_all(cfg.harmonize, paths) if s.problem is None]
    by_dataset: dict[str, list[CaseSpec]] = {}
    for spec in specs:
        by_dataset.setdefault(spec.dataset, []).append(spec)
    chosen = [s for group in zip(*by_dataset.values()) for s in group][: args.cases]  # round-robin over sites

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "inputs").mkdir()
        chosen = as_nifti(chosen, tmp / "inputs")
        run_ours(chosen[:1], cfg.harmonize, tmp / "warm_ours")  # import/JIT warm-up for both sides
        run_monai(chosen[:1], cfg.harmonize, tmp / "warm_monai")
        t_monai, out_monai = run_monai(chosen, cfg.harmonize, tmp / "monai")
        t_ours, out_ours = run_ours(chosen, cfg.harmonize, tmp / "ours")
        rows = [(key, *compare(out_ours[key], out_monai[key])) for key in out_ours]
        if args.profile:  # a separate pass, so the timed one above carries no profiler overhead
            profiler = cProfile.Profile()
            profiler.runcall(run_ours, chosen, cfg.harmonize, tmp / "profiled")
            phases = phase_seconds(profiler)

    n = len(chosen)
    print(f"\nmachine: {describe()}")
    print(f"harmonization of {n} demo volumes ({', '.join(sorted(by_dataset))}), "
          f"{args.threads} thread(s), target spacing {cfg.harmonize.target_spacing}\n")
    print(f"{'method':<26}{'seconds':>10}{'volumes/s':>12}{'ratio':>8}")
    print(f"{'MONAI dict chain':<26}{t_monai:>10.2f}{n / t_monai:>12.2f}{1.0:>8.2f}")
    print(f"{'meduet harmonize':<26}{t_ours:>10.2f}{n / t_ours:>12.2f}{t_monai / t_ours:>8.2f}")
    print(f"\n{'case':<28}{'same shape':>11}{'same affine':>12}{'max |diff|':>12}{'voxels > 1e-4':>15}")
    for key, same_shape, same_affine, diff, fraction in rows:
        print(f"{key:<28}{str(same_shape):>11}{str(same_affine):>12}{diff:>12.2e}{fraction:>14.4%}")
    if args.profile:
        print(f"\n{'this stage, profiled pass':<28}{'seconds':>10}{'share':>8}")
        for phase, seconds in phases.items():
            print(f"{phase:<28}{seconds:>10.2f}{seconds / phases['total']:>8.0%}")
    worst = max(r[3] for r in rows)
    print(f"\nspeed-up {t_monai / t_ours:.2f}x; worst max |diff| {worst:.2e} (intensities scaled to "
          f"[{cfg.harmonize.intensity.b_min}, {cfg.harmonize.intensity.b_max}])")
    print("Voxels that differ lie past the input's last voxel centre (the grid rounds the extent up):\n"
          "there this stage repeats the edge value, MONAI's resampler mixes in padding.")


if __name__ == "__main__":
    main()
