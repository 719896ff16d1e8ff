"""Training with the papers' protocol: schedule, optimizer and the loop.

Protocol (the reference notebooks, e.g. ``raw/cifar10-50epochs/JP30I02_*.ipynb`` of kEffNetV2):
RMSprop with Keras' defaults (lr 1e-3, rho 0.9, epsilon 1e-7), the cyclical schedule
:func:`cyclical_lr` with a 25-epoch cycle, batch 64, Keras-style augmentation
(:class:`~gpconv.experiments.data.KerasAugment`), 10% of the training set held out for validation, the best
epoch by ``val_accuracy`` (or ``val_loss``) kept and tested.

:func:`train` is a composition of named steps: :func:`prepare_run` (seeding, data, model,
counting, resume, DDP), :func:`train_one_epoch`, :func:`validate_epoch`, :func:`save_epoch`
(checkpoints, history, plot) and :func:`evaluate_best` (the test split). Hooks into the loop
(tests kill a run or make its loss NaN with them) are :class:`Callback` objects.

Run folder (``TrainConfig.output``): ``config.json``, ``history.csv``, ``metrics.json``,
``training_curves.png`` (:mod:`~gpconv.experiments.run_folder`), ``last.pt`` (everything needed to
resume), ``best.pt`` (weights of the best epoch; :mod:`~gpconv.experiments.checkpoint`).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same code trains with DistributedDataParallel
(:mod:`~gpconv.experiments.distributed`); each process sees its
:class:`~torch.utils.data.DistributedSampler` shard, metrics are reduced over processes and only
rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from ..core.counting import count_computations, count_macs, count_parameters
from ..io import atomic_write_text
from .checkpoint import (atomic_torch_save, capture_rng_state, load_checkpoint, load_model_from_checkpoint,
                         model_checkpoint, resume_from)
from .config import ModelConfig, TrainConfig
from .data import DatasetSplits, KerasAugment, load_dataset, to_float
from .distributed import DistributedContext, broadcast_buffers, setup_distributed
from .metrics import classification_report, evaluate_model, recalibrate_batch_norm
from .run_folder import prepare_run_folder, write_history, write_run_config

__all__ = ["TrainingDiverged", "Callback", "TrainingRun", "cyclical_lr", "cosine_lr", "epoch_lr", "distillation_loss",
           "make_optimizer", "train", "prepare_run", "validate_start",
           "train_one_epoch", "validate_epoch", "save_epoch", "evaluate_best"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Callback:
    """Hooks into :func:`train`; subclass and override what you need (the defaults do nothing).
    Epochs and steps are 1-based. Every process of a DDP run calls them."""

    def on_loss(self, epoch: int, step: int, loss: torch.Tensor) -> torch.Tensor:
        """Each training batch's loss, before the finite check and the backward pass; returns the loss to use."""
        return loss

    def on_epoch_end(self, epoch: int, row: dict) -> None:
        """After epoch ``epoch``'s checkpoints and files are written; ``row`` is its ``history.csv`` row."""


def cosine_lr(epoch: int, base: float, epochs: int) -> float:
    """Fine-tuning schedule: ``base * (1 + cos(pi * epoch / epochs)) / 2`` for epoch ``epoch`` (0-based)."""
    return base * (1 + math.cos(math.pi * epoch / epochs)) / 2


