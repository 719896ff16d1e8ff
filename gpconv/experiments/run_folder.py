"""The files of a training run's folder (``TrainConfig.output``) besides its checkpoints:
``config.json``, ``history.csv``, ``training_curves.png`` (``metrics.json`` is written by
:func:`~gpconv.experiments.training.train`), and the output rule (docs/training.md) applied to the
folder before anything is written. Every file is written atomically (:mod:`gpconv.io`).

The readers of the files gpconv writes (:func:`read_run_config`, :func:`read_history`,
:func:`read_metrics`, :func:`read_tta`, and :func:`read_json_object` under them and under the sweep
plan's reader) check each file's shape in this one place: a damaged or foreign file is a one-line
:class:`RunFileError` naming the file and the field."""

from __future__ import annotations

import csv
import io
import json
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..io import (OutputError, atomic_write_text, check_not_a_file, check_writable, claim_outputs, existing_outputs,
                  folder_lock)
from .config import ModelConfig, TrainConfig, check_fields
from .data import DatasetSplits
from .plots import plot_training_curves

__all__ = ["RUN_FILES", "RUN_LOCK", "run_folder_lock", "HISTORY_FIELDS", "prepare_run_folder", "write_run_config", "write_history", "RunFileError",
           "read_json_object", "read_run_config", "read_history", "read_metrics", "read_tta"]

RUN_FILES = ("config.json", "history.csv", "metrics.json", "training_curves.png", "best.pt", "last.pt")
# what a run folder can hold before its first last.pt: config.json from the start, and best.pt of epoch 0
# (shrink's fitted start, validated before the first epoch) or of epoch 1 (written just before last.pt)
_BEFORE_FIRST_EPOCH = ("config.json", "best.pt")
HISTORY_FIELDS = ("epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds")


RUN_LOCK = ".gpconv.lock"  # held by the process training a run folder (prepare_run_folder's ``lock``)


def run_folder_lock(output: Path):
    """Create ``output`` and hold its lock file :data:`RUN_LOCK` (a context manager, reentrant in one
    process): :class:`~gpconv.io.FolderBusy` (one line) when another process is training there."""
    check_writable(output)
    return folder_lock(output, RUN_LOCK, busy=f"{output} is being trained by another gpconv process (it holds "
                                              f"{RUN_LOCK}); wait for it to finish")


def prepare_run_folder(output: Path, *, resume: bool, overwrite: bool, main: bool = True,
                       lock: Optional[ExitStack] = None) -> bool:
    """Apply the output rule (docs/training.md) to a run folder before anything is written: a folder
    that holds a run is refused unless ``resume`` (it must have ``last.pt``, or hold only what a run
    writes before its first epoch ends, and then it starts again) or ``overwrite`` (its run files are
    deleted); other files are never touched. On the main process, create the folder, check
    it is writable and, with ``lock``, take the folder's lock file :data:`RUN_LOCK` into that stack
    (:class:`~gpconv.io.FolderBusy`, one line, when another process is training there: its temporaries
    are not removed), then remove temporaries of killed writes. Returns whether to resume from ``last.pt``."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    check_not_a_file(output)
    found = existing_outputs(output, RUN_FILES)
    if resume and found and set(found) <= set(_BEFORE_FIRST_EPOCH) and _best_of_epoch_0_or_1(output):
        found = []  # killed before its first epoch ended: nothing learned to keep, so it starts again
    finished = "metrics.json" in found and "last.pt" not in found  # e.g. shrink --epochs 0: nothing to resume
    if found and "last.pt" not in found and (resume or (finished and not overwrite)):
        raise OutputError(f"{output} holds a {'finished ' if finished else ''}run without last.pt ({', '.join(found)}), "
                          "so it cannot be resumed; pass --overwrite to replace it or choose another --output")
    if found and not (resume or overwrite):
        raise OutputError(f"{output} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                          "--overwrite to replace it, or choose another --output")
    if main:
        if lock is not None:
            lock.enter_context(run_folder_lock(output))
        claim_outputs(output, RUN_FILES, overwrite=True)
        if overwrite:
            for name in found:
                (output / name).unlink()
    return resume and "last.pt" in found


def _best_of_epoch_0_or_1(output: Path) -> bool:
    """Whether ``output/best.pt``, if any, holds the weights of epoch 0 or 1 (what a run saves before its
    first ``last.pt``), not a later epoch's kept on its own, which a restart would replace."""
    if not (output / "best.pt").is_file():
        return True
    from .checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(output / "best.pt", require=("epoch",))["epoch"] in (0, 1)
    except CheckpointError:
        return False


def write_run_config(output: Path, model_config: ModelConfig, config: TrainConfig, world_size: int,
                     splits: DatasetSplits) -> None:
    """``config.json``: the model and training configs, world size, class names and split sizes."""
    atomic_write_text(output / "config.json", json.dumps(
        {"model": asdict(model_config), "train": asdict(config), "world_size": world_size,
         "class_names": splits.class_names, "train_images": len(splits.train),
         "val_images": len(splits.val), "test_images": len(splits.test), "notes": splits.notes}, indent=2))


