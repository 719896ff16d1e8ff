"""The in-memory dataset types and what is done to their splits.

An :class:`ImageSet` holds ``uint8`` images ``(N, 3, H, W)`` and ``int64`` labels ``(N,)``; a
:class:`DatasetSplits` holds the train / validation / test sets of one dataset. Inputs are scaled
to ``[0, 1]`` when batched (:func:`to_float`: the reference notebooks use ``bipolar=False``,
``lab=False``, ``x / 255``). Every loader of this package raises :class:`DataError` (one line).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import torch

__all__ = ["DataError", "ImageSet", "DatasetSplits", "hold_out", "add_flipped_copies", "to_float", "check_splits"]


class DataError(ValueError):
    """A dataset cannot be loaded (missing files, bad checksum, empty folder...). One-line message."""


@dataclass
class ImageSet:
    """Images ``(N, 3, H, W)`` uint8 and labels ``(N,)`` int64, in memory."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[indices], self.labels[indices])


@dataclass
class DatasetSplits:
    """Train, validation and test sets of one dataset, and what is known about it."""

    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    class_names: List[str]
    skipped_files: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> Tuple[int, int]:
        return tuple(self.train.images.shape[-2:])


def hold_out(data: ImageSet, fraction: float, seed: int) -> Tuple[ImageSet, ImageSet]:
    """Split ``data`` into ``(rest, held_out)`` with ``round(fraction * N)`` held-out images, seeded."""
    count = int(round(fraction * len(data)))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(order[count:]), data.subset(order[:count])


def add_flipped_copies(data: ImageSet) -> ImageSet:
    """The images, their horizontal flips, vertical flips and both (x4): the Entropy 2022 validation."""
    images = data.images
    flipped = [images, images.flip(-1), images.flip(-2), images.flip(-1).flip(-2)]
    return ImageSet(torch.cat(flipped), data.labels.repeat(4))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` -> float ``[0, 1]`` (the reference's ``x / 255``)."""
    return images.float().div_(255.0)


def check_splits(splits: DatasetSplits, data_dir=None) -> None:
    """DataError (one line) unless the dataset has at least 2 classes and at least one image in each of
    its train, validation and test splits."""
    where = f"{splits.name} dataset" + (f" in {data_dir}" if data_dir is not None else "")
    if splits.num_classes < 2:
        raise DataError(f"the {where} has {splits.num_classes} class(es) ({', '.join(splits.class_names)}): "
                        "classification needs at least 2")
    sizes = {"train": len(splits.train), "validation": len(splits.val), "test": len(splits.test)}
    if min(sizes.values()) < 1:
        counts = ", ".join(f"{count} {split}" for split, count in sizes.items())
        raise DataError(f"the {where} is too small: {counts} images after the split; every split needs at least "
                        "one (the validation and test splits are 10% each: give at least 10 images)")

