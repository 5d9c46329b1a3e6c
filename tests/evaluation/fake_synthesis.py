"""A stand-in synthesis store written from real data, in the contract of ``meduet.artifacts.synthesis``.

Until ``synthesize`` runs, ``evaluate-synthesis`` is tested on this: each held-out scan ``A``
"translated" to every other site by histogram matching to a train volume of that site (on
``A``'s grid, with ``A``'s geometry), and "generated" crops that are body crops of the site's
train volumes plus a little noise. Known answers follow: the translations keep ``A``'s anatomy
exactly, and the generated crops are real crops of the right site.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from meduet.artifacts.synthesis import GENERATED, LATENTS, TRANSLATIONS, SynthesisRecord, write_synthesis
from meduet.data.labelled import labelled_cases
from meduet.data.latents import read_manifest, save_array
from meduet.data.volumes import load_volume
from meduet.evaluation.retrieval import subject_ids
from meduet.evaluation.scoring import body_crops
from meduet.evaluation.synthesis import histogram_match
from meduet.io.images import write_image


def write_fake_store(harmonized: Path, latents: Path, store: Path, *, samples_per_site: int = 4,
                     crop: tuple[int, int, int] = (32, 32, 32), seed: int = 0) -> list[SynthesisRecord]:
    """Write the stand-in store under ``store``; returns its records."""
    rng = np.random.default_rng(seed)
    cases = labelled_cases(harmonized, latents)
    domains = {r.key: r.domain_index for r in read_manifest(latents)}
    sites = sorted({c.site for c in cases})
    subjects = dict(zip([c.key for c in cases], subject_ids([c.case_id for c in cases], r"_(\d+)$")))
    train = {s: [c for c in cases if c.site == s and c.split == "train"] for s in sites}
    records = []

    def record(key: str, kind: str, source, target: str, image: str, shape) -> SynthesisRecord:
        save_array(store / LATENTS / f"{key}.npy", np.zeros((4, *(n // 4 for n in shape)), np.float32))
        return SynthesisRecord(key=key, kind=kind, source_key=source.key, source_site=source.site,
                               source_split=source.split, subject=subjects[source.key], target_site=target,
                               target_domain_index=domains[train[target][0].key], image=image,
                               latent=f"{LATENTS}/{key}.npy", shape=list(shape), seed=seed, seconds=0.0)

    for a in (c for c in cases if c.split == "held_out"):
        source = sitk.ReadImage(str(a.image))
        for site in (s for s in sites if s != a.site and train[s]):
            reference = sitk.GetArrayFromImage(sitk.ReadImage(str(train[site][0].image)))
            out = sitk.GetImageFromArray(histogram_match(sitk.GetArrayFromImage(source), reference, levels=256,
                                                         points=7).astype(np.float32))
            out.CopyInformation(source)
            key = f"{a.key}__{site}"
            write_image(out, store / TRANSLATIONS / f"{key}.nii.gz")
            records.append(record(key, "translation", a, site, f"{TRANSLATIONS}/{key}.nii.gz", out.GetSize()[::-1]))
    for site in sites:
        for n in range(samples_per_site):
            volume = train[site][n % len(train[site])]
            crops = body_crops(load_volume(volume.image), crop, threshold=0.05, min_fraction=0.5)
            x = crops[int(rng.integers(len(crops)))][0] + torch.from_numpy(rng.normal(0, 0.01, crop).astype(np.float32))
            key = f"{site}_{n}"
            write_image(sitk.GetImageFromArray(x.clamp(0, 1).numpy()), store / GENERATED / f"{key}.nii.gz")
            records.append(record(key, "generation", volume, site, f"{GENERATED}/{key}.nii.gz", crop))
    write_synthesis(store, sorted(records, key=lambda r: r.key), {"run_key": "stand-in", "sites": sites})
    return records
