"""``load_dataset``: any dataset of :data:`~gpconv.experiments.DATASETS` by name, split and resized."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import DATASETS, PAPER_DATASETS  # the names; numpy-free, so the CLI lists them with torch alone
from .cifar import load_cifar
from .folders import load_folder
from .paper import load_paper_dataset
from .splits import DataError, DatasetSplits, ImageSet, add_flipped_copies, check_splits, hold_out
from .synthetic import SYNTHETIC_CLASSES, make_synthetic

__all__ = ["load_dataset"]


def _resize(data: ImageSet, size: int) -> ImageSet:
    if tuple(data.images.shape[-2:]) == (size, size) or len(data) == 0:
        return data
    resized = F.interpolate(data.images.float(), size=(size, size), mode="bilinear", align_corners=False,
                            antialias=True)
    return ImageSet(resized.round().clamp(0, 255).to(torch.uint8), data.labels)


def load_dataset(name: str, data_dir=None, *, image_size: Optional[int] = None, seed: int = 0,
                 val_fraction: float = 0.1, val_flips: bool = False, download: bool = True,
                 synthetic_size: Tuple[int, int] = (2000, 500)) -> DatasetSplits:
    """Load ``name`` (one of :data:`DATASETS`) with its train / validation / test splits.

    ``image_size`` resizes every image (default: 32 for CIFAR and synthetic; required-ish for
    ``folder``, where it defaults to 32 too; 224 for :data:`PAPER_DATASETS`, which are split as
    the papers, see :mod:`gpconv.experiments.data.paper`). ``val_fraction`` of the training images (seeded)
    become the validation set, except for folder datasets with their own ``val/`` folder.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    if name in PAPER_DATASETS:
        return load_paper_dataset(name, data_dir, image_size=image_size or 224, seed=seed, val_flips=val_flips,
                                  download=download)
    size = image_size or 32
    if name == "synthetic":
        train_count, test_count = synthetic_size
        train, test = make_synthetic(train_count, seed=1234), make_synthetic(test_count, seed=4321)
        train, val = hold_out(train, val_fraction, seed)
        splits = DatasetSplits("synthetic", train, val, test, list(SYNTHETIC_CLASSES))
    elif name == "folder":
        if data_dir is None:
            raise DataError("the folder dataset needs --data-dir")
        splits = load_folder(data_dir, size, seed)
    else:
        if data_dir is None:
            raise DataError(f"{name} needs --data-dir (where the official python-version files are or go)")
        train, test, names = load_cifar(name, data_dir, download=download)
        train, val = hold_out(train, val_fraction, seed)
        splits = DatasetSplits(name, train, val, test, names)
    check_splits(splits, data_dir)
    splits.train, splits.val, splits.test = (_resize(s, size) for s in (splits.train, splits.val, splits.test))
    if val_flips:
        splits.val = add_flipped_copies(splits.val)
    return splits

