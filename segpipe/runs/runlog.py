"""What a training run leaves for a person to look at: ``log.csv``, ``progress.png`` and ``train.log``.

One row per epoch (losses, pseudo-Dice per label, learning rate, seconds); the plot is redrawn from
the CSV after every epoch, so it always matches the log. ``train.log`` holds every line the console
shows, with a timestamp.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from tqdm.auto import tqdm

from segpipe.core.atomic import atomic_write

TEXT_LOG = "train.log"


def say(run_dir: Path, text: str) -> None:
    """Print ``text`` (above any progress bar) and append it, timestamped, to ``run_dir/train.log``."""
    tqdm.write(text)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(run_dir / TEXT_LOG, "a") as fh:
        fh.writelines(f"{stamp} {line}\n" for line in text.splitlines())


def format_eta(seconds: float) -> str:
    """``H:MM:SS`` for a number of seconds (``?`` when unknown)."""
    if not seconds == seconds or seconds < 0 or seconds == float("inf"):  # NaN, negative or inf
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def append_row(path: Path, row: dict[str, float | int]) -> None:
    """Append a row, rewriting the file atomically (header from the first row's keys)."""
    rows = read_rows(path)
    rows.append({k: str(v) for k, v in row.items()})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: tmp.write_text(buf.getvalue()))


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def cell_float(value: str | None) -> float | None:
    """A ``log.csv`` cell as a number; None when empty or not a number."""
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def truncate_after(path: Path, epoch: int) -> None:
    """Drop rows of epochs >= ``epoch`` (after a resume from an earlier checkpoint)."""
    rows = [r for r in read_rows(path) if int(r["epoch"]) < epoch]
    if not rows:
        if path.exists():
            path.unlink()
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda tmp: tmp.write_text(buf.getvalue()))


def plot_progress(csv_path: Path, png_path: Path) -> None:
    """Loss, pseudo-Dice and learning-rate curves per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    if not rows:
        return
    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(epochs, [float(r["train_loss"]) for r in rows], label="train loss", color="tab:blue")
    ax.plot(epochs, [float(r["val_loss"]) for r in rows], label="val loss", color="tab:red")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    for key in [k for k in rows[0] if k.startswith("dice_")]:
        ax2.plot(epochs, [float(r[key]) for r in rows], linestyle="--", label=f"pseudo-Dice {key[5:]}")
    ax2.set_ylabel("pseudo-Dice")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    ax_lr.plot(epochs, [float(r["lr"]) for r in rows], color="black")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    fig.tight_layout()
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
