"""Shrink a trained dense model: convert -> fit -> distil -> evaluate (``gpconv shrink``).

A gpconv run folder of a dense model (``best.pt``) becomes a new run folder of its grouped version:

1. ``gpconv.convert`` with one channels per group, or a per-layer choice under a parameter budget
   (:func:`gpconv.core.fit.choose_channels_per_group`);
2. every grouped block fitted to the dense layer it replaced on calibration images from the run's
   own training split (:func:`gpconv.core.fit.fit_to_dense`), then each block of layers (an MBConv)
   trained towards the dense model's block output on the inputs the shrunk model gives it
   (:func:`gpconv.core.reconstruction.reconstruct_blocks`, ``block_steps``); ``init="random"`` skips
   both: the control;
3. fine-tuning with the dense model as teacher (:func:`gpconv.experiments.training.distillation_loss`)
   on the cosine schedule, through :func:`gpconv.experiments.training.train`: the same run folder,
   resume, output rule and progress as ``gpconv train``; ``epochs=0`` evaluates the fitted model.

The folder is an ordinary run folder: ``config.json`` (the model config carries the conversion
record; the train config names the teacher and the ``shrink`` settings), ``fit.json`` (each block's
relative output error), ``history.csv``, ``metrics.json``, ``best.pt`` -- which ``gpconv evaluate``,
``export`` and ``cam`` load like any other.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, List

import torch

from ..core.convert import conversion_record, convert
from ..core.counting import count_computations, count_parameters
from ..core.fit import choose_channels_per_group, fit_to_dense
from ..core.reconstruction import reconstruct_blocks
from ..io import OutputError, atomic_write_text, claim_outputs, existing_outputs
from .checkpoint import (CheckpointError, atomic_torch_save, checkpoint_test_split, load_checkpoint,
                         load_model_from_checkpoint, model_checkpoint)
from .config import EARLIER_SHRINK_SETTINGS, SHRINK_INITS, ModelConfig, ShrinkConfig, TrainConfig
from .data import DatasetSplits, to_float
from .metrics import evaluate_model
from .run_folder import prepare_run_folder, run_folder_lock, write_run_config
from .training import _progress, train

__all__ = ["ShrinkConfig", "shrink", "SHRINK_INITS", "calibration_batches"]

BUDGET_FIT_STEPS = 30  # refinement steps of each (layer, choice) fit that ranks the choices under a budget
FIT_FILE = "fit.json"  # each block's fit error, the budget's choice, the fit's time


def calibration_batches(splits: DatasetSplits, count: int, seed: int, batch_size: int = 64) -> List[torch.Tensor]:
    """``count`` training images (a seeded random choice, no augmentation) as float batches."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(splits.train), generator=generator)[:count]
    images = to_float(splits.train.images[order])
    return [batch.contiguous(memory_format=torch.channels_last) for batch in images.split(batch_size)]


def _teacher(config: ShrinkConfig):
    teacher, model_config, checkpoint = load_model_from_checkpoint(config.checkpoint)
    if model_config.channels_per_group is not None or model_config.conversion is not None:
        raise CheckpointError(f"{config.checkpoint} is already a grouped model (channels_per_group="
                              f"{model_config.channels_per_group}): shrink starts from a dense model")
    return teacher, model_config, checkpoint


def _splits(config: ShrinkConfig, checkpoint: dict, model_config: ModelConfig) -> DatasetSplits:
    """The teacher run's own splits (the helper ``evaluate`` and ``cam`` use); a training split is needed."""
    if not checkpoint["train_config"].get("dataset"):
        raise CheckpointError(f"{config.checkpoint} does not say which dataset it was trained on")
    dataset, splits = checkpoint_test_split(config.checkpoint, checkpoint, model_config)
    if len(splits.train) == 0:
        raise ValueError(f"{dataset} has no training split to calibrate on")
    return splits


