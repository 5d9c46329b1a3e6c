"""The demo multi-center dataset: every subject seen by every site, as MSD folders.

Case ``k`` of every site is the same subject (a travelling phantom): the content comes
from ``(seed, k)`` alone, the appearance from the site. Layout under ``out_dir``::

    <site>/dataset.json                      Medical Segmentation Decathlon index
    <site>/imagesTr/<site>_<kkk><ext>         a folder of slices for DICOM sites
    <site>/labelsTr/<site>_<kkk><ext>         .nrrd for DICOM sites, else the site's format
    ground_truth.json                        every case: content, lesion, label volumes

Every file is written atomically and identical parameters give byte-identical files.
"""

from __future__ import annotations

import logging
import shutil
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from meduet.config import SiteStyle
from meduet.data.phantom import LABELS, SCANNER_STREAM, TISSUE_HU, Label, sample_subject
from meduet.data.scanner import ORIENTATION_CODES, SiteGrid, acquire, sub_slice_offsets, to_storage
from meduet.io.atomic import write_json
from meduet.io.dicom import write_dicom_series
from meduet.io.figures import save_figure
from meduet.io.images import write_image
from meduet.parallel import process_pool

log = logging.getLogger(__name__)

IMAGE_SUFFIX = {"nii.gz": ".nii.gz", "nrrd": ".nrrd", "mha": ".mha", "dicom": ""}
LABEL_SUFFIX = {**IMAGE_SUFFIX, "dicom": ".nrrd"}  # a label map is no CT image: not DICOM
FRAME = ("RAS+ (NIfTI): +x patient Right, +y Anterior, +z Superior, mm; origin on the mid-sagittal "
         "plane at the centre of the scanned range. ITK/DICOM physical points are LPS: (-x, -y, z).")
SHAPES = ("content.organs give centre/radii in the reference frame: world point p shows reference point "
          "q = p + u(p), u = content.deformation (a few mm); centre_world_mm is that p for a centre. "
          "lesion_voxels and label_voxels count this site's label map.")


@dataclass(frozen=True)
class CaseJob:
    """One subject seen by one site: everything a worker process needs."""

    site: SiteStyle
    index: int
    seed: int
    chest_fraction: float
    lesion_probability: float
    body_length_mm: float
    site_root: Path
    compression_level: int


@dataclass(frozen=True)
class CaseResult:
    """What a worker reports back: the ground-truth record, size, time and QA slice.

    ``preview`` is the middle axial slice as ``(image, labels)``, (H, W) each, shown
    radiologically (patient right on the left, anterior up).
    """

    record: dict[str, Any]
    voxels: int
    seconds: float
    preview: tuple[np.ndarray, np.ndarray]


def case_id(site: str, index: int) -> str:
    return f"{site}_{index:03d}"


def site_stream_key(site: str) -> int:
    """Stable integer of a site name (``hash()`` changes between processes)."""
    return zlib.crc32(site.encode())


