"""Report figures: matplotlib without a display, written atomically as PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; set before pyplot is imported anywhere
import matplotlib.pyplot as plt  # noqa: E402

from meduet.io.atomic import atomic_path  # noqa: E402

__all__ = ["plt", "save_figure"]


def save_figure(fig: plt.Figure, target: Path, dpi: float | str = 80) -> Path:
    """Write ``fig`` to ``target`` (PNG) atomically and close it (``dpi="figure"``: the figure's own)."""
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return target
