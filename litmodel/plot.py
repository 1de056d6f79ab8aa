"""The loss curve of a training run: train and validation loss against tokens, from its CSV log."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from litmodel.loggers import CSVLogger
from litmodel.atomic import atomic_file


def read_losses(metrics_csv: str | os.PathLike) -> dict[str, list[tuple[float, float]]]:
    """``{"loss": [(tokens, loss)...], "val_loss": [...]}`` sorted by step; a step logged twice (a resumed
    run repeats the steps after its last checkpoint) keeps its last row."""
    rows: dict[str, dict[int, tuple[float, float]]] = {"loss": {}, "val_loss": {}}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key, points in rows.items():
                if row.get(key) and row.get("tokens"):
                    points[int(row["step"])] = (float(row["tokens"]), float(row[key]))
    return {key: [points[s] for s in sorted(points)] for key, points in rows.items()}


def plot_losses(metrics_csv: str | os.PathLike, out_path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw ``out_path`` (PNG) from a ``metrics.csv`` written by `CSVLogger` during training."""
    import matplotlib  # deferred: only the end of a run needs it

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    losses = read_losses(metrics_csv)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    if losses["loss"]:
        ax.plot(*zip(*losses["loss"]), label="train loss", linewidth=1, alpha=0.8)
    if losses["val_loss"]:
        ax.plot(*zip(*losses["val_loss"]), "o-", label="val loss", linewidth=1.5, markersize=4)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss per target token")
    ax.set_title(title or str(Path(metrics_csv).parent.parent.name))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_file(out_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out_path


def write_loss_plot(fabric, out_dir: str | os.PathLike) -> Path | None:
    """``out_dir/loss.png`` from the run's CSV log (rank 0 draws and prints its path); None without a CSV log."""
    csv_loggers = [lg for lg in fabric.loggers if isinstance(lg, CSVLogger)]
    if not fabric.is_global_zero:
        return None
    if not csv_loggers or not csv_loggers[0].metrics_file.is_file():
        fabric.print("no loss plot: it is drawn from the CSV log (--logger csv or both)")
        return None
    path = plot_losses(csv_loggers[0].metrics_file, Path(out_dir) / "loss.png")
    fabric.print(f"loss curve: {path}")
    return path