def build_case(job: CaseJob) -> CaseResult:
    """Render subject ``job.index`` at ``job.site`` and write its image and label files."""
    start = time.perf_counter()
    site, cid = job.site, case_id(job.site.name, job.index)
    subject = sample_subject(seed=job.seed, index=job.index, chest_fraction=job.chest_fraction,
                             lesion_probability=job.lesion_probability, body_length_mm=job.body_length_mm)
    grid = SiteGrid.create(spacing=site.spacing, fov_mm=site.fov_mm, length_mm=job.body_length_mm)
    noise = np.random.SeedSequence(job.seed, spawn_key=(SCANNER_STREAM, job.index, site_stream_key(site.name)))
    image, labels = acquire(subject, site, grid, np.random.default_rng(noise))

    image_rel = f"./imagesTr/{cid}{IMAGE_SUFFIX[site.file_format]}"
    label_rel = f"./labelsTr/{cid}{LABEL_SUFFIX[site.file_format]}"
    stored = to_storage(image, grid, site.orientation)
    if site.file_format == "dicom":
        uid_key = f"meduet-demo/{job.seed}/{site.name}/{cid}"
        write_dicom_series(stored, job.site_root / image_rel, uid_key=uid_key, tags={
            "0008|0070": "MeDUET phantom", "0008|103e": f"{site.name} {subject.body_part}",
            "0010|0010": f"Phantom^{job.index:03d}", "0010|0020": cid, "0018|0015": subject.body_part.upper(),
            "0018|1210": site.kernel,
        })
    else:
        write_image(stored, job.site_root / image_rel, compression_level=job.compression_level)
    write_image(to_storage(labels, grid, site.orientation), job.site_root / label_rel,
                compression_level=job.compression_level)

    counts = np.bincount(labels.ravel(), minlength=len(LABELS))
    content = subject.to_dict()
    record = {
        "site": site.name, "case_id": cid, "subject": job.index, "body_part": subject.body_part,
        "image": image_rel, "label": label_rel,
        "lesion": content.pop("lesion"),
        "lesion_voxels": int(counts[Label.LESION]),
        "label_voxels": {name: int(counts[value]) for value, name in LABELS.items()},
        "grid": {"shape_dhw": list(grid.shape), "spacing_xyz_mm": list(grid.spacing),
                 "storage_orientation": ORIENTATION_CODES[site.orientation],
                 "sub_slices": len(sub_slice_offsets(grid.spacing[2]))},
        "content": content,
    }
    middle = grid.shape[0] // 2
    preview = (image[middle, ::-1, ::-1].copy(), labels[middle, ::-1, ::-1].copy())  # (H, W), radiological
    return CaseResult(record, int(image.size), time.perf_counter() - start, preview)


def _run(jobs: list[CaseJob], workers: int) -> Iterator[tuple[CaseJob, CaseResult]]:
    """Yield ``(job, result)`` as cases finish; ``workers == 1`` runs in this process."""
    if workers == 1:
        for job in jobs:
            yield job, build_case(job)
        return
    with process_pool(workers) as pool:
        futures = {pool.submit(build_case, job): job for job in jobs}
        for future in as_completed(futures):
            yield futures[future], future.result()


def _job_cost(job: CaseJob) -> float:
    """Rough work of a case (sub-sampled voxels): the largest start first, so the last
    job to finish is a small one and workers end together."""
    grid = SiteGrid.create(spacing=job.site.spacing, fov_mm=job.site.fov_mm, length_mm=job.body_length_mm)
    return float(np.prod(grid.shape)) * len(sub_slice_offsets(grid.spacing[2]))


@dataclass(frozen=True)
class DemoSummary:
    records: list[dict[str, Any]]  # ground-truth records, ordered by site then case
    seconds_per_site: dict[str, float]  # summed worker time
    voxels_per_site: dict[str, int]
    previews: dict[str, tuple[np.ndarray, np.ndarray, tuple[float, float]]]  # site -> image, labels, (sx, sy)


def generate_demo(
    *, sites: list[SiteStyle], seed: int, cases_per_site: int, chest_fraction: float, lesion_probability: float,
    body_length_mm: float, out_dir: Path, workers: int = 1, compression_level: int = 1,
) -> DemoSummary:
    """Write every site's MSD folder and ``ground_truth.json`` under ``out_dir``.

    Args:
        sites: the site styles.
        seed: population seed (content and noise).
        cases_per_site: subjects; subject k is case k of every site.
        chest_fraction: probability of a chest scan.
        lesion_probability: probability of a liver lesion.
        body_length_mm: scanned cranio-caudal range.
        out_dir: the demo root.
        workers: processes rendering cases in parallel.
        compression_level: zlib level of compressed image files.

    Returns:
        The summary (records, per-site time and size, QA slices of case 0).
    """
    jobs = [CaseJob(site=site, index=k, seed=seed, chest_fraction=chest_fraction,
                    lesion_probability=lesion_probability, body_length_mm=body_length_mm,
                    site_root=out_dir / site.name, compression_level=compression_level)
            for site in sites for k in range(cases_per_site)]
    results: dict[tuple[str, int], CaseResult] = {}
    with tqdm(total=len(jobs), desc="demo-data", unit="case", mininterval=2.0) as progress:
        for job, result in _run(sorted(jobs, key=_job_cost, reverse=True), min(workers, len(jobs))):
            results[job.site.name, job.index] = result
            progress.update()
            log.debug("%s: %.1f s", result.record["case_id"], result.seconds)

    records = [results[site.name, k].record for site in sites for k in range(cases_per_site)]
    for site in sites:
        site_records = [r for r in records if r["site"] == site.name]
        write_json(out_dir / site.name / "dataset.json", dataset_json(site, site_records))
        _remove_stale(out_dir / site.name, site.name, {Path(r[key]).name for r in site_records
                                                         for key in ("image", "label")})
    write_json(out_dir / "ground_truth.json", {
        "frame": FRAME, "shapes": SHAPES, "seed": seed, "labels": {str(k): v for k, v in LABELS.items()},
        "tissue_hu": {LABELS[int(k)]: v for k, v in TISSUE_HU.items()}, "cases": records,
    })
    return DemoSummary(
        records=records,
        seconds_per_site={s.name: sum(results[s.name, k].seconds for k in range(cases_per_site)) for s in sites},
        voxels_per_site={s.name: sum(results[s.name, k].voxels for k in range(cases_per_site)) for s in sites},
        previews={s.name: (*results[s.name, 0].preview, (s.spacing[0], s.spacing[1])) for s in sites},
    )


