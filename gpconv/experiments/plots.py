"""Training curves (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from .results import save_figure

__all__ = ["plot_training_curves"]


def plot_training_curves(history: List[Dict[str, float]], path) -> Path:
    """Write a PNG with accuracy (left) and loss (right), train vs validation, per epoch. Atomic."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

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
    try:
        return save_figure(figure, path)
    finally:
        plt.close(figure)
