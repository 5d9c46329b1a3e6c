"""The harmonized-dataset manifest (``manifest.csv``): one :class:`CaseRecord` per case."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from meduet.harmonize.intensity import output_range
from meduet.io.manifest import CaseIdentity, read_rows, write_rows
from meduet.stages import StageError


class CaseRecord(CaseIdentity):
    """What happened to one input case (also the per-case resume record)."""

    split: Literal["train", "test"]
    status: Literal["ok", "quarantined"]
    reason: str = ""
    source_image: str = ""
    source_label: str = ""
    image: str = ""  # output paths, relative to the harmonized folder
    label: str = ""
    input_sha256: str = ""
    image_sha256: str = ""
    label_sha256: str = ""
    settings_hash: str = ""
    orig_size: list[int] = []
    orig_spacing: list[float] = []
    orig_origin: list[float] = []
    orig_direction: list[float] = []
    orig_orientation: str = ""
    out_size: list[int] = []
    out_spacing: list[float] = []
    out_origin: list[float] = []
    window: list[float] = []  # [a_min, a_max, b_min, b_max]: raw range → scaled range
    intensity_mean: float | None = None  # raw intensities inside the foreground
    intensity_std: float | None = None
    intensity_p01: float | None = None
    intensity_p50: float | None = None
    intensity_p99: float | None = None
    labels_present: list[int] = []
    seconds: float = 0.0


def write_manifest(path: Path, records: list[CaseRecord]) -> Path:
    return write_rows(path, records)


def read_manifest(path: Path) -> list[CaseRecord]:
    return read_rows(path, CaseRecord)


def harmonized_range(windows: Mapping[str, Sequence[float]], manifest: Path) -> tuple[float, float]:
    """``(b_min, b_max)`` shared by the harmonized cases (key -> manifest ``window``); a StageError naming
    ``manifest`` when they have none in common (see :func:`meduet.harmonize.intensity.output_range`)."""
    try:
        return output_range(windows)
    except ValueError as error:
        raise StageError(f"{manifest}: {error}") from None
