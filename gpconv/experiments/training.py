"""Training and evaluation with the papers' protocol: loop, schedule, checkpoints, metrics, DDP.

Protocol (the reference notebooks, e.g. ``raw/cifar10-50epochs/JP30I02_*.ipynb`` of kEffNetV2):
RMSprop with Keras' defaults (lr 1e-3, rho 0.9, epsilon 1e-7), the cyclical schedule
:func:`cyclical_lr` with a 25-epoch cycle, batch 64, Keras-style augmentation
(:class:`~gpconv.experiments.data.KerasAugment`), 10% of the training set held out for validation, the best
epoch by ``val_accuracy`` (or ``val_loss``) kept and tested.

Run folder (``TrainConfig.output``): ``config.json``, ``history.csv``, ``metrics.json``,
``training_curves.png``, ``last.pt`` (everything needed to resume), ``best.pt`` (weights of the
best epoch). Every file is written atomically (a temporary file in the same folder, then
``os.replace``); checkpoints hold only tensors and plain types and are read with
``torch.load(..., weights_only=True)``.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same code trains with DistributedDataParallel (NCCL on
GPUs, gloo on CPU); each process sees its :class:`~torch.utils.data.DistributedSampler` shard,
metrics are reduced over processes and only rank 0 writes files.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from ..core.counting import count_computations, count_macs, count_parameters
from .data import DatasetSplits, ImageSet, KerasAugment, load_dataset, to_float
from ..models import CLASSIFIER_INITS, check_input_size, create_model, init_classifier
from ..io import OutputError, atomic_write, claim_outputs, existing_outputs

__all__ = [
    "ModelConfig", "TrainConfig", "TrainingDiverged", "CheckpointError", "cyclical_lr", "make_optimizer",
    "train", "evaluate_checkpoint", "evaluate_model", "classification_report", "load_checkpoint",
    "atomic_write_text", "atomic_torch_save", "DistributedContext", "setup_distributed", "check_device",
    "prepare_run_folder", "resume_differences", "RUN_FILES", "MODEL_KEYS", "RESUME_KEYS",
]

CHECKPOINT_FORMAT = "gpconv-checkpoint-v1"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit (one-line message)."""


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass
class ModelConfig:
    """Everything :func:`~gpconv.models.create_model` needs to rebuild a trained model."""

    arch: str
    num_classes: int = 10
    channels_per_group: Optional[int] = None
    version: int = 2
    l_layer: bool = True
    activation: Optional[str] = None  # None: the family's default, as gpconv sweep and create_model
    skip_strides: int = 0
    image_size: int = 32
    classifier_init: str = "family"

    def __post_init__(self):
        if self.classifier_init not in CLASSIFIER_INITS:
            raise ValueError(f"classifier_init must be one of {', '.join(CLASSIFIER_INITS)}, got "
                             f"{self.classifier_init!r}")

    def build(self) -> nn.Module:
        """The model; ValueError (one line) on a bad combination or an input size too small for the arch."""
        check_input_size(self.arch, self.image_size, self.skip_strides)
        model = create_model(self.arch, self.num_classes, channels_per_group=self.channels_per_group,
                             version=self.version, l_layer=self.l_layer, activation=self.activation,
                             skip_strides=self.skip_strides)
        return init_classifier(model, self.classifier_init)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class TrainConfig:
    """A training run. Defaults are the papers' protocol."""

    dataset: str
    output: str
    data_dir: Optional[str] = None
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    lr_cycle: int = 25
    max_train_batches: Optional[int] = None
    monitor: str = "val_accuracy"
    hflip_tta: bool = False
    val_flips: bool = False
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    precise_bn_batches: int = 0
    eval_batch_size: int = 64
    synthetic_size: List[int] = field(default_factory=lambda: [2000, 500])

    def __post_init__(self):
        if self.monitor not in ("val_accuracy", "val_loss"):
            raise ValueError(f"monitor must be val_accuracy or val_loss, got {self.monitor!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "lr_cycle"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_train_batches is not None and self.max_train_batches < 1:
            raise ValueError(f"max_train_batches must be >= 1, got {self.max_train_batches}")


def cyclical_lr(epoch: int, base: float = 1e-3, cycle: int = 25) -> float:
    """The reference's ``cyclical_adv_lrscheduler25``: epoch ``e`` (0-based) within a ``cycle``-epoch
    cycle gets ``base * (1 + 0.5 e)`` for ``e < 7`` (warm-up to 4x), then ``4 base * 0.85^(e - 7)``."""
    local = epoch % cycle
    if local < 7:
        return base * (1 + 0.5 * local)
    return base * 4 * 0.85 ** (local - 7)


def make_optimizer(parameters, lr: float = 1e-3) -> torch.optim.Optimizer:
    """RMSprop with Keras' defaults (PyTorch's differ: alpha 0.99, eps 1e-8)."""
    return torch.optim.RMSprop(parameters, lr=lr, alpha=0.9, eps=1e-7, momentum=0.0, centered=False)


# ----------------------------------------------------------------------------------------------
# atomic files and checkpoints


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    return atomic_write(Path(path), lambda out: out.write(text.encode("utf-8")))


def atomic_torch_save(obj, path) -> Path:
    """``torch.save`` atomically."""
    return atomic_write(Path(path), lambda out: torch.save(obj, out))


# what a checkpoint must hold to rebuild its model, and to resume training from it
MODEL_KEYS = ("model_config", "train_config", "class_names", "epoch", "model")
RESUME_KEYS = MODEL_KEYS + ("optimizer", "scaler", "rng", "history", "best")


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
    for key in {"model_config", "train_config", "model"} & set(require):
        if not isinstance(checkpoint[key], dict):
            raise CheckpointError(f"{path} is damaged: its {key} is not a mapping")
    if "model_config" in require and not isinstance(checkpoint["model_config"].get("arch"), str):
        raise CheckpointError(f"{path} is damaged: its model_config has no arch")
    return checkpoint


def _capture_rng(augment_generator: torch.Generator) -> dict:
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


def _restore_rng(state: dict, augment_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    augment_generator.set_state(state["augment"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# distributed


@dataclass
class DistributedContext:
    """Where this process runs: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: List[float]) -> List[float]:
        """Sum ``values`` over processes (float64)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def all_true(self, flag: bool) -> bool:
        return self.sum([0.0 if flag else 1.0])[0] == 0.0

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def check_device(device: str) -> None:
    """ValueError (one line) unless ``device`` is ``auto``, ``cpu`` or a ``cuda``/``cuda:N`` this torch can use."""
    if device in ("auto", "cpu"):
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type != "cuda":
        raise ValueError(f"unknown device {device!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        why = "sees no CUDA GPU" if torch.backends.cuda.is_built() else "was built without CUDA"
        raise ValueError(f"device {device!r} cannot be used: this torch ({torch.__version__}) {why}; use --device cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")


def setup_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); pick the device
    (ValueError, one line, for one this torch cannot use: :func:`check_device`)."""
    check_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        index = local_rank if world_size > 1 else (torch.device(device).index or 0 if device != "auto" else 0)
        torch.cuda.set_device(index)
        chosen = torch.device("cuda", index)
    else:
        chosen = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistributedContext(rank, world_size, local_rank, chosen)


def _broadcast_buffers(model: nn.Module, context: DistributedContext) -> None:
    """Give every process rank 0's batch-norm statistics (they drift apart during an epoch)."""
    if context.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


# ----------------------------------------------------------------------------------------------
# evaluation and metrics


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    confusion: torch.Tensor  # [true, predicted] counts

    @property
    def count(self) -> int:
        return int(self.confusion.sum())


@torch.no_grad()
def evaluate_model(model: nn.Module, data: ImageSet, num_classes: int, *, batch_size: int = 64,
                   hflip_tta: bool = False, context: Optional[DistributedContext] = None,
                   channels_last: bool = False) -> EvalResult:
    """Loss, accuracy and confusion matrix of ``model`` (eval mode) on ``data``.

    ``hflip_tta``: the prediction is the sum of the softmaxes of the image and of its horizontal
    flip (the loss is the cross-entropy of their mean). Under DDP each process evaluates every
    ``world_size``-th image and the sums are reduced, so every process gets the full result.
    """
    context = context or DistributedContext()
    was_training = model.training
    model.eval()
    device = context.device
    indices = torch.arange(context.rank, len(data), context.world_size)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    loss_sum = 0.0
    for start in range(0, len(indices), batch_size):
        chosen = indices[start:start + batch_size]
        images = to_float(data.images[chosen]).to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = data.labels[chosen].to(device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            logits = model(images)
            if hflip_tta:
                flipped = model(images.flip(-1))
        probabilities = torch.softmax(logits.float(), dim=1)
        if hflip_tta:
            probabilities = probabilities + torch.softmax(flipped.float(), dim=1)
            log_mean = torch.log((probabilities / 2).clamp_min(1e-12))
            loss_sum += F.nll_loss(log_mean, labels, reduction="sum").item()
        else:
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        predicted = probabilities.argmax(dim=1)
        flat = (labels * num_classes + predicted).cpu()
        confusion += torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)
    model.train(was_training)
    totals = context.sum(confusion.flatten().tolist() + [loss_sum])
    confusion = torch.tensor(totals[:-1], dtype=torch.float64).view(num_classes, num_classes)
    count = max(float(confusion.sum()), 1.0)
    return EvalResult(totals[-1] / count, float(confusion.diagonal().sum()) / count, confusion.long())


def classification_report(confusion: torch.Tensor, class_names: List[str]) -> dict:
    """Per-class precision, recall, F1 and support (sklearn's definitions; 0 where undefined),
    with their macro and support-weighted averages."""
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    support = confusion.sum(dim=1)
    predicted = confusion.sum(dim=0)
    precision = torch.where(predicted > 0, true_positive / predicted.clamp_min(1), torch.zeros_like(predicted))
    recall = torch.where(support > 0, true_positive / support.clamp_min(1), torch.zeros_like(support))
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp_min(1e-12),
                     torch.zeros_like(denominator))
    report = {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                     "support": int(support[i])} for i, name in enumerate(class_names)}
    total = max(float(support.sum()), 1.0)
    report["macro_avg"] = {"precision": float(precision.mean()), "recall": float(recall.mean()),
                           "f1": float(f1.mean()), "support": int(support.sum())}
    report["weighted_avg"] = {"precision": float((precision * support).sum() / total),
                              "recall": float((recall * support).sum() / total),
                              "f1": float((f1 * support).sum() / total), "support": int(support.sum())}
    return report


def format_report(report: dict) -> str:
    """The per-class report as a text table."""
    width = max(len(name) for name in report) + 2
    lines = [f"{'':<{width}}precision    recall  f1-score   support"]
    for name, row in report.items():
        lines.append(f"{name:<{width}}{row['precision']:9.4f} {row['recall']:9.4f} {row['f1']:9.4f} "
                     f"{row['support']:9d}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# training


def _progress(iterable, total: int, description: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return iterable
    return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True)


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, data: ImageSet, batches: int, batch_size: int,
                           device: torch.device) -> None:
    """Recompute batch-norm statistics as plain averages over ``batches`` training batches (no
    augmentation). Not part of the papers' protocol (their BN momentum 0.99 needs hundreds of steps
    to settle); useful for very short runs such as the demo."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    for start in range(0, min(len(data), batches * batch_size), batch_size):
        model(to_float(data.images[start:start + batch_size]).to(device))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.train(was_training)


HISTORY_FIELDS = ("epoch", "lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds")


def _history_csv(history: List[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row[k] for k in HISTORY_FIELDS})
    return out.getvalue()


def _improved(monitor: str, value: float, best: Optional[dict]) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best["value"] if monitor == "val_accuracy" else value < best["value"]


RUN_FILES = ("config.json", "history.csv", "metrics.json", "training_curves.png", "best.pt", "last.pt")
# TrainConfig fields a resumed run may change: where it is read, written and run, and how long it trains
RESUMABLE_CHANGES = ("output", "data_dir", "device", "epochs", "eval_batch_size")


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


def _field_default(item):
    if item.default is not MISSING:
        return item.default
    return item.default_factory() if item.default_factory is not MISSING else None


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
            old, new = (json.loads(json.dumps(v)) for v in (saved.get(item.name, _field_default(item)),
                                                             getattr(current, item.name)))
            if old != new:
                differences.append(f"{item.name} {old!r} (now {new!r})")
    if list(checkpoint["class_names"]) != list(class_names):
        differences.append(f"class names {list(checkpoint['class_names'])} (now {list(class_names)})")
    return differences


def _resume_from(path: Path, config, model_config, class_names, model, optimizer, scaler, augment_generator,
                 device) -> dict:
    """Load ``path`` (last.pt), refuse it when a setting differs, restore every state; the checkpoint."""
    checkpoint = load_checkpoint(path, map_location=device, require=RESUME_KEYS)
    differences = resume_differences(checkpoint, config, model_config, class_names)
    if differences:
        raise ValueError(f"--resume: {path} was trained with other settings: {'; '.join(differences)}; resume "
                         "with the saved settings or choose another --output")
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        _restore_rng(checkpoint["rng"], augment_generator)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} cannot be resumed: {message}") from None
    return checkpoint


def train(config: TrainConfig, model_config: ModelConfig, *, resume: bool = False, overwrite: bool = False,
          stop_after_epochs: Optional[int] = None, inject_nan_at_epoch: Optional[int] = None,
          log: Callable[[str], None] = print, splits: Optional[DatasetSplits] = None) -> dict:
    """Train ``model_config`` on ``config.dataset`` and return the test metrics (also ``metrics.json``).

    ``resume``: continue from ``output/last.pt`` (model, optimizer, epoch, history, best epoch,
    every RNG state; refused when a setting that shapes the result differs); ``overwrite``: replace
    the run files of a run already in ``output`` (see :func:`prepare_run_folder`); the data order is a function of (seed, epoch), so a resumed run reaches the
    same result as an uninterrupted one. ``stop_after_epochs`` (testing) kills the process with
    SIGKILL right after that epoch's checkpoint; ``inject_nan_at_epoch`` (testing) makes the loss NaN
    during that (1-based) epoch. Raises :class:`TrainingDiverged` on a NaN/inf loss.
    """
    context = setup_distributed(config.device)
    device = context.device
    if not context.is_main:
        log = lambda line: None  # noqa: E731  (rank 0 speaks for everyone)
    output = Path(config.output)
    last_path, best_path = output / "last.pt", output / "best.pt"
    resume_from_last = prepare_run_folder(output, resume=resume, overwrite=overwrite, main=context.is_main)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    augment_generator = torch.Generator().manual_seed(config.seed + 7919 * (context.rank + 1))

    if splits is None:
        splits = load_dataset(config.dataset, config.data_dir, image_size=model_config.image_size,
                              seed=config.seed, val_flips=config.val_flips,
                              synthetic_size=tuple(config.synthetic_size))
    if splits.skipped_files:
        log(f"skipped {splits.skipped_files} unreadable image file(s)")
    model_config.num_classes = splits.num_classes
    model = model_config.build()
    trainable = count_parameters(model)
    computations = count_computations(model, model_config.image_size)
    macs = count_macs(model, model_config.image_size)
    cuda = device.type == "cuda"
    # channels_last on every device: oneDNN's CPU kernels are faster in it too, the depthwise
    # backward passes most (docs/performance.md).
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), config.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)

    start_epoch, history, best = 0, [], None
    if resume_from_last:
        checkpoint = _resume_from(last_path, config, model_config, splits.class_names, model, optimizer, scaler,
                                  augment_generator, device)
        start_epoch, history, best = checkpoint["epoch"], list(checkpoint["history"]), checkpoint["best"]
        log(f"resuming {output} after epoch {start_epoch}")
    elif resume:
        log(f"no {last_path} to resume from: starting a new run")

    if context.is_main:
        atomic_write_text(output / "config.json", json.dumps(
            {"model": asdict(model_config), "train": asdict(config), "world_size": context.world_size,
             "class_names": splits.class_names, "train_images": len(splits.train),
             "val_images": len(splits.val), "test_images": len(splits.test), "notes": splits.notes}, indent=2))

    network = model
    if context.distributed:
        network = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    sampler = DistributedSampler(range(len(splits.train)), num_replicas=context.world_size, rank=context.rank,
                                 shuffle=True, seed=config.seed, drop_last=False)
    augment = KerasAugment() if config.augment else None
    show_progress = context.is_main and sys.stdout.isatty()

    for epoch in range(start_epoch, config.epochs):
        epoch_started = time.perf_counter()
        lr = cyclical_lr(epoch, config.lr, config.lr_cycle)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.int64)
        batches = list(order.split(config.batch_size))
        if config.max_train_batches is not None:
            batches = batches[:config.max_train_batches]
        model.train()
        loss_sum = correct = seen = 0.0
        bar = _progress(batches, len(batches), f"epoch {epoch + 1}/{config.epochs}", show_progress)
        for step, indices in enumerate(bar):
            images = to_float(splits.train.images[indices]).to(device, non_blocking=True)
            labels = splits.train.labels[indices].to(device, non_blocking=True)
            if augment is not None:
                images = augment(images, augment_generator)
            images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, enabled=cuda):
                logits = network(images)
                loss = F.cross_entropy(logits.float(), labels)
            if inject_nan_at_epoch is not None and epoch + 1 == inject_nan_at_epoch:
                loss = loss * float("nan")
            if not context.all_true(bool(torch.isfinite(loss))):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, batch {step + 1}: stopped; the last good "
                    f"checkpoint is {last_path if last_path.exists() else 'absent (no epoch completed)'}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.item() * len(indices)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(indices)
            if bar is not batches:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", accuracy=f"{correct / seen:.4f}")
        loss_sum, correct, seen = context.sum([loss_sum, correct, seen])
        if config.precise_bn_batches:
            recalibrate_batch_norm(model, splits.train, config.precise_bn_batches, config.batch_size, device)
        _broadcast_buffers(model, context)
        val = evaluate_model(model, splits.val, splits.num_classes, batch_size=config.eval_batch_size,
                             context=context, channels_last=True)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
               "val_loss": val.loss, "val_accuracy": val.accuracy,
               "seconds": round(time.perf_counter() - epoch_started, 2)}
        history.append(row)
        value = row[config.monitor]
        improved = _improved(config.monitor, value, best)
        if improved:
            best = {"epoch": epoch + 1, "value": float(value)}
        log(f"epoch {epoch + 1}/{config.epochs}: lr {lr:.6f}  loss {row['train_loss']:.4f}  accuracy "
            f"{row['train_accuracy']:.4f}  val_loss {val.loss:.4f}  val_accuracy {val.accuracy:.4f}  "
            f"({row['seconds']:.1f} s){'  best' if improved else ''}")
        if context.is_main:
            common = {"format": CHECKPOINT_FORMAT, "model_config": asdict(model_config),
                      "train_config": asdict(config), "class_names": list(splits.class_names), "epoch": epoch + 1,
                      "model": model.state_dict()}
            if improved:
                atomic_torch_save({**common, "kind": "best", "best": best}, best_path)
            atomic_torch_save({**common, "kind": "last", "optimizer": optimizer.state_dict(),
                               "scaler": scaler.state_dict(), "rng": _capture_rng(augment_generator),
                               "history": history, "best": best}, last_path)
            atomic_write_text(output / "history.csv", _history_csv(history))
            from .plots import plot_training_curves
            plot_training_curves(history, output / "training_curves.png")
        context.barrier()
        if stop_after_epochs is not None and epoch + 1 == stop_after_epochs:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    # test with the best weights
    if best is None:
        raise TrainingDiverged("no epoch completed with a finite validation metric")
    best_checkpoint = load_checkpoint(best_path, map_location=device, require=("model",))
    model.load_state_dict(best_checkpoint["model"])
    test = evaluate_model(model, splits.test, splits.num_classes, batch_size=config.eval_batch_size,
                          hflip_tta=config.hflip_tta, context=context, channels_last=True)
    metrics = {
        "test_accuracy": test.accuracy, "test_loss": test.loss, "best_epoch": best["epoch"],
        f"best_{config.monitor}": best["value"], "monitor": config.monitor, "epochs": len(history),
        "hflip_tta": config.hflip_tta, "trainable_params": trainable, "computations": computations, "macs": macs,
        "dataset": config.dataset, "arch": model_config.arch, "image_size": model_config.image_size,
        "test_images": test.count, "skipped_files": splits.skipped_files, "world_size": context.world_size,
        "train_seconds": round(sum(row["seconds"] for row in history), 2),  # every epoch, resumed ones too
        "per_class": classification_report(test.confusion, splits.class_names),
    }
    if context.is_main:
        atomic_write_text(output / "metrics.json", json.dumps(metrics, indent=2))
    log(f"test accuracy {test.accuracy:.4f}  test loss {test.loss:.4f}  (best epoch {best['epoch']}, "
        f"{trainable:,} trainable parameters{', hflip TTA' if config.hflip_tta else ''})")
    context.barrier()
    return metrics


def evaluate_checkpoint(checkpoint_path, dataset: Optional[str] = None, data_dir: Optional[str] = None, *,
                        hflip_tta: bool = False, batch_size: int = 64, device: str = "auto",
                        seed: Optional[int] = None) -> dict:
    """Rebuild the model stored in a checkpoint and evaluate it on the test split of ``dataset``.

    ``dataset``, ``data_dir`` and ``seed`` default to those the checkpoint was trained with.
    """
    context = setup_distributed(device)
    checkpoint = load_checkpoint(checkpoint_path, map_location=context.device, require=MODEL_KEYS)
    model_config = ModelConfig.from_dict(checkpoint["model_config"])
    train_config = checkpoint["train_config"]
    dataset = dataset or train_config.get("dataset")
    if not dataset:
        raise CheckpointError(f"{checkpoint_path} does not say which dataset it was trained on: pass --dataset")
    data_dir = data_dir if data_dir is not None else train_config.get("data_dir")
    seed = train_config.get("seed", 0) if seed is None else seed
    splits = load_dataset(dataset, data_dir, image_size=model_config.image_size, seed=seed,
                          synthetic_size=tuple(train_config.get("synthetic_size", (2000, 500))))
    if splits.num_classes != model_config.num_classes:
        raise CheckpointError(f"{checkpoint_path} has {model_config.num_classes} classes, {dataset} has "
                              f"{splits.num_classes}")
    model = model_config.build()
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError) as error:
        raise CheckpointError(f"{checkpoint_path} does not fit {model_config.arch}: "
                              f"{str(error).splitlines()[0]}") from None
    model = model.to(context.device)
    test = evaluate_model(model, splits.test, splits.num_classes, batch_size=batch_size, hflip_tta=hflip_tta,
                          context=context)
    return {"test_accuracy": test.accuracy, "test_loss": test.loss, "test_images": test.count,
            "epoch": checkpoint["epoch"], "hflip_tta": hflip_tta, "dataset": dataset,
            "per_class": classification_report(test.confusion, splits.class_names)}
