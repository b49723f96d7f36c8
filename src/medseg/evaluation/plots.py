"""PNG plots for DVC and MLflow: training curves and image/label/prediction overlays."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

__all__ = ["training_curves", "overlay"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless; chosen here, not at import, so importing medseg changes no global state
    import matplotlib.pyplot as plt

    return plt


def training_curves(history_csv: str | Path, out: str | Path) -> Path:
    """Loss and validation Dice against epoch."""
    plt = _pyplot()
    with Path(history_csv).open() as fh:
        rows = list(csv.DictReader(fh))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [float(r["train_loss"]) for r in rows])
    ax_loss.set(xlabel="epoch", ylabel="Dice + CE loss", title="training loss")
    for key in [k for k in rows[0] if k.startswith("val_dice")]:
        points = [(e, float(r[key])) for e, r in zip(epochs, rows) if r[key]]
        if points:
            ax_dice.plot(*zip(*points), marker="o", label=key.removeprefix("val_dice_") if key != "val_dice" else "mean")
    ax_dice.set(xlabel="epoch", ylabel="Dice", ylim=(0, 1), title="validation Dice")
    ax_dice.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return Path(out)


def overlay(image: np.ndarray, label: np.ndarray, pred: np.ndarray, out: str | Path, title: str = "") -> Path:
    """Three panels (image, ground truth, prediction) of the axial slice with the most foreground."""
    plt = _pyplot()
    z = int(np.argmax((label > 0).sum(axis=(0, 1))))
    n = max(int(label.max()), int(pred.max()), 1)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, mask, name in zip(axes, (None, label, pred), ("image", "ground truth", "prediction")):
        ax.imshow(np.rot90(image[:, :, z]), cmap="gray")
        if mask is not None:
            shown = np.ma.masked_equal(np.rot90(mask[:, :, z]), 0)
            ax.imshow(shown, cmap="tab10", vmin=0, vmax=max(n, 9), alpha=0.45, interpolation="nearest")
        ax.set_title(f"{name}" + (f" ({title}, z={z})" if mask is None and title else ""), fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return Path(out)
