"""``meduet predict``: segment scans a user brings with a fine-tuned segmenter.

Inputs: an image file, a DICOM series folder, a folder of those, or an MSD ``dataset.json``,
local or at an ``s3://`` URI (mirrored under the output folder). Per case, the training run's own
pipeline (everything read from the segmenter file):
1. read (NIfTI, NRRD, MetaImage or a DICOM series folder) and check it, as ``harmonize`` does;
2. harmonize with the run's ``harmonize`` settings (RAS, target spacing, window, crop, pad);
3. encode with the run's frozen VAE (posterior mean) and scale as the latent cache was;
4. segment with Gaussian-blended sliding windows (``meduet.engine.segmentation``);
5. sample the mask nearest-neighbour back onto the input's own grid (orientation, spacing,
   extent, origin), so it overlays the file the user gave.

A bad input (unreadable, truncated, 2-D, NaN voxels, no foreground) is quarantined with the
harmonization stage's message naming the file; the other cases go on. Outputs under the
output folder: ``<case>_seg.<suffix>`` (the input's format; NIfTI for a DICOM series) and
``summary.json`` / ``summary.csv`` (status, reason, organ volumes in mL, seconds per phase).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from meduet.artifacts.segmenter import load_segmenter
from meduet.config import HarmonizeConfig, StorageConfig, s3_options
from meduet.engine.segmentation import segment_volume
from meduet.harmonize.case import CaseProblem, CaseSettings, check_image, harmonize_volume, to_image
from meduet.harmonize.datasets import IMAGE_SUFFIXES, DatasetInfo, case_id_from_path, discover
from meduet.harmonize.geometry import to_reference
from meduet.harmonize.settings import case_settings
from meduet.io.atomic import write_json, write_text
from meduet.io.images import ImageReadError, read_image, write_image
from meduet.io.storage import fetch_file, is_remote, mirror
from meduet.models.architectures import MAX_VOXELS_PER_SPLIT
from meduet.models.vae import encode_volume
from meduet.stages import StageError

log = logging.getLogger(__name__)


@dataclass
class CaseResult:
    """What ``predict`` did with one input."""

    case: str
    source: str
    status: str = "quarantined"  # or "ok"
    reason: str = ""
    mask: str = ""
    volumes_ml: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def list_inputs(path: Path) -> list[Path]:
    """The cases of a local ``path``: an image file, a DICOM series folder, or a folder of those.

    A folder is one DICOM series when it holds no image file and no subfolder; otherwise each
    image file and each subfolder (a DICOM series) is a case.
    """
    if not path.exists():
        raise StageError(f"{path}: input not found")
    if path.is_file():
        return [path]
    children = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    images = [p for p in children if p.is_file() and p.name.endswith(IMAGE_SUFFIXES)]
    folders = [p for p in children if p.is_dir()]
    return images + folders if images or folders else [path]


def dataset_cases(index: Path) -> tuple[list[Path], list[CaseResult]]:
    """The images an MSD ``dataset.json`` lists (``training`` and ``test``), and its bad entries as results.

    Entries that cannot be used (no image path, a missing file, a path escaping the dataset's
    folder, a broken index) come back quarantined with the harmonization stage's message.
    """
    specs = discover(DatasetInfo(name=index.parent.name, root=index.parent, domain="", body_part="", layout="msd"))
    cases = [spec.image for spec in specs if spec.problem is None and spec.image is not None]
    bad = [CaseResult(case=spec.case_id, source=str(spec.image or index), reason=spec.problem or "")
           for spec in specs if spec.problem is not None]
    return cases, bad


def resolve_inputs(inputs: str, cache: Path, s3: dict | None = None) -> tuple[list[Path], list[CaseResult]]:
    """Local cases for ``inputs`` (a file, a folder, a ``dataset.json``, or any of them at an ``s3://`` URI).

    A remote folder (or the folder of a remote ``dataset.json``) is mirrored into ``cache``
    (``meduet.io.storage.mirror``: fetched again only when an object changed); a remote image
    file is fetched alone. Endpoint and region come from ``MEDUET_S3_*`` and credentials from
    the environment, as for the harmonize stage.

    Returns:
        the cases to segment, and the entries of a ``dataset.json`` already found bad.
    """
    if is_remote(inputs):
        s3 = s3_options(StorageConfig()) if s3 is None else s3
        uri = inputs.rstrip("/")
        try:
            if uri.endswith("dataset.json"):
                local = mirror(uri.rsplit("/", 1)[0], cache, s3) / "dataset.json"
            elif uri.endswith(IMAGE_SUFFIXES):
                local = fetch_file(uri, cache, s3)
            else:
                local = mirror(uri, cache, s3)
        except FileNotFoundError as missing:
            raise StageError(str(missing)) from None
    else:
        local = Path(inputs)
    if local.name == "dataset.json" and local.is_file():
        return dataset_cases(local)
    return list_inputs(local), []


def _mask_name(source: Path) -> str:
    suffix = next((s for s in IMAGE_SUFFIXES if source.name.endswith(s)), ".nii.gz") if source.is_file() else ".nii.gz"
    return f"{case_id_from_path(str(source))}_seg{'.mha' if suffix == '.mhd' else suffix}"


def predict_case(source: Path, output: Path, *, model: torch.nn.Module, vae: torch.nn.Module, meta: dict,
                 settings: CaseSettings, overlap: float, window_batch: int) -> CaseResult:
    """Segment one input and write its mask in the input's geometry; bad input is quarantined, never raised.

    Args:
        model, vae, meta: what ``load_segmenter`` returns.
        settings: the training run's harmonization (``case_settings`` of ``meta["harmonize"]``).
    """
    result = CaseResult(case=case_id_from_path(str(source)), source=str(source))
    started = time.perf_counter()
    try:
        image = read_image(source)
        check_image(image, source)
        harmonized = harmonize_volume(image, None, settings, name=str(source))
    except (ImageReadError, CaseProblem) as problem:
        result.reason = str(problem)
        log.warning("predict: quarantined %s", problem)
        return result
    result.seconds["harmonize"] = time.perf_counter() - started

    started = time.perf_counter()
    volume = torch.from_numpy(harmonized.image)[None, None]  # (1, 1, D, H, W)
    mu = encode_volume(vae, volume, MAX_VOXELS_PER_SPLIT)[0][0]  # (C, d, h, w)
    latent = mu.numpy() * np.float32(meta["scale_factor"])
    result.seconds["encode"] = time.perf_counter() - started

    started = time.perf_counter()
    labels = segment_volume(model, latent, harmonized.image, overlap=overlap, batch_size=window_batch,
                            image_fill=harmonized.window.b_min)  # (D, H, W) on the harmonized grid
    mask = to_reference(to_image(labels, harmonized.grid), image)  # on the input's own grid
    result.mask = str(write_image(mask, output / _mask_name(source)))
    result.seconds["segment"] = time.perf_counter() - started

    voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
    counts = np.bincount(sitk.GetArrayViewFromImage(mask).ravel(), minlength=len(meta["labels"]))
    result.volumes_ml = {name: round(float(counts[c]) * voxel_ml, 3) for c, name in enumerate(meta["labels"])
                         if c > 0 and counts[c]}
    result.status = "ok"
    return result


def predict(model_path: Path, inputs: str | Path, output: Path) -> list[CaseResult]:
    """Segment every case of ``inputs`` into ``output`` (see the module docstring).

    Args:
        model_path: a segmenter file or the ``finetune`` model folder holding it.
        inputs: an image file, a DICOM series folder, a folder of those, or an MSD
            ``dataset.json``; local or at an ``s3://`` URI (see :func:`resolve_inputs`).
        output: where masks and the summary go (created; remote inputs are mirrored under
            ``output/.inputs``).

    Raises:
        StageError: no readable segmenter, no input, or no case could be segmented.
    """
    model, vae, meta = load_segmenter(model_path)
    output.mkdir(parents=True, exist_ok=True)
    cases, results = resolve_inputs(str(inputs), output / ".inputs")
    for bad in results:
        log.warning("predict: quarantined %s", bad.reason)
    cfg, settings = meta["config"], case_settings(HarmonizeConfig.model_validate(meta["harmonize"]))
    results += [predict_case(source, output, model=model, vae=vae, meta=meta, settings=settings,
                             overlap=cfg["overlap"], window_batch=cfg["window_batch"]) for source in cases]
    if not results:
        raise StageError(f"{inputs}: no case to segment")
    write_json(output / "summary.json", [vars(r) for r in results])
    names = list(meta["labels"][1:])
    header = ["case", "status", "reason", "source", "mask", *(f"{n}_ml" for n in names)]
    rows = [[r.case, r.status, r.reason.replace(",", ";"), r.source, r.mask,
             *(str(r.volumes_ml.get(n, 0.0)) if r.status == "ok" else "" for n in names)] for r in results]
    write_text(output / "summary.csv", "\n".join(",".join(row) for row in [header, *rows]) + "\n")
    failed = [r for r in results if r.status != "ok"]
    log.info("predict: %d case(s) segmented, %d quarantined; summary in %s", len(results) - len(failed), len(failed),
             output / "summary.csv")
    if len(failed) == len(results):
        raise StageError(f"{inputs}: no case could be segmented: " + "; ".join(r.reason for r in failed))
    return results