def write_history(output: Path, history: List[dict]) -> None:
    """``history.csv`` (one row per epoch, :data:`HISTORY_FIELDS`) and ``training_curves.png``."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row[k] for k in HISTORY_FIELDS})
    atomic_write_text(output / "history.csv", out.getvalue())
    plot_training_curves(history, output / "training_curves.png")


class RunFileError(ValueError):
    """A file of a run or sweep folder is damaged or not gpconv's (one line naming the file and field)."""


_NUMBER = ((int, float), "a number")
_INTEGER = ((int,), "an integer")
_TEXT = ((str,), "a string")
_FLAG = ((bool,), "true or false")
# field -> (types, description, required) of the JSON files of a run folder
METRICS_FIELDS = {"trainable_params": (*_INTEGER, True), "computations": (*_INTEGER, True),
                  "test_accuracy": (*_NUMBER, True), "epochs": (*_INTEGER, False), "dataset": (*_TEXT, False),
                  "hflip_tta": (*_FLAG, False), "train_seconds": (*_NUMBER, False)}
TTA_FIELDS = {"test_accuracy": (*_NUMBER, False), "test_accuracy_hflip_tta": (*_NUMBER, False),
              "epoch": (*_INTEGER, False)}
CONFIG_FIELDS = {"model": ((dict,), "a mapping", False), "train": ((dict,), "a mapping", False),
                 "class_names": ((list,), "a list", False)}


def read_json_object(path, schema: Dict[str, Tuple[tuple, str, bool]]) -> dict:
    """The JSON object in ``path``, each field of ``schema`` (``name -> (types, description,
    required)``) checked; :class:`RunFileError` (one line, naming the file and the field) otherwise.
    Booleans never count as numbers; accuracies (fields ending in ``accuracy``) must be in [0, 1]."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise RunFileError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    except ValueError as error:
        raise RunFileError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise RunFileError(f"{path} is not a gpconv file: it holds a {type(value).__name__}, not a JSON object")
    for name, (types, description, required) in schema.items():
        if name not in value:
            if required:
                raise RunFileError(f"{path} has no field {name!r}")
            continue
        item = value[name]
        bad = not isinstance(item, types) or (isinstance(item, bool) and bool not in types)
        if not bad and name.endswith("accuracy") and not 0 <= item <= 1:
            description, bad = "a number in [0, 1]", True
        if bad:
            raise RunFileError(f"{path}: field {name!r} is {item!r}, expected {description}")
    return value


def read_metrics(path) -> dict:
    """``metrics.json`` of a finished run (:data:`METRICS_FIELDS` checked)."""
    return read_json_object(path, METRICS_FIELDS)


def read_tta(path) -> dict:
    """``tta.json`` of a sweep's run (:data:`TTA_FIELDS` checked)."""
    return read_json_object(path, TTA_FIELDS)


def read_run_config(path, require: Tuple[str, ...] = ("model", "train")) -> dict:
    """``config.json`` of a run: its ``model`` and ``train`` mappings (those in ``require`` must be
    there) with the types of :class:`ModelConfig` and :class:`TrainConfig`, ``class_names`` a list of
    strings."""
    config = read_json_object(path, {name: (*rule[:2], name in require) for name, rule in CONFIG_FIELDS.items()})
    try:
        if "model" in config:
            ModelConfig.from_dict(config["model"], f"{path} model")
        if "train" in config:
            check_fields(TrainConfig, config["train"], f"{path} train")
    except ValueError as error:
        raise RunFileError(str(error)) from None
    if not all(isinstance(name, str) for name in config.get("class_names", [])):
        raise RunFileError(f"{path}: field 'class_names' is not a list of strings")
    return config


def read_history(path) -> List[dict]:
    """``history.csv``: one dict of floats per epoch with every column of :data:`HISTORY_FIELDS`;
    :class:`RunFileError` naming the file, the line and the column when one is missing or not a number."""
    path = Path(path)
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [name for name in HISTORY_FIELDS if name not in (reader.fieldnames or [])]
            if missing:
                raise RunFileError(f"{path} has no column {missing[0]!r} (expected: {', '.join(HISTORY_FIELDS)})")
            rows = []
            for row in reader:
                parsed = {}
                for name in HISTORY_FIELDS:
                    try:
                        parsed[name] = float(row[name])
                    except (TypeError, ValueError):
                        shown = "missing" if row[name] is None else repr(row[name])
                        raise RunFileError(f"{path} line {reader.line_num}: column {name!r} is {shown}, expected a "
                                           "number (a truncated or damaged file)") from None
                rows.append(parsed)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise RunFileError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
    return rows
