"""The papers' image datasets by name: download, checksum, unpack, the papers' split, memory-mapped.

``oxford_pets``, ``malaria``, ``colorectal_histology`` and ``cropped_plantdoc`` (Mendel 2022
Tables 3-4, Entropy 2022 Tables 7-8; docs/datasets.md). On first use the official archives are
downloaded into ``data_dir`` (resuming a partial download), checked against their published
SHA-256, unpacked (all or nothing) and decoded once into a cache of ``uint8`` images at the
requested size, ``data_dir/gpconv-cache/<name>-<size>px/``. Later runs read the cache through a
memory map (:class:`MappedImages`): only the batches in use are in RAM, whatever the dataset size.

Every image is "smart resized" as in the papers' loader: the largest centred square is cropped and
resized (bilinear) to ``size x size``. The split is drawn per class with a seeded permutation:
``ceil(fraction * n)`` images of each class go to validation and to test (:data:`SOURCES`), which
gives the papers' counts (Malaria 22,046 / 2,756 / 2,756; colorectal 3,992 / 504 / 504).
``GPCONV_DATASET_MIRROR`` (a base URL) replaces the official hosts; the checksums still apply.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .paper_sources import SOURCES, Entry, ensure_unpacked, list_entries
from .splits import DataError, DatasetSplits, ImageSet

__all__ = ["MappedImages", "prepare_cache", "stratified_split", "load_paper_dataset"]

# ----------------------------------------------------------------------------------------------
# decoding into the cache


def _decode(entry: Entry, size: int) -> np.ndarray:
    """The image (cropped to ``entry.box``), centre-cropped to a square and resized: ``(3, size, size)`` uint8."""
    from PIL import Image

    with Image.open(entry.path) as image:
        image = image.convert("RGB")
        if entry.box is not None:
            x1, y1, x2, y2 = entry.box
            left, right = max(0, min(x1, x2)), min(image.width, max(x1, x2))
            top, bottom = max(0, min(y1, y2)), min(image.height, max(y1, y2))
            if right <= left or bottom <= top:
                raise ValueError(f"empty box {entry.box}")
            image = image.crop((left, top, right, bottom))
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def prepare_cache(name: str, data_dir: Path, entries: Sequence[Entry], size: int) -> Path:
    """Decode ``entries`` once into ``data_dir/gpconv-cache/<name>-<size>px/`` (built aside, then renamed).

    The folder holds ``images.u8`` (raw ``(N, 3, size, size)`` uint8), ``labels.npy`` and
    ``index.json`` (the entry each row came from, and the unreadable files that were skipped).
    """
    from tqdm import tqdm

    cache = data_dir / "gpconv-cache" / f"{name}-{size}px"
    if (cache / "index.json").is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=f".{cache.name}-"))
    try:
        rows, labels, skipped = [], [], []
        with open(staging / "images.u8", "wb") as out:
            for number, entry in enumerate(tqdm(entries, desc=f"decoding {name} at {size}px", unit="image",
                                                disable=None, leave=False)):
                try:
                    out.write(_decode(entry, size).tobytes())
                except (OSError, ValueError, SyntaxError) as error:
                    skipped.append(str(entry.path))
                    warnings.warn(f"skipping unreadable image {entry.path}: {error}", stacklevel=2)
                    continue
                rows.append(number)
                labels.append(entry.label)
        np.save(staging / "labels.npy", np.asarray(labels, dtype=np.int64))
        (staging / "index.json").write_text(json.dumps({"size": size, "entries": len(entries), "rows": rows,
                                                        "skipped": skipped}))
        try:
            os.replace(staging, cache)
        except OSError:  # another process (a DDP rank) finished the same cache first
            if not (cache / "index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache


class MappedImages:
    """Rows of a memory-mapped ``(N, 3, S, S)`` uint8 array, read (and flipped) only when indexed.

    Indexing with an int, slice, index tensor or array returns a ``uint8`` tensor, as indexing
    :attr:`ImageSet.images` does; ``flips`` codes each row: 0 as is, 1 horizontal, 2 vertical, 3 both.
    """

    def __init__(self, array: np.ndarray, rows: np.ndarray, flips: Optional[np.ndarray] = None):
        self.array, self.rows = array, np.asarray(rows, dtype=np.int64)
        self.flips = np.zeros(len(self.rows), dtype=np.int8) if flips is None else np.asarray(flips, dtype=np.int8)

    @property
    def shape(self) -> Tuple[int, ...]:
        return (len(self.rows), *self.array.shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> torch.Tensor:
        key = key.numpy() if isinstance(key, torch.Tensor) else key
        single = np.ndim(self.rows[key]) == 0
        rows, flips = np.atleast_1d(self.rows[key]), torch.from_numpy(np.atleast_1d(self.flips[key]))
        batch = torch.from_numpy(np.ascontiguousarray(self.array[rows]))
        for code, dims in ((1, (-1,)), (2, (-2,)), (3, (-2, -1))):
            chosen = flips == code
            if chosen.any():
                batch[chosen] = batch[chosen].flip(dims)
        return batch[0] if single else batch

    def with_flipped_copies(self) -> "MappedImages":
        """Every row as is, flipped horizontally, vertically and both (x4, the order of ``add_flipped_copies``)."""
        return MappedImages(self.array, np.tile(self.rows, 4), np.repeat(np.arange(4, dtype=np.int8), len(self.rows)))


# ----------------------------------------------------------------------------------------------
# splits


def stratified_split(labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float,
                     official_test: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices ``(train, val, test)``: of each class, seeded, ``ceil(fraction * n)`` to validation and test.

    With ``official_test`` (a boolean mask) those images are the test set and the validation set
    is drawn from the others.
    """
    generator = torch.Generator().manual_seed(seed)
    official = np.zeros(len(labels), dtype=bool) if official_test is None else np.asarray(official_test)
    parts: Tuple[List[np.ndarray], ...] = ([], [], [np.flatnonzero(official)])
    for label in np.unique(labels):
        members = np.flatnonzero((labels == label) & ~official)
        members = members[torch.randperm(len(members), generator=generator).numpy()]
        n_val, n_test = math.ceil(val_fraction * len(members)), math.ceil(test_fraction * len(members))
        parts[1].append(members[:n_val])
        parts[2].append(members[n_val:n_val + n_test])
        parts[0].append(members[n_val + n_test:])
    return tuple(np.sort(np.concatenate(part)).astype(np.int64) for part in parts)


