"""The report's PNG plots (matplotlib, Agg backend), written atomically beside ``report.md``.

Called by :mod:`segpipe.evaluation.report` with numbers it has already computed: the candidates' out-of-fold
Dice, and each fold's ``log.csv`` rows (training curves).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.core.atomic import atomic_write


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically and close it."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    pyplot().close(fig)
    return path


def plot_candidates(rows: list[dict[str, Any]], labels: list[int | str], path: Path) -> str:
    """Grouped bars: per candidate, the mean Dice of each label and over labels. Returns the path."""
    plt = pyplot()
    keys = [str(v) for v in labels]
    series = [(f"label {k}", [r["dice"].get(k) for r in rows]) for k in keys] + [
        ("mean", [r["mean_dice"] for r in rows])
    ]
    x = np.arange(len(rows))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows) + 2), 4.5))
    for i, (name, vals) in enumerate(series):
        heights = [0.0 if v is None or math.isnan(v) else v for v in vals]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, [r["name"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("out-of-fold Dice")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return str(save_png(fig, path))


def plot_curves(config: str, logs: dict[int, list[dict[str, str]]], path: Path) -> str:
    """Per fold: train (solid) and validation (dashed) loss, and mean pseudo-Dice, against epoch."""
    plt = pyplot()
    fig, (ax_loss, ax_dice) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for i, (fold, rows) in enumerate(sorted(logs.items())):
        color = f"C{i % 10}"
        epochs = [int(r["epoch"]) for r in rows]
        ax_loss.plot(epochs, [_num(r.get("train_loss")) for r in rows], color=color, label=f"fold {fold} train")
        ax_loss.plot(
            epochs, [_num(r.get("val_loss")) for r in rows], color=color, linestyle="--", label=f"fold {fold} val"
        )
        ax_dice.plot(epochs, [_num(r.get("mean_dice")) for r in rows], color=color, label=f"fold {fold}")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"{config}: training curves")
    ax_loss.legend(fontsize=7, ncol=2)
    ax_dice.set_ylabel("mean pseudo-Dice")
    ax_dice.set_ylim(0, 1)
    ax_dice.set_xlabel("epoch")
    ax_dice.legend(fontsize=7)
    fig.tight_layout()
    return str(save_png(fig, path))


def _num(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan
