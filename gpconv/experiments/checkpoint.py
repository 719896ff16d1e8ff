"""Checkpoints of a training run: the format, atomic saving, safe loading (``torch.load(...,
weights_only=True)``: only tensors and plain types), every RNG state, and the checks a resumed run
must pass (the settings that shape the result must be the saved ones)."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, fields
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..io import atomic_write, first_line
from .config import ModelConfig, TrainConfig, check_fields, field_default

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "MODEL_KEYS", "RESUME_KEYS", "RESUMABLE_CHANGES",
           "atomic_torch_save", "load_checkpoint", "model_checkpoint", "capture_rng_state", "restore_rng_state",
           "resume_differences", "resume_from",
           "load_model_from_checkpoint", "checkpoint_dataset", "checkpoint_test_split"]

CHECKPOINT_FORMAT = "gpconv-checkpoint-v1"
# what a checkpoint must hold to rebuild its model, and to resume training from it
MODEL_KEYS = ("model_config", "train_config", "class_names", "epoch", "model")
RESUME_KEYS = MODEL_KEYS + ("optimizer", "scaler", "rng", "history", "best")
# TrainConfig fields a resumed run may change: where it is read, written and run, and how long it trains
RESUMABLE_CHANGES = ("output", "data_dir", "device", "epochs", "eval_batch_size")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit (one-line message)."""


def atomic_torch_save(obj, path) -> Path:
    """``torch.save`` with :func:`~gpconv.io.atomic_write`."""
    return atomic_write(Path(path), lambda out: torch.save(obj, out))


def model_checkpoint(model_config: ModelConfig, config: TrainConfig, class_names: Sequence[str], epoch: int,
                     model: nn.Module) -> dict:
    """What every checkpoint holds (:data:`MODEL_KEYS` and the format tag); ``epoch`` is 1-based."""
    return {"format": CHECKPOINT_FORMAT, "model_config": asdict(model_config), "train_config": asdict(config),
            "class_names": list(class_names), "epoch": epoch, "model": model.state_dict()}