def _convert(teacher, config: ShrinkConfig, calibration, log):
    if config.budget is None:
        return convert(teacher, config.channels_per_group, version=config.version, l_layer=config.l_layer), None
    log(f"choosing channels per group for each layer under a budget of {config.budget:g} of the parameters")
    choice = choose_channels_per_group(teacher, calibration, config.budget, version=config.version,
                                       l_layer=config.l_layer, steps=min(config.fit_steps, BUDGET_FIT_STEPS),
                                       progress=_bar("fit choices"))
    log(f"chosen: {choice.parameters:,} of {choice.budget_parameters:,} allowed parameters, total fit error "
        f"{choice.total_error:.3f}")
    return convert(teacher, choice.mapping, version=config.version, l_layer=config.l_layer), choice


def _bar(description: str) -> Callable:
    """A progress wrapper for the fit's per-layer loops (training's, shown on a terminal)."""
    return lambda items: _progress(items, len(items), description, sys.stdout.isatty())


def _train_config(config: ShrinkConfig, checkpoint: dict) -> TrainConfig:
    trained = dict(checkpoint["train_config"])
    base = TrainConfig(**{key: value for key, value in trained.items() if key in TrainConfig.__dataclass_fields__})
    return replace(base, output=config.output, epochs=max(config.epochs, 1), lr=config.learning_rate, schedule="cosine",
                   optimizer=config.optimizer, augment=config.augment,
                   seed=config.seed, teacher=str(config.checkpoint), temperature=config.temperature,
                   distillation_weight=config.distillation_weight, shrink=config.settings)


def shrink(config: ShrinkConfig, *, resume: bool = False, overwrite: bool = False,
           log: Callable[[str], None] = print) -> dict:
    """Run :class:`ShrinkConfig` into ``config.output`` (module docstring); returns the test metrics."""
    config.check()
    teacher, model_config, checkpoint = _teacher(config)
    output = Path(config.output)
    if _check_output(output, resume, overwrite):  # the conversion and fit are in last.pt already
        saved = load_checkpoint(output / "last.pt", require=("model_config",))
        return train(_train_config(config, checkpoint), ModelConfig.from_dict(saved["model_config"]), resume=True,
                     log=log)
    start = _start_from(config) if config.start_from is not None else None
    splits = _splits(config, checkpoint, model_config)
    with run_folder_lock(output):  # before the fit, through train: no other process writes here meanwhile
        if _check_output(output, resume, overwrite):
            raise OutputError(f"another gpconv process trained in {output} meanwhile; run the command again")
        # resume without last.pt: the folder holds only what a run writes before its first epoch ends
        # (prepare_run_folder refused anything else), so the run starts again over it
        overwrite = overwrite or resume
        if start is not None:
            converted, shrunk_config, fit_report = start
        else:
            converted, shrunk_config, fit_report = _convert_and_fit(teacher, model_config, config, splits, log)
        train_config = _train_config(config, checkpoint)
        if config.epochs == 0:
            return _evaluate_unchanged(converted, shrunk_config, train_config, splits, overwrite, fit_report, log)
        claim_outputs(output, (FIT_FILE,), overwrite=True)  # checked above
        atomic_write_text(output / FIT_FILE, json.dumps(fit_report, indent=2))
        return train(train_config, shrunk_config, overwrite=overwrite, log=log, splits=splits,
                     initial_state=converted.state_dict())


def _check_output(output: Path, resume: bool, overwrite: bool) -> bool:
    """The output rule for a shrink's folder (``prepare_run_folder``'s, and ``fit.json``'s); whether to
    resume from its ``last.pt``. Writes nothing."""
    resuming = prepare_run_folder(output, resume=resume, overwrite=overwrite, main=False)
    if not (resume or overwrite) and existing_outputs(output, (FIT_FILE,)):
        raise OutputError(f"{output} already holds {FIT_FILE}; pass --overwrite to replace it or choose another --output")
    return resuming