def dataset_json(site: SiteStyle, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The MSD ``dataset.json`` of one site."""
    return {
        "name": site.name,
        "description": (f"MeDUET synthetic CT phantoms seen by site '{site.name}' ({site.kernel} kernel, "
                        f"{site.spacing[0]}x{site.spacing[1]}x{site.spacing[2]} mm, {site.orientation}, "
                        f"{site.file_format}); case k is the same subject at every site"),
        "reference": "Generated by `meduet demo-data` (meduet.data.demo); ground truth in ../ground_truth.json",
        "licence": "CC0-1.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": len(records),
        "numTest": 0,
        "training": [{"image": r["image"], "label": r["label"], "body_part": r["body_part"]} for r in records],
        "test": [],
    }


def _remove_stale(site_root: Path, site: str, keep: set[str]) -> None:
    """Delete this site's cases that the current parameters no longer produce (fewer cases,
    another format) and temporary files of a killed run; nothing else is touched."""
    for sub in ("imagesTr", "labelsTr"):
        for entry in sorted((site_root / sub).iterdir()):
            ours = entry.name.startswith((f"{site}_", f".{site}_"))
            if ours and entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


# --------------------------------------------------------------------------- QA figure
def plot_sites(previews: dict[str, tuple[np.ndarray, np.ndarray, tuple[float, float]]], target: Path, *,
               captions: dict[str, str] | None = None, window: tuple[float, float] = (-160.0, 240.0)) -> Path:
    """PNG with one axial slice per site (same subject) and the label contours.

    Args:
        previews: site -> (image (H, W) stored values, labels (H, W), (sx, sy) spacing mm),
            radiological orientation.
        target: the PNG path.
        captions: site -> a second title line (e.g. format, orientation, kernel).
        window: display range of the stored values.

    Returns:
        ``target``.
    """
    fig = Figure(figsize=(3.2 * len(previews), 3.8), dpi=110)
    FigureCanvasAgg(fig)
    colours: list = [tuple(c) for c in colormaps["tab20"](np.arange(len(LABELS)) % 20)]
    colours[Label.LESION] = "yellow"  # the classification target must stand out
    for col, (site, (image, labels, spacing)) in enumerate(previews.items()):
        ax = fig.add_subplot(1, len(previews), col + 1)
        height, width = image.shape
        extent = (0, width * spacing[0], height * spacing[1], 0)  # mm, row 0 on top
        xs, ys = (np.arange(width) + 0.5) * spacing[0], (np.arange(height) + 0.5) * spacing[1]
        ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], extent=extent, interpolation="nearest")
        for value in np.unique(labels):
            if value == 0:
                continue
            ax.contour(xs, ys, (labels == value).astype(np.float32), levels=[0.5], colors=[colours[value]],
                       linewidths=0.6)
        ax.set_title("\n".join(filter(None, (site, (captions or {}).get(site)))), fontsize=8)
        ax.text(4, 14, "R", color="white", fontsize=8)
        ax.axis("off")
    fig.suptitle("demo-data: case 0 at every site, middle axial slice", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94))  # leave the top to the suptitle
    return save_figure(fig, target, dpi="figure")