def load_checkpoint(path, map_location="cpu", require: Sequence[str] = ()) -> dict:
    """Read a gpconv checkpoint with ``weights_only=True``; :class:`CheckpointError` when unusable or
    when it lacks one of the keys in ``require`` (e.g. :data:`MODEL_KEYS`, :data:`RESUME_KEYS`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many kinds for a damaged file
        # first sentence only: torch's weights_only message goes on to suggest weights_only=False,
        # which is exactly what a damaged or untrusted file must not be loaded with
        message = str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a gpconv checkpoint ({message})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a gpconv checkpoint")
    missing = [key for key in require if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is incomplete: it has no {', '.join(missing)}")
    _check_shape(path, checkpoint)
    return checkpoint


def _check_shape(path: Path, checkpoint: dict) -> None:
    """:class:`CheckpointError` (one line, naming the file and the field) when a key of ``checkpoint``
    that gpconv reads has the wrong type: the one check of a checkpoint's shape."""
    try:
        if "model" in checkpoint and not isinstance(checkpoint["model"], dict):
            raise ValueError(f"its model is not a mapping of tensors (got {type(checkpoint['model']).__name__})")
        if "model_config" in checkpoint:
            ModelConfig.from_dict(checkpoint["model_config"], "its model_config")
        if "train_config" in checkpoint:
            check_fields(TrainConfig, checkpoint["train_config"], "its train_config")
        epoch = checkpoint.get("epoch", 1)
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"its epoch is {epoch!r}, expected an integer >= 0")
        names = checkpoint.get("class_names", [])
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ValueError("its class_names is not a list of strings")
        history = checkpoint.get("history", [])
        if not isinstance(history, list) or not all(isinstance(row, dict) and all(
                _is_number(value) for value in row.values()) for row in history):
            raise ValueError("its history is not a list of epochs (mappings of numbers)")
        best = checkpoint.get("best")
        if best is not None and not (isinstance(best, dict) and _is_number(best.get("value"))
                                     and _is_number(best.get("epoch"))):
            raise ValueError(f"its best is {best!r}, expected null or a mapping with epoch and value")
    except ValueError as error:
        raise CheckpointError(f"{path} is damaged: {error}") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def capture_rng_state(augment_generator: torch.Generator) -> dict:
    """Every RNG state a run draws from (torch, CUDA, numpy, Python, the augmentation's generator),
    as tensors and plain types so that ``weights_only=True`` can read it back."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "augment": augment_generator.get_state(),
        "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]), "numpy_has_gauss": int(numpy_state[3]),
        "numpy_gauss": float(numpy_state[4]),
        "python": torch.tensor(python_state[1], dtype=torch.int64),
        "python_gauss": python_state[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, augment_generator: torch.Generator) -> None:
    """Undo :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    augment_generator.set_state(state["augment"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_differences(checkpoint: dict, config: TrainConfig, model_config: ModelConfig,
                       class_names: Sequence[str]) -> List[str]:
    """Settings that shape the result and differ between a saved run (``checkpoint``) and this one,
    as ``"name saved (now new)"``. A setting the checkpoint predates counts as its default."""
    differences = []
    for kind, saved, current in ((ModelConfig, checkpoint["model_config"], model_config),
                                 (TrainConfig, checkpoint["train_config"], config)):
        for item in fields(kind):
            if kind is TrainConfig and item.name in RESUMABLE_CHANGES:
                continue
            old, new = (json.loads(json.dumps(v)) for v in (saved.get(item.name, field_default(item)),
                                                             getattr(current, item.name)))
            if old != new:
                differences.append(f"{item.name} {old!r} (now {new!r})")
    if list(checkpoint["class_names"]) != list(class_names):
        differences.append(f"class names {list(checkpoint['class_names'])} (now {list(class_names)})")
    return differences


def resume_from(path: Path, config: TrainConfig, model_config: ModelConfig, class_names: Sequence[str],
                model: nn.Module, optimizer, scaler, augment_generator: torch.Generator, device) -> dict:
    """Load ``path`` (last.pt), refuse it when a setting differs (:func:`resume_differences`), restore
    the model, optimizer, scaler and every RNG state; the checkpoint."""
    checkpoint = load_checkpoint(path, map_location=device, require=RESUME_KEYS)
    differences = resume_differences(checkpoint, config, model_config, class_names)
    if differences:
        raise ValueError(f"--resume: {path} was trained with other settings: {'; '.join(differences)}; resume "
                         "with the saved settings or choose another --output")
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng"], augment_generator)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as error:
        raise CheckpointError(f"{path} cannot be resumed: {first_line(error)}") from None
    return checkpoint


def load_model_from_checkpoint(path, map_location="cpu"):
    """``(model in eval mode, ModelConfig, checkpoint dict)`` from a gpconv checkpoint (``weights_only``)."""
    checkpoint = load_checkpoint(path, map_location=map_location, require=MODEL_KEYS)
    model_config = ModelConfig.from_dict(checkpoint["model_config"])
    model = model_config.build()
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError) as error:
        raise CheckpointError(f"{path} does not fit {model_config.arch}: {str(error).splitlines()[0]}") from None
    return model.eval(), model_config, checkpoint


def checkpoint_dataset(path, checkpoint: dict, dataset: Optional[str] = None,
                       data_dir: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """``(dataset, data_dir)``: the ones given, else those the checkpoint at ``path`` was trained with."""
    trained = checkpoint["train_config"]
    dataset = dataset or trained.get("dataset")
    if not dataset:
        raise CheckpointError(f"{path} does not say which dataset it was trained on: pass --dataset")
    return dataset, data_dir if data_dir is not None else trained.get("data_dir")


def checkpoint_test_split(path, checkpoint: dict, model_config, dataset: Optional[str] = None,
                          data_dir: Optional[str] = None, seed: Optional[int] = None):
    """``(dataset name, its splits)`` to evaluate the checkpoint at ``path`` on: the given dataset, data
    folder and seed, else those it was trained with; refused when the class counts differ."""
    from .data import load_dataset

    dataset, data_dir = checkpoint_dataset(path, checkpoint, dataset, data_dir)
    trained = checkpoint["train_config"]
    splits = load_dataset(dataset, data_dir, image_size=model_config.image_size,
                          seed=trained.get("seed", 0) if seed is None else seed,
                          synthetic_size=tuple(trained.get("synthetic_size", (2000, 500))))
    if splits.num_classes != model_config.num_classes:
        raise CheckpointError(f"{path} has {model_config.num_classes} classes, {dataset} has {splits.num_classes}")
    return dataset, splits