def _convert_and_fit(teacher, model_config: ModelConfig, config: ShrinkConfig, splits: DatasetSplits, log):
    """Steps 1 and 2: ``(converted model, its ModelConfig, the fit report of fit.json)``."""
    calibration = calibration_batches(splits, config.calibration_images, config.seed)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    converted, choice = _convert(teacher, config, calibration, log)
    fits, blocks = [], []
    if config.init == "fit":
        log(f"fitting the grouped blocks to the dense layers on {sum(len(b) for b in calibration)} training images")
        fits = fit_to_dense(teacher, converted, calibration, steps=config.fit_steps, progress=_bar("fit"))
        if config.block_steps:
            log(f"reconstructing the blocks of layers, {config.block_steps} steps each")
            blocks = reconstruct_blocks(teacher, converted, calibration, steps=config.block_steps, seed=config.seed,
                                        progress=_bar("blocks"))
    fit_seconds = round(time.perf_counter() - started, 2)
    fit_report = {"init": config.init, "fit_seconds": fit_seconds, "teacher": str(config.checkpoint),
                  "trainable_params": count_parameters(converted),
                  "teacher_params": count_parameters(teacher),
                  "mean_fit_error": sum(f.relative_error for f in fits) / len(fits) if fits else None,
                  "layers": [asdict(f) for f in fits],
                  "blocks": [asdict(b) for b in blocks],
                  "budget": None if choice is None else {"mapping": choice.mapping, "parameters": choice.parameters,
                                                         "budget_parameters": choice.budget_parameters,
                                                         "total_error": choice.total_error}}
    if fits:
        log(f"fitted {len(fits)} blocks in {fit_seconds:.0f} s: mean relative output error "
            f"{fit_report['mean_fit_error']:.3f}")
    if blocks:
        log(f"blocks of layers reconstructed: relative output error of the last {blocks[-1].initial_error:.3f} -> "
            f"{blocks[-1].relative_error:.3f}")
    return converted, replace(model_config, conversion=conversion_record(converted)), fit_report


def _start_from(config: ShrinkConfig):
    """``(model, ModelConfig, fit report)`` of the earlier shrink in ``config.start_from``, after checking it
    shrank the same teacher with the same settings (all but the epochs): :class:`CheckpointError` otherwise."""
    folder = Path(config.start_from)
    model, model_config, checkpoint = load_model_from_checkpoint(folder / "best.pt")
    earlier = checkpoint["train_config"]
    if earlier.get("shrink") is None or not (folder / FIT_FILE).exists():
        raise CheckpointError(f"{folder} is not a gpconv shrink run folder (no shrink settings or {FIT_FILE})")
    if Path(earlier.get("teacher", "")).resolve() != Path(config.checkpoint).resolve():
        raise CheckpointError(f"{folder} shrank {earlier.get('teacher')}, not {config.checkpoint}")
    same = [key for key in config.settings if key not in ("epochs", "start_from")]
    differ = [key for key in same
              if earlier["shrink"].get(key, EARLIER_SHRINK_SETTINGS.get(key)) != config.settings[key]]
    if differ or earlier.get("seed") != config.seed:
        raise CheckpointError(f"{folder} was shrunk with other settings ({', '.join(differ) or 'seed'}): "
                              f"start from a run with the same ones")
    fit_report = json.loads((folder / FIT_FILE).read_text())
    return model, model_config, {**fit_report, "start_from": str(folder)}


def _evaluate_unchanged(model, model_config: ModelConfig, config: TrainConfig, splits: DatasetSplits,
                        overwrite: bool, fit_report: dict, log) -> dict:
    """``epochs=0``: the fitted model itself is the run's ``best.pt`` and is tested as it is."""
    output = Path(config.output)
    config = replace(config, epochs=1)  # TrainConfig needs >= 1; history.csv stays empty
    prepare_run_folder(output, resume=False, overwrite=overwrite)
    write_run_config(output, model_config, config, 1, splits)
    atomic_write_text(output / FIT_FILE, json.dumps(fit_report, indent=2))
    atomic_torch_save({**model_checkpoint(model_config, config, splits.class_names, 0, model), "kind": "best",
                       "best": None}, output / "best.pt")
    test = evaluate_model(model, splits.test, splits.num_classes, batch_size=config.eval_batch_size,
                          channels_last=True)
    metrics = {"test_accuracy": test.accuracy, "test_loss": test.loss, "best_epoch": 0, "epochs": 0,
               "trainable_params": count_parameters(model),
               "computations": count_computations(model, model_config.image_size), "dataset": config.dataset, "arch": model_config.arch,
               "image_size": model_config.image_size, "test_images": test.count, "train_seconds": 0.0}
    atomic_write_text(output / "metrics.json", json.dumps(metrics, indent=2))
    log(f"test accuracy {test.accuracy:.4f} with no fine-tuning ({metrics['trainable_params']:,} trainable parameters)")
    return metrics
