"""PNG figures of a run: training curves and confusion matrices.

matplotlib is imported lazily with the non-interactive Agg backend, so plotting works on
headless machines and importing bnzoo never opens a display. Figures are written to a temporary
file and renamed into place, like every other run artifact.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from bnzoo.atomic_files import replaced_atomically


def _pyplot():
    """matplotlib's pyplot on the Agg backend; ImportError says how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("matplotlib is needed for PNG figures: pip install matplotlib") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as pyplot

    return pyplot


def _save_figure(figure, path: str) -> None:
    pyplot = _pyplot()
    try:
        with replaced_atomically(path) as tmp:
            figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        pyplot.close(figure)


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> str:
    """Loss, accuracy and learning rate per epoch, training and validation, as one PNG.

    Args:
        history: rows as in `history.csv` (`epoch`, `loss`, `accuracy`, optional `val_*`,
            `learning_rate`).
        path: the PNG to write.

    Returns:
        `path` as a string.
    """
    path = os.fspath(path)
    pyplot = _pyplot()
    epochs = [int(row["epoch"]) for row in history]
    figure, axes = pyplot.subplots(1, 3, figsize=(13, 3.6))
    panels = (
        ("loss", "cross-entropy loss"),
        ("accuracy", "accuracy"),
        ("learning_rate", "learning rate"),
    )
    for axis, (key, title) in zip(axes, panels, strict=True):
        for prefix, label, style in (("", "train", "-o"), ("val_", "validation", "-s")):
            if key == "learning_rate" and prefix:
                continue
            points = [
                (e, row[prefix + key])
                for e, row in zip(epochs, history, strict=True)
                if prefix + key in row
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                axis.plot(xs, ys, style, markersize=3, label=label)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        if key != "learning_rate" and axis.get_legend_handles_labels()[0]:
            axis.legend()
    if not epochs:
        figure.suptitle("no finished epoch yet")
    _save_figure(figure, path)
    return path


def plot_confusion_matrix(
    confusion_matrix: Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str = "confusion matrix",
) -> str:
    """The confusion matrix (rows: true class, columns: predicted class) as a PNG heat map,
    normalized per row so that the diagonal reads as per-class accuracy; cells show counts.

    Returns:
        `path` as a string.
    """
    import numpy as np

    path = os.fspath(path)
    pyplot = _pyplot()
    counts = np.asarray(confusion_matrix, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    size = max(4.0, 0.55 * len(class_names) + 2)
    figure, axis = pyplot.subplots(figsize=(size + 1, size))
    image = axis.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axis, fraction=0.046, label="fraction of the true class")
    ticks = range(len(class_names))
    axis.set_xticks(ticks, labels=class_names, rotation=45, ha="right")
    axis.set_yticks(ticks, labels=class_names)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title(title)
    if len(class_names) <= 20:
        for row in ticks:
            for column in ticks:
                axis.text(
                    column,
                    row,
                    str(counts[row, column]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rates[row, column] > 0.5 else "black",
                )
    _save_figure(figure, path)
    return path