def epoch_lr(config: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based) under ``config.schedule``."""
    if config.schedule == "cosine":
        return cosine_lr(epoch, config.lr, config.epochs)
    return cyclical_lr(epoch, config.lr, config.lr_cycle)


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, weight: float) -> torch.Tensor:
    """Hinton et al. (2015): ``weight * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - weight) * CE(s, y)``.
    ``T^2`` keeps the soft term's gradients on the scale of the label term's."""
    soft = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                    reduction="batchmean", log_target=True)
    return weight * temperature ** 2 * soft + (1 - weight) * F.cross_entropy(logits, labels)


def cyclical_lr(epoch: int, base: float = 1e-3, cycle: int = 25) -> float:
    """The reference's ``cyclical_adv_lrscheduler25``: epoch ``e`` (0-based) within a ``cycle``-epoch
    cycle gets ``base * (1 + 0.5 e)`` for ``e < 7`` (warm-up to 4x), then ``4 base * 0.85^(e - 7)``."""
    local = epoch % cycle
    if local < 7:
        return base * (1 + 0.5 * local)
    return base * 4 * 0.85 ** (local - 7)


def make_optimizer(parameters, lr: float = 1e-3, name: str = "rmsprop") -> torch.optim.Optimizer:
    """``"rmsprop"``: RMSprop with Keras' defaults (the papers'; PyTorch's differ: alpha 0.99, eps 1e-8);
    ``"adamw"``: AdamW without weight decay, whose bias correction keeps the first steps at ``lr`` (RMSprop's
    first step is about ``3 lr`` per weight in the gradient's sign: harmless from scratch, harmful to a
    fitted model; gpconv shrink's default, measured in docs/results.md). ``ValueError`` for another name."""
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    if name != "rmsprop":
        raise ValueError(f"optimizer must be rmsprop or adamw, got {name!r}")
    return torch.optim.RMSprop(parameters, lr=lr, alpha=0.9, eps=1e-7, momentum=0.0, centered=False)


@dataclass
class TrainingRun:
    """What the steps of :func:`train` share: the run's settings, data, model and training state."""

    config: TrainConfig
    model_config: ModelConfig
    context: DistributedContext
    splits: DatasetSplits
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    augment_generator: torch.Generator
    counts: dict  # trainable_params, computations, macs
    log: Callable[[str], None] = print
    callbacks: Sequence[Callback] = ()
    start_epoch: int = 0
    history: List[dict] = field(default_factory=list)
    best: Optional[dict] = None  # {"epoch": 1-based, "value": monitored value}
    network: Optional[nn.Module] = None  # the model, or its DistributedDataParallel wrapper
    sampler: Optional[DistributedSampler] = None
    augment: Optional[KerasAugment] = None
    teacher: Optional[nn.Module] = None  # config.teacher's model, in eval mode

    @property
    def output(self) -> Path:
        return Path(self.config.output)

    @property
    def last_path(self) -> Path:
        return self.output / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.output / "best.pt"


def train(config: TrainConfig, model_config: ModelConfig, *, resume: bool = False, overwrite: bool = False,
          callbacks: Sequence[Callback] = (), log: Callable[[str], None] = print,
          splits: Optional[DatasetSplits] = None, initial_state: Optional[dict] = None) -> dict:
    """Train ``model_config`` on ``config.dataset`` and return the test metrics (also ``metrics.json``).

    ``resume``: continue from ``output/last.pt`` (model, optimizer, epoch, history, best epoch,
    every RNG state; refused when a setting that shapes the result differs); ``overwrite``: replace
    the run files of a run already in ``output`` (see
    :func:`~gpconv.experiments.run_folder.prepare_run_folder`); the data order is a function of
    (seed, epoch), so a resumed run reaches the same result as an uninterrupted one. ``callbacks``:
    :class:`Callback` hooks. ``splits``: data already loaded (a sweep shares it between runs).
    ``initial_state``: a state_dict the model starts from (fine-tuning; ignored when resuming).
    Raises :class:`TrainingDiverged` on a NaN/inf loss.
    """
    with ExitStack() as lock:  # the run folder's lock file, held until the run ends
        run = prepare_run(config, model_config, resume=resume, overwrite=overwrite, log=log, splits=splits,
                          callbacks=callbacks, initial_state=initial_state, lock=lock)
        if initial_state is not None and run.start_epoch == 0:
            validate_start(run)
        for epoch in range(run.start_epoch, config.epochs):
            started = time.perf_counter()
            lr, train_loss, train_accuracy = train_one_epoch(run, epoch)
            row, improved = validate_epoch(run, epoch, lr, train_loss, train_accuracy, started)
            save_epoch(run, epoch, improved)
            run.context.barrier()
            for callback in callbacks:
                callback.on_epoch_end(epoch + 1, row)
        return evaluate_best(run)


def _seed_everything(seed: int, rank: int) -> torch.Generator:
    """Seed Python, numpy and torch; the augmentation's own generator (one stream per process)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 7919 * (rank + 1))


def _build_model(model_config: ModelConfig, device: torch.device) -> Tuple[nn.Module, dict]:
    """The model on ``device`` (channels_last) and its counts: trainable parameters, computations, MACs."""
    model = model_config.build()
    counts = {"trainable_params": count_parameters(model),
              "computations": count_computations(model, model_config.image_size),
              "macs": count_macs(model, model_config.image_size)}
    # channels_last on every device: oneDNN's CPU kernels are faster in it too, the depthwise
    # backward passes most (docs/performance.md).
    return model.to(device, memory_format=torch.channels_last), counts


def prepare_run(config: TrainConfig, model_config: ModelConfig, *, resume: bool = False, overwrite: bool = False,
                log: Callable[[str], None] = print, splits: Optional[DatasetSplits] = None,
                callbacks: Sequence[Callback] = (), initial_state: Optional[dict] = None,
                lock: Optional[ExitStack] = None) -> TrainingRun:
    """Everything before the first epoch: process group, device, run folder (output rule; ``lock``: its
    lock file, FolderBusy if another process trains there), seeding, data, model, optimizer, resumed
    state (``resume`` and ``last.pt`` present), ``config.json``, the DDP wrapper and the sampler."""
    context = setup_distributed(config.device)
    if not context.is_main:
        log = lambda line: None  # noqa: E731  (rank 0 speaks for everyone)
    resume_from_last = prepare_run_folder(Path(config.output), resume=resume, overwrite=overwrite, main=context.is_main, lock=lock)
    augment_generator = _seed_everything(config.seed, context.rank)
    if splits is None:
        splits = load_dataset(config.dataset, config.data_dir, image_size=model_config.image_size,
                              seed=config.seed, val_flips=config.val_flips,
                              synthetic_size=tuple(config.synthetic_size))
    if splits.skipped_files:
        log(f"skipped {splits.skipped_files} unreadable image file(s)")
    model_config.num_classes = splits.num_classes
    model, counts = _build_model(model_config, context.device)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    cuda = context.device.type == "cuda"
    run = TrainingRun(config, model_config, context, splits, model, make_optimizer(model.parameters(), config.lr, config.optimizer),
                      torch.amp.GradScaler("cuda", enabled=cuda), augment_generator, counts, log, callbacks)
    if resume_from_last:
        checkpoint = resume_from(run.last_path, config, model_config, splits.class_names, model, run.optimizer,
                                 run.scaler, augment_generator, context.device)
        run.start_epoch, run.history, run.best = checkpoint["epoch"], list(checkpoint["history"]), checkpoint["best"]
        log(f"resuming {run.output} after epoch {run.start_epoch}")
    elif resume:
        log(f"no {run.last_path} to resume from: starting a new run")
    if context.is_main:
        write_run_config(run.output, model_config, config, context.world_size, splits)
    run.network = model
    if context.distributed:
        run.network = nn.parallel.DistributedDataParallel(model, device_ids=[context.device.index] if cuda else None)
    run.sampler = DistributedSampler(range(len(splits.train)), num_replicas=context.world_size, rank=context.rank,
                                     shuffle=True, seed=config.seed, drop_last=False)
    run.augment = KerasAugment() if config.augment else None
    if config.teacher is not None:
        run.teacher = load_model_from_checkpoint(config.teacher, map_location=context.device)[0]
        run.teacher.to(memory_format=torch.channels_last)
    return run


def _progress(iterable, total: int, description: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)


def train_one_epoch(run: TrainingRun, epoch: int) -> Tuple[float, float, float]:
    """One pass over this process's shard of the training set (epoch ``epoch``, 0-based) with the
    schedule's learning rate; ``(lr, train loss, train accuracy)`` reduced over processes."""
    config = run.config
    lr = epoch_lr(config, epoch)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.sampler.set_epoch(epoch)
    order = torch.tensor(list(run.sampler), dtype=torch.int64)
    batches = list(order.split(config.batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:  # batch norm cannot train on one image with 1x1 maps
        batches[-2:] = [torch.cat(batches[-2:])]
    if config.max_train_batches is not None:
        batches = batches[:config.max_train_batches]
    run.model.train()
    loss_sum = correct = seen = 0.0
    show_progress = run.context.is_main and sys.stdout.isatty()
    bar = _progress(batches, len(batches), f"epoch {epoch + 1}/{config.epochs}", show_progress)
    for step, indices in enumerate(bar):
        loss, logits, labels = _train_step(run, epoch, step, indices)
        loss_sum += loss.item() * len(indices)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(indices)
        if bar is not batches:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", accuracy=f"{correct / seen:.4f}")
    loss_sum, correct, seen = run.context.sum([loss_sum, correct, seen])
    return lr, loss_sum / seen, correct / seen


def _train_step(run: TrainingRun, epoch: int, step: int, indices: torch.Tensor):
    """Forward, loss (through the callbacks' ``on_loss``), the finite check, backward and optimizer
    step on one batch; ``(loss, logits, labels)``. :class:`TrainingDiverged` on a NaN/inf loss."""
    device = run.context.device
    images = to_float(run.splits.train.images[indices]).to(device, non_blocking=True)
    labels = run.splits.train.labels[indices].to(device, non_blocking=True)
    if run.augment is not None:
        images = run.augment(images, run.augment_generator)
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, enabled=device.type == "cuda"):
        logits = run.network(images)
        if run.teacher is None:
            loss = F.cross_entropy(logits.float(), labels)
        else:
            with torch.no_grad():
                teacher_logits = run.teacher(images).float()
            loss = distillation_loss(logits.float(), teacher_logits, labels, run.config.temperature,
                                     run.config.distillation_weight)
    for callback in run.callbacks:
        loss = callback.on_loss(epoch + 1, step + 1, loss)
    if not run.context.all_true(bool(torch.isfinite(loss))):
        raise TrainingDiverged(
            f"loss became {loss.item()} at epoch {epoch + 1}, batch {step + 1}: stopped; the last good "
            f"checkpoint is {run.last_path if run.last_path.exists() else 'absent (no epoch completed)'}")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss, logits, labels


def _improved(monitor: str, value: float, best: Optional[dict]) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best["value"] if monitor == "val_accuracy" else value < best["value"]


def validate_epoch(run: TrainingRun, epoch: int, lr: float, train_loss: float, train_accuracy: float,
                   started: float) -> Tuple[dict, bool]:
    """After an epoch's training: batch-norm statistics (recalibrated with ``precise_bn_batches``,
    rank 0's everywhere), the validation metrics, the epoch's history row and whether it is the best
    so far (``run.best`` updated); logs one line. ``(row, improved)``."""
    config = run.config
    if config.precise_bn_batches:
        recalibrate_batch_norm(run.model, run.splits.train, config.precise_bn_batches, config.batch_size,
                               run.context.device)
    broadcast_buffers(run.model, run.context)
    val = evaluate_model(run.model, run.splits.val, run.splits.num_classes, batch_size=config.eval_batch_size,
                         context=run.context, channels_last=True)
    row = {"epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_accuracy": train_accuracy,
           "val_loss": val.loss, "val_accuracy": val.accuracy, "seconds": round(time.perf_counter() - started, 2)}
    run.history.append(row)
    value = row[config.monitor]
    improved = _improved(config.monitor, value, run.best)
    if improved:
        run.best = {"epoch": epoch + 1, "value": float(value)}
    run.log(f"epoch {epoch + 1}/{config.epochs}: lr {lr:.6f}  loss {train_loss:.4f}  accuracy "
            f"{train_accuracy:.4f}  val_loss {val.loss:.4f}  val_accuracy {val.accuracy:.4f}  "
            f"({row['seconds']:.1f} s){'  best' if improved else ''}")
    return row, improved


def validate_start(run: TrainingRun) -> None:
    """Fine-tuning: the starting weights are the first candidate for ``best.pt`` ("epoch 0"), so that a
    fine-tuning that only loses validation accuracy keeps its start (measured: a fitted kEffNet-B0 32ch
    went from 0.502 to 0.479 test accuracy in 2 epochs, docs/results.md)."""
    val = evaluate_model(run.model, run.splits.val, run.splits.num_classes, batch_size=run.config.eval_batch_size,
                         context=run.context, channels_last=True)
    value = val.accuracy if run.config.monitor == "val_accuracy" else val.loss
    run.best = {"epoch": 0, "value": float(value)}
    if run.context.is_main:
        checkpoint = model_checkpoint(run.model_config, run.config, run.splits.class_names, 0, run.model)
        atomic_torch_save({**checkpoint, "kind": "best", "best": run.best}, run.best_path)
    run.log(f"start (epoch 0): val_loss {val.loss:.4f}  val_accuracy {val.accuracy:.4f}")


def save_epoch(run: TrainingRun, epoch: int, improved: bool) -> None:
    """After epoch ``epoch`` (0-based), on the main process: ``best.pt`` (when ``improved``), ``last.pt`` (with optimizer, scaler,
    RNG states, history and best epoch: everything to resume), ``history.csv`` and the curves."""
    if not run.context.is_main:
        return
    common = model_checkpoint(run.model_config, run.config, run.splits.class_names, epoch + 1, run.model)
    if improved:
        atomic_torch_save({**common, "kind": "best", "best": run.best}, run.best_path)
    atomic_torch_save({**common, "kind": "last", "optimizer": run.optimizer.state_dict(),
                       "scaler": run.scaler.state_dict(), "rng": capture_rng_state(run.augment_generator),
                       "history": run.history, "best": run.best}, run.last_path)
    write_history(run.output, run.history)


def evaluate_best(run: TrainingRun) -> dict:
    """Test the best epoch's weights (``best.pt``; with horizontal-flip TTA when ``hflip_tta``), write
    ``metrics.json`` and return the metrics."""
    config, best, context = run.config, run.best, run.context
    if best is None:
        raise TrainingDiverged("no epoch completed with a finite validation metric")
    run.model.load_state_dict(load_checkpoint(run.best_path, map_location=context.device, require=("model",))["model"])
    test = evaluate_model(run.model, run.splits.test, run.splits.num_classes, batch_size=config.eval_batch_size,
                          hflip_tta=config.hflip_tta, context=context, channels_last=True)
    metrics = {
        "test_accuracy": test.accuracy, "test_loss": test.loss, "best_epoch": best["epoch"],
        f"best_{config.monitor}": best["value"], "monitor": config.monitor, "epochs": len(run.history),
        "hflip_tta": config.hflip_tta, **run.counts,
        "dataset": config.dataset, "arch": run.model_config.arch, "image_size": run.model_config.image_size,
        "test_images": test.count, "skipped_files": run.splits.skipped_files, "world_size": context.world_size,
        "train_seconds": round(sum(row["seconds"] for row in run.history), 2),  # every epoch, resumed ones too
        "per_class": classification_report(test.confusion, run.splits.class_names),
    }
    if context.is_main:
        atomic_write_text(run.output / "metrics.json", json.dumps(metrics, indent=2))
    run.log(f"test accuracy {test.accuracy:.4f}  test loss {test.loss:.4f}  (best epoch {best['epoch']}, "
            f"{run.counts['trainable_params']:,} trainable parameters{', hflip TTA' if config.hflip_tta else ''})")
    context.barrier()
    return metrics
