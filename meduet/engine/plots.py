"""Report figures shared by the training stages (written atomically as PNG)."""

from __future__ import annotations

from pathlib import Path

from meduet.io.figures import plt, save_figure


def plot_history(history: list[dict], keys: list[str], target: Path, title: str) -> Path:
    """Loss curves (log scale) of a training history as PNG.

    Args:
        history: metric rows with a ``step`` column (``FitResult.history``).
        keys: columns to draw; a column that is zero or missing throughout is left out
            (a switched-off loss term would break the log scale).
        target: PNG path.
        title: figure title.
    """
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [row["step"] for row in history]
    for key in keys:
        values = [row.get(key) for row in history]
        if any(v for v in values):
            ax.plot(steps, values, label=key)
    if history:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no training history (pretrained weights)", ha="center", va="center")
    ax.set_xlabel("step")
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, target)
