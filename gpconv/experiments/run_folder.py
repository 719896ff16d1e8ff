"""The files of a training run's folder (``TrainConfig.output``) besides its checkpoints:
``config.json``, ``history.csv``, ``training_curves.png`` (``metrics.json`` is written by
:func:`~gpconv.experiments.training.train`), and the output rule (docs/training.md) applied to the
folder before anything is written. Every file is written atomically (:mod:`gpconv.io`)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import List

from ..io import OutputError, atomic_write_text, claim_outputs, existing_outputs
from .config import ModelConfig, TrainConfig
from .data import DatasetSplits

__all__ = ["RUN_FILES", "HISTORY_FIELDS", "prepare_run_folder", "write_run_config", "write_history"]

RUN_FILES = ("config.json", "history.csv", "metrics.json", "training_curves.png", "best.pt", "last.pt")
HISTORY_FIELDS = ("epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds")


def prepare_run_folder(output: Path, *, resume: bool, overwrite: bool, main: bool = True) -> bool:
    """Apply the output rule (docs/training.md) to a run folder before anything is written: a folder
    that holds a run is refused unless ``resume`` (it must have ``last.pt``) or ``overwrite`` (its run
    files are deleted); other files are never touched. On the main process, create the folder, check
    it is writable and remove temporaries of killed writes. Returns whether to resume from ``last.pt``."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    found = existing_outputs(output, RUN_FILES)
    if found and resume and "last.pt" not in found:
        raise OutputError(f"{output} holds a run without last.pt ({', '.join(found)}), so it cannot be resumed; "
                          "pass --overwrite to replace it or choose another --output")
    if found and not (resume or overwrite):
        raise OutputError(f"{output} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                          "--overwrite to replace it, or choose another --output")
    if main:
        claim_outputs(output, RUN_FILES, overwrite=True)
        if overwrite:
            for name in found:
                (output / name).unlink()
    return resume and "last.pt" in found


def write_run_config(output: Path, model_config: ModelConfig, config: TrainConfig, world_size: int,
                     splits: DatasetSplits) -> None:
    """``config.json``: the model and training configs, world size, class names and split sizes."""
    atomic_write_text(output / "config.json", json.dumps(
        {"model": asdict(model_config), "train": asdict(config), "world_size": world_size,
         "class_names": splits.class_names, "train_images": len(splits.train),
         "val_images": len(splits.val), "test_images": len(splits.test), "notes": splits.notes}, indent=2))


def write_history(output: Path, history: List[dict]) -> None:
    """``history.csv`` (one row per epoch, :data:`HISTORY_FIELDS`) and ``training_curves.png``."""
    from .plots import plot_training_curves

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row[k] for k in HISTORY_FIELDS})
    atomic_write_text(output / "history.csv", out.getvalue())
    plot_training_curves(history, output / "training_curves.png")
