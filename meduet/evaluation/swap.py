"""The swap test: content of one volume rendered with another site's style, re-encoded.

For pairs ``(A, B)`` of volumes from different sites, every window of ``A`` is encoded, its
content tokens entangled with the style tokens of a window of ``B``, decoded the way
training decodes (``MeduetModel.reconstruct``: every position predicted while hidden),
unpatchified to a latent and re-encoded. The decode and re-encode round trip shifts the
factors by itself, so the window-averaged re-encoded factors are compared with the same
round trip of ``A`` alone and of ``B`` alone: ``style_closer_to_b_roundtrip`` counts pairs
whose style is nearer ``B``'s round trip than ``A``'s, ``content_closer_to_a_roundtrip`` the
converse for content. ``style_predicted_as_b`` asks the style probe (fit on the extracted
styles) for ``B``'s site, with ``self_style_predicted_as_a`` (the probe on ``A``'s own round
trip) as its sanity reference: near chance, the round trip has left the probe's domain.
A content probe is not asked: it can name ``A``'s site only when content carries the site.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from sklearn.pipeline import Pipeline

from meduet.losses.mixing import random_mix_mask
from meduet.models.meduet import MeduetModel


@torch.no_grad()
def swapped_factors(model: MeduetModel, windows_a: torch.Tensor, windows_b: torch.Tensor,
                    batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-encoded factors of ``A``'s content rendered with ``B``'s style, averaged over ``A``'s windows.

    Args:
        windows_a: ``(n_a, C, d, h, w)`` scaled windows of ``A``; window ``i`` takes its style from
            window ``i mod n_b`` of ``windows_b (n_b, C, d, h, w)``.
        seed: draws the decoder's hidden halves; the same seed gives ``A`` the same halves
            whichever style it is rendered with.

    Returns:
        content ``(E,)`` and style ``(S,)``.
    """
    partner = windows_b[torch.arange(len(windows_a)) % len(windows_b)]
    generator = torch.Generator().manual_seed(seed)
    contents, styles = [], []
    for xa, xb in zip(windows_a.split(batch_size), partner.split(batch_size), strict=True):
        content_a, _, cls_a = model.encode_full(xa)  # (b, N, E), _, (b, 1, E)
        _, style_b, _ = model.encode_full(xb)  # (b, N, S)
        halves = random_mix_mask(len(xa), model.config.num_tokens, model.config.mask_ratio, generator=generator)
        latent = model.unpatchify(model.reconstruct(model.entangle(content_a, style_b), cls_a, halves))
        content, style, _ = model.encode_full(latent)  # (b, C, d, h, w) re-encoded
        contents.append(content.mean(1))
        styles.append(style.mean(1))
    return torch.cat(contents).mean(0).numpy(), torch.cat(styles).mean(0).numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _nearer(x: np.ndarray, target: np.ndarray, other: np.ndarray) -> int:
    return int(np.linalg.norm(x - target) < np.linalg.norm(x - other))


SwapFactors = Callable[[torch.Tensor, torch.Tensor], tuple[np.ndarray, np.ndarray]]


def swap_test(swap: SwapFactors, windows: list[torch.Tensor], content: np.ndarray, y: np.ndarray,
              style_probe: Pipeline, pairs: int, seed: int) -> dict:
    """Swap content and style between volumes of different sites (see the module docstring).

    Args:
        swap: ``swap(windows_a, windows_b)`` -> re-encoded ``(content (E,), style (S,))`` of A's
            content rendered with B's style (``swapped_factors`` with the model); ``swap(a, a)``
            is A's round trip.
        windows: per volume, its ``(n_i, C, d, h, w)`` scaled windows.
        content: ``(n, E)`` extracted content vectors; y: ``(n,)`` site labels.
        style_probe: a probe fit on all volumes' style.
        pairs: number of random ``(A, B)`` pairs with different sites.
    """
    rng = np.random.default_rng(seed)
    candidates = [(a, b) for a in range(len(y)) for b in range(len(y)) if y[a] != y[b]]
    chosen = [candidates[i] for i in rng.choice(len(candidates), size=min(pairs, len(candidates)), replace=False)]
    roundtrips: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def roundtrip(v: int) -> tuple[np.ndarray, np.ndarray]:
        if v not in roundtrips:
            roundtrips[v] = swap(windows[v], windows[v])
        return roundtrips[v]

    rows = []
    for a, b in chosen:
        c_swap, s_swap = swap(windows[a], windows[b])
        (c_aa, s_aa), (c_bb, s_bb) = roundtrip(a), roundtrip(b)
        rows.append({
            "style_near_b": _nearer(s_swap, s_bb, s_aa), "content_near_a": _nearer(c_swap, c_aa, c_bb),
            "style_is_b": int(style_probe.predict(s_swap[None])[0] == y[b]),
            "self_style_is_a": int(style_probe.predict(s_aa[None])[0] == y[a]),
            "cos_a": _cosine(c_swap, content[a]), "cos_b": _cosine(c_swap, content[b]),
        })
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    return {"pairs": len(rows),
            "style_closer_to_b_roundtrip": mean["style_near_b"],
            "content_closer_to_a_roundtrip": mean["content_near_a"],
            "style_predicted_as_b": mean["style_is_b"],
            "self_style_predicted_as_a": mean["self_style_is_a"],
            "content_cosine_to_a": mean["cos_a"], "content_cosine_to_b": mean["cos_b"],
            "content_closer_to_a": float(np.mean([r["cos_a"] > r["cos_b"] for r in rows]))}
