"""Evaluation: loss, accuracy and confusion matrix of a model on a split (optionally with
horizontal-flip test-time augmentation, reduced over DDP processes), the per-class report
(precision, recall, F1), batch-norm recalibration, and the evaluation of a saved checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..io import render_table
from .checkpoint import checkpoint_test_split, load_model_from_checkpoint
from .data import ImageSet, to_float
from .distributed import DistributedContext, setup_distributed

__all__ = ["EvalResult", "evaluate_model", "classification_report", "format_report", "recalibrate_batch_norm",
           "evaluate_checkpoint"]


@dataclass
class EvalResult:
    """What :func:`evaluate_model` measures."""

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
    """The per-class report as a text table (:func:`gpconv.io.render_table`)."""
    rows = [(name, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"]))
            for name, row in report.items()]
    return render_table(("class", "precision", "recall", "f1-score", "support"), rows)


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


def evaluate_checkpoint(checkpoint_path, dataset: Optional[str] = None, data_dir: Optional[str] = None, *,
                        hflip_tta: bool = False, batch_size: int = 64, device: str = "auto",
                        seed: Optional[int] = None) -> dict:
    """Rebuild the model stored in a checkpoint and evaluate it on the test split of ``dataset``.

    ``dataset``, ``data_dir`` and ``seed`` default to those the checkpoint was trained with.
    """
    context = setup_distributed(device)
    model, model_config, checkpoint = load_model_from_checkpoint(checkpoint_path, map_location=context.device)
    dataset, splits = checkpoint_test_split(checkpoint_path, checkpoint, model_config, dataset, data_dir, seed)
    model = model.to(context.device)
    test = evaluate_model(model, splits.test, splits.num_classes, batch_size=batch_size, hflip_tta=hflip_tta,
                          context=context)
    return {"test_accuracy": test.accuracy, "test_loss": test.loss, "test_images": test.count,
            "epoch": checkpoint["epoch"], "hflip_tta": hflip_tta, "dataset": dataset,
            "per_class": classification_report(test.confusion, splits.class_names)}
