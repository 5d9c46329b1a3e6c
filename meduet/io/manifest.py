"""Manifests: one typed row per case, stored as CSV.

Rows are pydantic models. List-valued fields (sizes, spacings, affines) are JSON-encoded in
their cell, so a manifest opens in a spreadsheet and round-trips exactly.
"""

from __future__ import annotations

import csv
import io
import json
import typing
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict

from meduet.io.atomic import write_text

Row = TypeVar("Row", bound=BaseModel)


class CaseIdentity(BaseModel):
    """Who a row is about: the fields every per-case record (harmonized, latent, factor) starts with."""

    model_config = ConfigDict(extra="forbid")

    key: str  # "<dataset>__<case_id>", unique across datasets
    dataset: str
    case_id: str
    domain: str  # the site / scanner
    body_part: str


def _list_fields(model: type[BaseModel]) -> set[str]:
    return {name for name, f in model.model_fields.items() if typing.get_origin(f.annotation) is list}


def _optional_fields(model: type[BaseModel]) -> set[str]:
    return {name for name, f in model.model_fields.items() if type(None) in typing.get_args(f.annotation)}


def write_rows(path: Path, rows: list[BaseModel], sort_key: str = "key") -> Path:
    """Atomically write ``rows`` (all of one model) as CSV, sorted by ``sort_key``."""
    if not rows:
        raise ValueError(f"{path}: no rows to write")
    model = type(rows[0])
    lists = _list_fields(model)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(model.model_fields), lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: getattr(r, sort_key)):
        data = row.model_dump(mode="json")
        writer.writerow({k: json.dumps(v) if k in lists else ("" if v is None else v) for k, v in data.items()})
    return write_text(path, buffer.getvalue())


def read_rows(path: Path, model: type[Row]) -> list[Row]:
    """Read a CSV written by :func:`write_rows` back into ``model`` instances."""
    lists, optional = _list_fields(model), _optional_fields(model)
    with open(path, newline="") as fh:
        return [
            model.model_validate({k: json.loads(v) if k in lists else (None if v == "" and k in optional else v)
                                  for k, v in row.items()})
            for row in csv.DictReader(fh)
        ]
