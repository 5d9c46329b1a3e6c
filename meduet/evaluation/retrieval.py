"""Cross-site subject retrieval: does a factor find the same subject scanned at another site?

Where the same subjects are scanned at several sites (a travelling-subject study; the demo
scans every subject at every site), content should retrieve the subject across sites and
style should not (it should know the site, not the person). For each volume, its nearest
neighbour by cosine similarity of standardised features among the other sites' volumes is
a hit when it is the same subject; chance is the share of same-subject candidates.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from sklearn.metrics.pairwise import cosine_similarity
from sklearn.preprocessing import StandardScaler

from meduet.engine.probes import proportion_ci
from meduet.io.figures import plt, save_figure


def subject_ids(case_ids: list[str], pattern: str) -> list[str | None]:
    """The subject of each case: the first group of ``pattern`` searched in its id (None: no match)."""
    regex = re.compile(pattern)
    subjects = []
    for case in case_ids:
        match = regex.search(case)
        subjects.append(match.group(1) if match else None)
    return subjects


def similarity(x: np.ndarray) -> np.ndarray:
    """Cosine similarity ``(n, n)`` of standardised features ``x (n, F)``."""
    return cosine_similarity(StandardScaler().fit_transform(x))


def cross_site_retrieval(x: np.ndarray, sites: np.ndarray, subjects: list[str | None]) -> dict:
    """Top-1 same-subject retrieval among other sites' volumes.

    Args:
        x: ``(n, F)`` features; sites: ``(n,)`` site labels; subjects: subject of each volume.

    Returns:
        ``top1`` (hit rate over queries whose subject is seen at another site) and its Wilson
        ``ci95`` (queries are not independent: a subject is queried once per site), ``chance``
        (the expected hit rate of a random pick), ``queries``, and per query its hit
        (``hits``) — or ``{"skipped": reason}`` when no subject is seen at two sites.
    """
    sim = similarity(x)
    hits, chances = [], []
    for v, subject in enumerate(subjects):
        candidates = np.flatnonzero(sites != sites[v])
        same = np.array([subjects[c] == subject for c in candidates]) if subject is not None else np.zeros(0)
        if subject is None or not same.any():
            continue
        best = candidates[np.argmax(sim[v, candidates])]
        hits.append(subjects[best] == subject)
        chances.append(same.mean())
    if not hits:
        return {"skipped": "no subject is scanned at two sites (see evaluate_disentanglement.subject_pattern)"}
    return {"top1": float(np.mean(hits)), "ci95": proportion_ci(int(np.sum(hits)), len(hits)),
            "chance": float(np.mean(chances)), "queries": len(hits), "hits": [bool(h) for h in hits]}


def plot_retrieval(features: dict[str, np.ndarray], sites: list[str], subjects: list[str | None],
                   results: dict[str, dict], target: Path) -> Path:
    """Cosine-similarity matrices of each factor, volumes ordered by subject then site.

    Site-free content shows bright blocks along the diagonal (a subject matches itself at
    every site); site-bound style shows a bright lattice (a site matches itself across subjects).
    """
    order = sorted(range(len(sites)), key=lambda v: (subjects[v] or "", sites[v]))
    labels = [f"{subjects[v]}@{sites[v]}" for v in order]
    fig, axes = plt.subplots(1, len(features), figsize=(5.2 * len(features), 4.8))
    for ax, (name, x) in zip(np.atleast_1d(axes), features.items()):
        image = ax.imshow(similarity(x)[np.ix_(order, order)], cmap="viridis", vmin=-1, vmax=1)
        result = results.get(name, {})
        score = f"top-1 {result['top1']:.2f} (chance {result['chance']:.2f})" if "top1" in result else "skipped"
        ax.set_title(f"{name}: cross-site subject retrieval {score}", fontsize=8)
        ax.set_xticks(range(len(order)), labels, rotation=90, fontsize=5)
        ax.set_yticks(range(len(order)), labels, fontsize=5)
        fig.colorbar(image, ax=ax, shrink=0.8, label="cosine similarity")
    fig.tight_layout()
    return save_figure(fig, target)
