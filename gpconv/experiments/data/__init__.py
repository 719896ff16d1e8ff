"""Datasets, splits, batching and augmentation for training, one module per source.

Every dataset is loaded into memory as ``uint8`` image tensors ``(N, 3, H, W)`` with ``int64``
labels (:class:`ImageSet`); a :class:`DatasetSplits` holds the train / validation / test sets
(:mod:`.splits`). Inputs are scaled to ``[0, 1]`` when batched (the reference notebooks use
``bipolar=False``, ``lab=False``: ``x / 255``). Available datasets (:func:`load_dataset`, :mod:`.load`):

``cifar10``, ``cifar100``
    The official "python version" files in ``data_dir``, downloaded when absent (:mod:`.cifar`,
    :mod:`.download`).
``folder``
    Images in ``data_dir/<class>/*`` or ``data_dir/train/<class>/*`` with ``val/`` and ``test/``
    beside it (:mod:`.folders`).
``synthetic``
    Generated, seeded, 32x32, 10 classes, no download: see :func:`make_synthetic` (:mod:`.synthetic`).
``oxford_pets``, ``malaria``, ``colorectal_histology``, ``cropped_plantdoc``
    The papers' other datasets, downloaded from their official sources, checked, split as in the
    papers and memory-mapped: see :mod:`.paper`, :mod:`.paper_sources` and docs/datasets.md.

The validation set is 10% of the training set, held out with a seeded permutation.
``val_flips=True`` adds the horizontally, vertically and doubly flipped copies of every
validation image (x4, as in the Entropy 2022 paper). The training augmentation is
:class:`KerasAugment` (:mod:`.augment`).
"""

from .. import DATASETS, PAPER_DATASETS  # the names; numpy-free, so the CLI lists them with torch alone
from .augment import KerasAugment
from .cifar import CIFAR_SOURCES, CifarSource, SafeUnpickler, load_cifar
from .download import download_and_extract
from .folders import IMAGE_SUFFIXES, load_folder, to_rgb
from .load import load_dataset
from .splits import DataError, DatasetSplits, ImageSet, add_flipped_copies, check_splits, hold_out, to_float
from .synthetic import SYNTHETIC_CLASSES, make_synthetic

__all__ = [
    "DataError", "ImageSet", "DatasetSplits", "DATASETS", "CIFAR_SOURCES", "load_dataset", "load_cifar", "SafeUnpickler",
    "check_splits",
    "load_folder", "to_rgb", "make_synthetic", "hold_out", "add_flipped_copies", "to_float", "KerasAugment",
    "PAPER_DATASETS", "download_and_extract", "IMAGE_SUFFIXES", "CifarSource", "SYNTHETIC_CLASSES",
]
