"""Finding the cases of an input dataset (MSD ``dataset.json`` or nnU-Net raw layout).

Problems found here (a missing file, a path escaping the dataset root, a broken
``dataset.json``) do not raise: they become :class:`CaseSpec` entries with ``problem``
set, so they are quarantined and reported alongside the cases that did work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class CaseSpec:
    """One case to harmonize: where its files are and what it is."""

    dataset: str
    case_id: str
    domain: str
    body_part: str
    split: Literal["train", "test"]
    image: Path | None
    label: Path | None = None
    problem: str | None = None
    unlisted: bool = False  # the dataset itself could not be listed (missing, empty, unreadable index)
    # (local folder, URI) of a remote dataset mirrored there: where a cluster node can read the files itself
    mirrored_from: tuple[str, str] | None = None

    def source_uri(self, path: Path) -> str | None:
        """The remote URI of ``path`` (a file of this case in the local mirror), or None for a local dataset."""
        if self.mirrored_from is None:
            return None
        local, uri = self.mirrored_from
        return f"{uri.rstrip('/')}/{Path(path).relative_to(local).as_posix()}"

    @property
    def key(self) -> str:
        return f"{self.dataset}__{self.case_id}"


def case_id_from_path(path: str) -> str:
    name = Path(path.rstrip("/")).name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _inside(root: Path, relative: str) -> tuple[Path, str | None]:
    """Resolve ``relative`` under ``root``; report a path that escapes it (``..``, absolute, symlink)."""
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root.resolve()):
        return candidate, f"path '{relative}' escapes the dataset root {root}"
    if not candidate.exists():
        return candidate, f"{candidate}: file not found"
    return candidate, None


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    root: Path
    domain: str
    body_part: str
    layout: Literal["auto", "msd", "nnunet"] = "auto"
    include_unlabeled: bool = True


def _spec(info: DatasetInfo, case_id: str, split: Literal["train", "test"], image: str, label: str | None,
          body_part: str | None) -> CaseSpec:
    image_path, problem = _inside(info.root, image)
    label_path = None
    if label is not None:
        label_path, label_problem = _inside(info.root, label)
        problem = problem or label_problem
    return CaseSpec(info.name, case_id, info.domain, body_part or info.body_part, split, image_path, label_path,
                    problem)


def _msd_cases(info: DatasetInfo, meta: dict) -> list[CaseSpec]:
    cases = []
    for entry in meta.get("training", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            cases.append(_broken(info, f"dataset.json: training entry {entry!r} has no 'image' path"))
            continue
        cases.append(_spec(info, entry.get("case_id") or case_id_from_path(entry["image"]), "train",
                           entry["image"], entry.get("label"), entry.get("body_part")))
    if info.include_unlabeled:
        for entry in meta.get("test", []):
            image = entry if isinstance(entry, str) else entry.get("image") if isinstance(entry, dict) else None
            if not isinstance(image, str):
                cases.append(_broken(info, f"dataset.json: test entry {entry!r} has no image path"))
                continue
            body_part = entry.get("body_part") if isinstance(entry, dict) else None
            cases.append(_spec(info, case_id_from_path(image), "test", image, None, body_part))
    return cases


def _nnunet_cases(info: DatasetInfo, meta: dict) -> list[CaseSpec]:
    ending = meta.get("file_ending", ".nii.gz")
    cases = []
    for split, folder, label_folder in (("train", "imagesTr", "labelsTr"), ("test", "imagesTs", None)):
        if split == "test" and not info.include_unlabeled:
            continue
        for image in sorted((info.root / folder).glob(f"*_0000{ending}")):
            case_id = image.name[: -len(f"_0000{ending}")]
            label = f"{label_folder}/{case_id}{ending}" if label_folder else None
            cases.append(_spec(info, case_id, split, f"{folder}/{image.name}", label, None))  # type: ignore[arg-type]
    return cases


def _broken(info: DatasetInfo, problem: str, case_id: str = "dataset.json") -> CaseSpec:
    return CaseSpec(info.name, case_id, info.domain, info.body_part, "train", None, None, problem)


def unlisted(info: DatasetInfo, problem: str) -> CaseSpec:
    """The one entry of a dataset whose cases could not be listed at all.

    Such a dataset may only be unreachable for a moment (an unmounted share, an S3 outage,
    an index being rewritten): its earlier outputs must be kept, never pruned as dropped.
    """
    return CaseSpec(info.name, "dataset.json", info.domain, info.body_part, "train", None, None, problem,
                    unlisted=True)


def discover(info: DatasetInfo) -> list[CaseSpec]:
    """All cases of one dataset folder, problems included (never raises for bad content)."""
    meta_path = info.root / "dataset.json"
    if not info.root.is_dir():
        return [unlisted(info, f"{info.root}: dataset folder not found")]
    meta: dict = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return [unlisted(info, f"{meta_path}: not valid JSON ({error})")]
        if not isinstance(meta, dict):
            return [unlisted(info, f"{meta_path}: top level must be an object")]
    layout = info.layout
    if layout == "auto":
        layout = "msd" if "training" in meta else "nnunet"
    if layout == "msd":
        if not meta:
            return [unlisted(info, f"{meta_path}: MSD layout needs a dataset.json with a 'training' list")]
        cases = _msd_cases(info, meta)
    else:
        cases = _nnunet_cases(info, meta)
    if not cases:
        return [unlisted(info, f"{info.root}: no cases found ({layout} layout)")]
    seen: set[str] = set()
    unique = []
    for index, case in enumerate(cases):
        if case.case_id in seen:  # keep both visible: the duplicate is quarantined under a new id
            case = replace(case, case_id=f"{case.case_id}__dup{index}", problem=f"duplicate case id '{case.case_id}'")
        seen.add(case.case_id)
        unique.append(case)
    return unique
