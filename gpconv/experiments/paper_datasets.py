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

import csv
import json
import math
import os
import shutil
import tempfile
import urllib.error
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .data import (IMAGE_SUFFIXES, PAPER_DATASETS, DataError, DatasetSplits, ImageSet, download_and_extract)

__all__ = ["Archive", "PaperSource", "SOURCES", "Entry", "MappedImages", "prepare_cache", "stratified_split",
           "load_paper_dataset"]

PLANTDOC_COMMIT = "b479f7232dd7af2060920e49359142904fe15273"


@dataclass(frozen=True)
class Archive:
    """One file to download: its official URL, name in ``data_dir``, SHA-256 and what it unpacks to."""

    url: str
    file: str
    sha256: Optional[str]
    unpacks_to: str


@dataclass(frozen=True)
class PaperSource:
    """Where a dataset comes from and how the papers split it (held-out fractions of each class)."""

    title: str
    archives: Tuple[Archive, ...]
    val_fraction: float
    test_fraction: float  # 0: the dataset's own test list is the test set
    licence: str


SOURCES: Dict[str, PaperSource] = {
    "oxford_pets": PaperSource(
        "Oxford-IIIT Pet (Parkhi et al. 2012), 37 breeds",
        (Archive("https://thor.robots.ox.ac.uk/~vgg/data/pets/images.tar.gz", "images.tar.gz",
                 "67195c5e1c01f1ab5f9b6a5d22b8c27a580d896ece458917e61d459337fa318d", "images"),
         Archive("https://thor.robots.ox.ac.uk/~vgg/data/pets/annotations.tar.gz", "annotations.tar.gz",
                 "52425fb6de5c424942b7626b428656fcbd798db970a937df61750c0f1d358e91", "annotations")),
        0.1, 0.0, "CC BY-SA 4.0"),
    "malaria": PaperSource(
        "Malaria cell images (NIH/NLM, Rajaraman et al. 2018), 2 classes",
        (Archive("https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip", "cell_images.zip",
                 "0a949556b2414159b5100192609805376654c4266d8d187be9b1922fad43c668", "cell_images"),),
        0.1, 0.1, "U.S. National Library of Medicine, free to use with citation"),
    "colorectal_histology": PaperSource(
        "Colorectal cancer histology (Kather et al. 2016), 5,000 tiles, 8 classes",
        (Archive("https://zenodo.org/record/53169/files/Kather_texture_2016_image_tiles_5000.zip",
                 "Kather_texture_2016_image_tiles_5000.zip",
                 "936d0b95ae0f04f1f7b18a2b7e8c55776c3e887d102f645bcee752d1a6626a32",
                 "Kather_texture_2016_image_tiles_5000"),),
        0.1, 0.1, "CC BY 4.0"),
    "cropped_plantdoc": PaperSource(
        "Cropped-PlantDoc (Singh et al. 2020): the labelled boxes of PlantDoc cut out, 29 classes",
        (Archive("https://github.com/pratikkayal/PlantDoc-Object-Detection-Dataset/archive/"
                 f"{PLANTDOC_COMMIT}.zip", f"PlantDoc-Object-Detection-Dataset-{PLANTDOC_COMMIT}.zip", None,
                 f"PlantDoc-Object-Detection-Dataset-{PLANTDOC_COMMIT}"),),
        0.15, 0.2, "CC BY 4.0"),
}
assert tuple(SOURCES) == PAPER_DATASETS


class Entry(NamedTuple):
    """One image of a dataset: its file, class index, crop box ``(left, top, right, bottom)`` or None,
    and whether the dataset's own test list holds it."""

    path: Path
    label: int
    box: Optional[Tuple[int, int, int, int]] = None
    official_test: bool = False


# ----------------------------------------------------------------------------------------------
# what each archive holds


def _class_files(root: Path) -> Tuple[List[Entry], List[str]]:
    """``root/<class>/<image>`` (sorted), the classes in sorted order."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    entries = [Entry(path, label) for label, name in enumerate(classes) for path in sorted((root / name).iterdir())
               if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES]
    return entries, classes


def _oxford_pets(data_dir: Path) -> Tuple[List[Entry], List[str]]:
    """``annotations/trainval.txt`` and ``test.txt``: ``<image> <class 1-37> <species> <breed>`` lines."""
    entries, names = [], {}
    for list_name, official_test in (("trainval.txt", False), ("test.txt", True)):
        listing = data_dir / "annotations" / list_name
        if not listing.is_file():
            raise DataError(f"{listing} is missing: annotations.tar.gz of Oxford-IIIT Pet holds it")
        for line in listing.read_text().splitlines():
            fields = line.split()
            if len(fields) < 2 or line.startswith("#"):
                continue
            label = int(fields[1]) - 1
            names[label] = fields[0].rsplit("_", 1)[0]
            entries.append(Entry(data_dir / "images" / f"{fields[0]}.jpg", label, None, official_test))
    return entries, [names[i] for i in sorted(names)]


def _plantdoc(data_dir: Path) -> Tuple[List[Entry], List[str]]:
    """``train_labels.csv`` / ``test_labels.csv`` (filename, width, height, class, xmin, ymin, xmax, ymax):
    one crop per labelled box of ``TRAIN/`` and ``TEST/``, all pooled as in the paper."""
    root = data_dir / SOURCES["cropped_plantdoc"].archives[0].unpacks_to
    rows = []
    for csv_name, folder in (("train_labels.csv", "TRAIN"), ("test_labels.csv", "TEST")):
        with open(root / csv_name, newline="") as handle:
            for row in csv.DictReader(handle):
                box = tuple(int(float(row[key])) for key in ("xmin", "ymin", "xmax", "ymax"))
                rows.append((root / folder / row["filename"], row["class"], box))
    classes = sorted({name for _, name, _ in rows})
    index = {name: i for i, name in enumerate(classes)}
    return [Entry(path, index[name], box) for path, name, box in rows], classes


_LISTINGS: Dict[str, Callable[[Path], Tuple[List[Entry], List[str]]]] = {
    "oxford_pets": _oxford_pets,
    "malaria": lambda data_dir: _class_files(data_dir / "cell_images"),
    "colorectal_histology": lambda data_dir: _class_files(data_dir / "Kather_texture_2016_image_tiles_5000"),
    "cropped_plantdoc": _plantdoc,
}


# ----------------------------------------------------------------------------------------------
# download


def _ensure_unpacked(name: str, data_dir: Path, download: bool) -> None:
    """Download, check and unpack each archive of ``name`` whose folder is not in ``data_dir`` yet."""
    mirror = os.environ.get("GPCONV_DATASET_MIRROR")
    for archive in SOURCES[name].archives:
        if (data_dir / archive.unpacks_to).is_dir():
            continue
        url = f"{mirror.rstrip('/')}/{archive.file}" if mirror else archive.url
        where = (f"download {archive.url} and put it in {data_dir / archive.file} (it is checked and unpacked on "
                 "the next run), or set GPCONV_DATASET_MIRROR")
        if not download and not (data_dir / archive.file).is_file():
            raise DataError(f"{name}: {data_dir / archive.unpacks_to} not found; {where}")
        try:
            download_and_extract(url, None, data_dir, archive.file, sha256=archive.sha256)
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise DataError(f"{name}: {data_dir / archive.unpacks_to} not found and downloading {url} failed "
                            f"({reason}); {where}") from None
        if not (data_dir / archive.unpacks_to).is_dir():
            raise DataError(f"{data_dir / archive.file} did not hold {archive.unpacks_to}/")


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
    _ensure_unpacked(name, data_dir, download)
    entries, class_names = _LISTINGS[name](data_dir)
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
