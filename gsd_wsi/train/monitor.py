"""Pictures that let a person see a model learn: image grids and the loss curve."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from gsd_wsi.atomic import atomic_write_bytes
from gsd_wsi.qc import save_png

logger = logging.getLogger(__name__)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, n_cols: int, gap_px: int = 2) -> np.ndarray:
    """Tile (N, H, W, 3) uint8 images into one picture, row-major, white gaps between them."""
    n, h, w, _ = images.shape
    n_rows = -(-n // n_cols)
    grid = np.full((n_rows * (h + gap_px) - gap_px, n_cols * (w + gap_px) - gap_px, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, n_cols)
        grid[r * (h + gap_px): r * (h + gap_px) + h, c * (w + gap_px): c * (w + gap_px) + w] = images[i]
    return grid


def save_grid(path: Path, images: torch.Tensor, n_cols: int, text: dict[str, str] | None = None) -> None:
    save_png(path, image_grid(to_uint8(images), n_cols), text)


def plot_loss_curve(metrics_path: Path, out_path: Path, title: str) -> None:
    """Training and validation loss against step, from metrics.jsonl, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, val_steps, val_losses = [], [], [], []
    for line in Path(metrics_path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if row.get("loss") is not None:
            steps.append(row["step"])
            losses.append(row["loss"])
        if row.get("val_loss") is not None:
            val_steps.append(row["step"])
            val_losses.append(row["val_loss"])
    if not steps:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, lw=1, label="train loss")
    if val_steps:
        ax.plot(val_steps, val_losses, "o-", lw=1.5, ms=3, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("P2-weighted noise MSE")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(out_path, buffer.getvalue())


def plot_curves(metrics_path: Path, out_path: Path, title: str, panels: list[tuple[str, str, bool]]) -> None:
    """One panel per (metric key, axis label, log scale) against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for line in Path(metrics_path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), dpi=110, squeeze=False)
    for ax, (key, label, log) in zip(axes[0], panels):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), "o-" if len(points) < 40 else "-", lw=1.2, ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if log and points:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(out_path, buffer.getvalue())


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the metric lines written after ``step``, the checkpoint a resumed run continues
    from (and a line cut short by a crash), so the file holds each step once."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if _line_step(line) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return 1 << 62  # a line cut short by a crash: dropped