def load_paper_dataset(name: str, data_dir, *, image_size: int = 224, seed: int = 0, val_flips: bool = False,
                       download: bool = True) -> DatasetSplits:
    """``name`` (one of :data:`PAPER_DATASETS`) from ``data_dir``: downloaded if needed, split as the papers."""
    if data_dir is None:
        raise DataError(f"{name} needs --data-dir (where it is downloaded to, or already is)")
    data_dir = Path(data_dir)
    source = SOURCES[name]
    ensure_unpacked(name, data_dir, download)
    entries, class_names = list_entries(name, data_dir)
    if not entries:
        raise DataError(f"no images of {name} in {data_dir}")
    cache = prepare_cache(name, data_dir, entries, image_size)
    index = json.loads((cache / "index.json").read_text())
    if index["entries"] != len(entries):
        raise DataError(f"{cache} was built from {index['entries']} images, {data_dir} now lists {len(entries)}: "
                        "remove that folder to rebuild it")
    labels = np.load(cache / "labels.npy", allow_pickle=False)
    array = np.memmap(cache / "images.u8", dtype=np.uint8, mode="r", shape=(len(labels), 3, image_size, image_size))
    official = np.array([entries[row].official_test for row in index["rows"]], dtype=bool)
    parts = stratified_split(labels, seed, source.val_fraction, source.test_fraction,
                             official if source.test_fraction == 0 else None)
    train, val, test = (ImageSet(MappedImages(array, rows), torch.from_numpy(labels[rows])) for rows in parts)
    if val_flips:
        val = ImageSet(val.images.with_flipped_copies(), val.labels.repeat(4))
    held_out = (f"test: the official test list; validation: {source.val_fraction:.0%} of each class"
                if source.test_fraction == 0 else
                f"validation {source.val_fraction:.0%} and test {source.test_fraction:.0%} of each class")
    notes = [f"{source.title}; seeded split ({held_out}); {image_size}x{image_size}, memory-mapped from {cache}"]
    return DatasetSplits(name, train, val, test, class_names, len(index["skipped"]), notes)
