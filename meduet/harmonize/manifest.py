"""The harmonized-dataset manifest: one typed row per case, stored as CSV.

List-valued fields (sizes, spacings, directions) are JSON-encoded inside their cell, so
the file opens in a spreadsheet and round-trips exactly through :func:`read_manifest`.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from meduet.io.atomic import write_text


class CaseRecord(BaseModel):
    """What happened to one input case (also the per-case resume record)."""

    model_config = ConfigDict(extra="forbid")

    key: str
    dataset: str
    case_id: str
    domain: str
    body_part: str
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


FIELDS = list(CaseRecord.model_fields)
_LIST_FIELDS = {name for name, f in CaseRecord.model_fields.items() if str(f.annotation).startswith("list")}


def write_manifest(path: Path, records: list[CaseRecord]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for record in sorted(records, key=lambda r: r.key):
        row = record.model_dump(mode="json")
        writer.writerow({k: json.dumps(v) if k in _LIST_FIELDS else ("" if v is None else v) for k, v in row.items()})
    return write_text(path, buffer.getvalue())


def read_manifest(path: Path) -> list[CaseRecord]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    records = []
    for row in rows:
        parsed = {k: (json.loads(v) if k in _LIST_FIELDS else (None if v == "" and k.startswith("intensity") else v))
                  for k, v in row.items()}
        records.append(CaseRecord.model_validate(parsed))
    return records
