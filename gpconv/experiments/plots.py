"""Figures: matplotlib with the Agg backend (no display needed), PNGs written atomically, and a run's
training curves. The bottom of the experiments' plotting: it imports only :mod:`gpconv.io`, so the
run folder (:mod:`.run_folder`), the report (:mod:`.report_plots`) and the class activation maps
(:mod:`.cam`) all draw through it and the imports run one way."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from ..io import atomic_write

__all__ = ["load_pyplot", "save_figure", "save_and_close", "plot_training_curves"]


def load_pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend (imported when first needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path) -> Path:
    """Save a matplotlib figure as PNG (100 dpi) atomically (:func:`gpconv.io.atomic_write`)."""
    return atomic_write(path, lambda out: figure.savefig(out, format="png", dpi=100))


def save_and_close(figure, path) -> Path:
    """:func:`save_figure`, then close ``figure`` (also when saving fails). Returns the written path."""
    try:
        return save_figure(figure, path)
    finally:
        load_pyplot().close(figure)


def plot_training_curves(history: List[Dict[str, float]], path) -> Path:
    """Write a PNG with accuracy (left) and loss (right), train vs validation, per epoch. Atomic."""
    plt = load_pyplot()
    path = Path(path)
    epochs = [row["epoch"] for row in history]
    figure, (accuracy, loss) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, label in ((accuracy, "accuracy", "Accuracy"), (loss, "loss", "Loss")):
        axis.plot(epochs, [row[f"train_{key}"] for row in history], marker="o", label="train")
        axis.plot(epochs, [row[f"val_{key}"] for row in history], marker="o", label="validation")
        axis.set_xlabel("Epoch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    accuracy.set_ylim(0, 1)
    figure.tight_layout()
    return save_and_close(figure, path)
