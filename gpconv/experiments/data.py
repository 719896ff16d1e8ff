"""Datasets, splits, batching and augmentation for training.

Every dataset is loaded into memory as ``uint8`` image tensors ``(N, 3, H, W)`` with ``int64``
labels (:class:`ImageSet`); a :class:`DatasetSplits` holds the train / validation / test sets.
Inputs are scaled to ``[0, 1]`` when batched (the reference notebooks use ``bipolar=False``,
``lab=False``: ``x / 255``). Available datasets (:func:`load_dataset`):

``cifar10``, ``cifar100``
    The official "python version" files in ``data_dir`` (``cifar-10-batches-py/`` or
    ``cifar-100-python/``, or those files directly in ``data_dir``). When absent, the official
    archive is downloaded into ``data_dir`` and its MD5 checked; the URL can be overridden with
    ``GPCONV_CIFAR10_URL`` / ``GPCONV_CIFAR100_URL`` (and the checksum with ``..._MD5``).
``folder``
    Images in ``data_dir/<class>/*`` (then a seeded 10% validation / 10% test split) or in
    ``data_dir/train/<class>/*`` with ``val/`` (or ``validation/``) and/or ``test/`` beside it
    (a missing split is taken, seeded, from ``train``; a ``train/`` without subfolders is a class).
    Images are converted to 8-bit RGB faithfully (:func:`to_rgb`: 16-bit and float images scaled, not
    clipped) and resized to ``image_size``; files Pillow cannot open or convert are skipped with a
    warning and counted (``DatasetSplits.skipped_files``).
``synthetic``
    Generated, seeded, 32x32, 10 classes, no download: see :func:`make_synthetic`.
``oxford_pets``, ``malaria``, ``colorectal_histology``, ``cropped_plantdoc``
    The papers' other datasets, downloaded from their official sources, checked, split as in the
    papers and memory-mapped: see :mod:`gpconv.experiments.paper_datasets` and docs/datasets.md.

The validation set is 10% of the training set, held out with a seeded permutation.
``val_flips=True`` adds the horizontally, vertically and doubly flipped copies of every
validation image (x4, as in the Entropy 2022 paper).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..io import first_line
from . import DATASETS, PAPER_DATASETS  # the names; numpy-free, so the CLI lists them with torch alone

__all__ = [
    "DataError", "ImageSet", "DatasetSplits", "DATASETS", "CIFAR_SOURCES", "load_dataset", "load_cifar", "SafeUnpickler",
    "check_splits",
    "load_folder", "to_rgb", "make_synthetic", "hold_out", "add_flipped_copies", "to_float", "KerasAugment",
    "PAPER_DATASETS", "download_and_extract",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


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


# ----------------------------------------------------------------------------------------------
# splits


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


# ----------------------------------------------------------------------------------------------
# CIFAR


@dataclass(frozen=True)
class CifarSource:
    folder: str
    archive: str
    url: str
    md5: str
    train_files: Tuple[str, ...]
    test_file: str
    label_key: str
    meta_file: str
    names_key: str


CIFAR_SOURCES: Dict[str, CifarSource] = {
    "cifar10": CifarSource("cifar-10-batches-py", "cifar-10-python.tar.gz",
                           "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                           "c58f30108f718f92721af3b95e74349a",
                           tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels",
                           "batches.meta", "label_names"),
    "cifar100": CifarSource("cifar-100-python", "cifar-100-python.tar.gz",
                            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                            "eb9058c3a382ffc7106e4002c42a8d85",
                            ("train",), "test", "fine_labels", "meta", "fine_label_names"),
}


def _file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of the file at ``path`` (``algorithm``: any :mod:`hashlib` name)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cifar_folder(data_dir: Path, source: CifarSource) -> Optional[Path]:
    for candidate in (data_dir / source.folder, data_dir):
        if all((candidate / name).is_file() for name in (*source.train_files, source.test_file)):
            return candidate
    return None


def _fetch(url: str, archive: Path, timeout: float) -> None:
    """Download ``url`` to ``archive`` through ``archive.part``, resuming a partial file with an HTTP Range.

    A server that ignores the Range gets a fresh download; an interrupted transfer leaves the
    ``.part`` file for the next call and raises :class:`ConnectionError` (an ``OSError``).
    """
    from tqdm import tqdm

    partial = archive.with_name(archive.name + ".part")
    done = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not done:  # 416: the range is past the end, start again
            raise
        partial.unlink()
        return _fetch(url, archive, timeout)
    with response:
        resumed = bool(done) and response.status == 206
        expected = response.length  # what this response announces (None: unknown)
        start = done if resumed else 0
        received = 0
        with open(partial, "ab" if resumed else "wb") as out, \
                tqdm(total=None if expected is None else start + expected, initial=start, unit="B",
                     unit_scale=True, leave=False, desc=archive.name, disable=None) as bar:
            try:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except http.client.HTTPException:
                pass  # reported below as a short transfer
    if expected is not None and received < expected:
        raise ConnectionError(f"download of {url} interrupted after {start + received} bytes; {partial} is kept and "
                              "the next run resumes it")
    os.replace(partial, archive)


class _UnsafeArchive(DataError):
    """An archive member would land outside the target folder, or is a link."""


def _safe_members(names: Sequence[str], staging: Path, archive: Path) -> None:
    root = staging.resolve()
    for name in names:
        target = (staging / name).resolve()
        if target != root and root not in target.parents:
            raise _UnsafeArchive(f"unsafe path {name!r} in {archive}")


def _extract(archive: Path, data_dir: Path) -> List[Path]:
    """Unpack a tar (any compression) or zip ``archive`` into ``data_dir``: all of it or nothing.

    Members go to a temporary folder in ``data_dir`` first and its top-level entries are moved into
    place at the end; an existing entry of the same name is never overwritten. Returns the moved paths.
    """
    staging = Path(tempfile.mkdtemp(dir=data_dir, prefix=f".{archive.name}.unpack-"))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                _safe_members(bundle.namelist(), staging, archive)
                bundle.extractall(staging)
        else:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                _safe_members([m.name for m in members], staging, archive)
                if any(m.issym() or m.islnk() for m in members):
                    raise _UnsafeArchive(f"links in {archive} are not accepted")
                tar.extractall(staging, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        entries = sorted(staging.iterdir())
        clashes = [str(data_dir / e.name) for e in entries if (data_dir / e.name).exists()]
        if clashes:
            raise DataError(f"cannot unpack {archive}: {clashes[0]} already exists (move it away and run again)")
        for entry in entries:
            os.replace(entry, data_dir / entry.name)
        return [data_dir / e.name for e in entries]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_and_extract(url: str, md5: Optional[str], data_dir: Path, archive_name: str, timeout: float = 60.0,
                         *, sha256: Optional[str] = None) -> List[Path]:
    """Download ``url`` into ``data_dir/archive_name``, check its MD5 and/or SHA-256, unpack it there.

    An archive already in ``data_dir`` is checked and unpacked without downloading; a partial
    download (``archive_name.part``) is resumed. An archive with a wrong checksum, or that cannot
    be unpacked, is refused (:class:`DataError`), removed if this call downloaded it, and nothing of
    it is left unpacked. Returns the unpacked top-level paths.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / archive_name
    downloaded = not archive.is_file()
    if downloaded:
        _fetch(url, archive, timeout)
    origin = f"downloaded from {url}" if downloaded else "(put there, not downloaded)"

    def refuse(problem: str) -> DataError:
        if downloaded:
            archive.unlink()
        return DataError(f"{problem} ({'the file was removed' if downloaded else 'remove or replace it'})")

    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        actual = _file_digest(archive, algorithm) if expected else expected
        if actual != expected:
            raise refuse(f"checksum mismatch for {archive} {origin}: {algorithm} {actual}, expected {expected}")
    try:
        return _extract(archive, data_dir)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, _UnsafeArchive) as error:
        raise refuse(f"cannot unpack {archive}: {error}") from None


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class SafeUnpickler(pickle.Unpickler):
    """Unpickles plain data only: dicts, lists, tuples, str, bytes, numbers and numpy arrays (what the
    CIFAR "python version" files hold). Any other class or function in the file is refused, so a
    crafted file cannot run code (:class:`pickle.UnpicklingError`)."""

    _ALLOWED = {("numpy", "ndarray"): lambda: np.ndarray, ("numpy", "dtype"): lambda: np.dtype,
                ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
                ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a data file may not")
        return self._ALLOWED[(module, name)]()


def _unpickle(path: Path, keys: Sequence[str] = ()) -> dict:
    """Read a CIFAR batch file with :class:`SafeUnpickler`; DataError (one line) when it cannot be read,
    is not a mapping, lacks one of ``keys`` or holds object arrays."""
    try:
        with open(path, "rb") as handle:
            entry = SafeUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError) as error:
        raise DataError(f"cannot read {path}: {first_line(error)}") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path} is not a CIFAR batch file (expected a mapping, got {type(entry).__name__})")
    entry = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in entry.items()}
    missing = [key for key in keys if key not in entry]
    if missing:
        raise DataError(f"{path} is not a CIFAR batch file: it has no {', '.join(missing)}")
    if any(isinstance(value, np.ndarray) and value.dtype.hasobject for value in entry.values()):
        raise DataError(f"{path} is not a CIFAR batch file: it holds an object array")
    return entry


def _batch_arrays(entry: dict, path: Path, label_key: str) -> Tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 of one batch; DataError when malformed."""
    try:
        data = np.asarray(entry["data"])
        labels = np.asarray(entry[label_key])
        if data.dtype.kind not in "ui" or labels.dtype.kind not in "ui" or labels.ndim != 1:
            raise ValueError("unexpected types")
        images = data.astype(np.uint8).reshape(-1, 3, 32, 32)
    except (ValueError, TypeError) as error:
        raise DataError(f"{path} is not a CIFAR batch file: its data is not N x 3072 bytes with N labels "
                        f"({str(error).splitlines()[0]})") from None
    if len(images) != len(labels) or (len(labels) and labels.min() < 0):
        raise DataError(f"{path} is damaged: {len(images)} images, {len(labels)} labels"
                        f"{', negative labels' if len(labels) and labels.min() < 0 else ''}")
    return images, labels.astype(np.int64)


def load_cifar(name: str, data_dir, *, download: bool = True, url: Optional[str] = None,
               md5: Optional[str] = None) -> Tuple[ImageSet, ImageSet, List[str]]:
    """Train and test sets of ``cifar10`` / ``cifar100`` from the official python files in ``data_dir``.

    When the files are absent and ``download`` is true, the archive at ``url`` (default: the
    official one, or ``$GPCONV_CIFAR10_URL`` / ``$GPCONV_CIFAR100_URL``) is downloaded into
    ``data_dir`` and checked against ``md5`` (default: the official archive's, or ``$..._MD5``).
    """
    source = CIFAR_SOURCES[name]
    data_dir = Path(data_dir)
    folder = _cifar_folder(data_dir, source)
    expected = f"{data_dir / source.folder}/{{{','.join(source.train_files)},{source.test_file}}}"
    if folder is None:
        if not download:
            raise DataError(f"{name} files not found: expected {expected} (official python version)")
        env = name.upper()
        url = url or os.environ.get(f"GPCONV_{env}_URL", source.url)
        md5 = md5 or os.environ.get(f"GPCONV_{env}_MD5", source.md5)
        try:
            download_and_extract(url, md5, data_dir, source.archive)
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise DataError(f"{name} files not found: expected {expected}; downloading {url} failed ({reason}). "
                            f"Put the official python-version files there.") from None
        except tarfile.TarError as error:
            raise DataError(f"cannot extract {data_dir / source.archive}: {error}") from None
        folder = _cifar_folder(data_dir, source)
        if folder is None:
            raise DataError(f"{url} did not contain {expected}")

    def read(files: Sequence[str]) -> ImageSet:
        images, labels = [], []
        for file in files:
            batch = _batch_arrays(_unpickle(folder / file, ("data", source.label_key)), folder / file,
                                  source.label_key)
            images.append(batch[0])
            labels.append(batch[1])
        return ImageSet(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))

    train, test = read(source.train_files), read([source.test_file])
    meta = folder / source.meta_file
    classes = int(max(train.labels.max(), test.labels.max())) + 1
    raw_names = _unpickle(meta, (source.names_key,))[source.names_key] if meta.is_file() else []
    names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in raw_names] \
        if isinstance(raw_names, (list, tuple)) else []
    if len(names) < classes:
        names = [str(i) for i in range(100 if name == "cifar100" else 10)]
    if classes > len(names):
        raise DataError(f"{folder} has label {classes - 1}, but {name} has {len(names)} classes")
    return train, test, names


# ----------------------------------------------------------------------------------------------
# folders of images


def _class_folders(root: Path) -> List[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


class _Unconvertible(ValueError):
    """An image whose values cannot be mapped to 8 bits without guessing their range."""


def to_rgb(image):
    """An 8-bit RGB copy of the Pillow ``image``, its values scaled faithfully: 16-bit grey (``I;16*``,
    and ``I`` with values in 0..65535) divided by 257, floating point (``F``) in ``[0, 1]`` times 255,
    the EXIF orientation applied; CIELAB (``LAB``) through a colour transform to sRGB (Pillow's
    ``convert`` would reinterpret its channels); every other mode through Pillow's ``convert("RGB")``
    (which would clip 16-bit values to 255: a 16-bit PNG would turn white). :class:`ValueError` for an
    ``I`` or ``F`` image outside those ranges, whose scale cannot be known."""
    from PIL import Image, ImageCms, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode == "LAB":
        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(image, transform)
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        high = 1.0 if image.mode == "F" else 65535.0
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= high):
            raise _Unconvertible(f"mode {image.mode} values {values.min():g}..{values.max():g} are outside 0..{high:g}, "
                                 "so their 8-bit scale is unknown")
        grey = np.round(values * (255.0 / high)).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def _read_image_folder(root: Path, class_names: List[str], image_size: int) -> Tuple[ImageSet, int]:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        raise DataError("the folder dataset needs pillow (pip install pillow)") from None
    images, labels, skipped = [], [], 0
    for label, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as image:
                    image = to_rgb(image).resize((image_size, image_size), Image.BILINEAR)
                    array = np.asarray(image, dtype=np.uint8)
            except Exception as error:  # noqa: BLE001 - Pillow's decoders raise many kinds for a damaged file
                skipped += 1
                warnings.warn(f"skipping unreadable image {path}: {first_line(error)}", stacklevel=2)
                continue
            images.append(torch.from_numpy(array.copy()).permute(2, 0, 1))
            labels.append(label)
    if not images:
        empty = torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)
        return ImageSet(empty, torch.zeros(0, dtype=torch.int64)), skipped
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64)), skipped


def _check_class_folders(root: Path, class_names: List[str], data: ImageSet) -> None:
    """DataError naming the first class folder of ``root`` without a readable image."""
    counts = torch.bincount(data.labels, minlength=len(class_names))
    empty = [name for name, count in zip(class_names, counts.tolist()) if count == 0]
    if empty and len(data):
        raise DataError(f"class folder {root / empty[0]} has no readable image"
                        f"{f' ({len(empty)} such folders)' if len(empty) > 1 else ''}: remove it or add images")


def load_folder(data_dir, image_size: int, seed: int) -> DatasetSplits:
    """Images in class subfolders (see the module docstring), resized to ``image_size`` squares."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    split_dirs = {name: root / name for name in ("train", "val", "validation", "test") if (root / name).is_dir()}
    if "train" in split_dirs and not _class_folders(split_dirs["train"]):
        split_dirs = {}  # train/ holds no class folders: it is a class of data_dir/<class>/*
    notes = []
    if "train" in split_dirs:
        class_names = [p.name for p in _class_folders(split_dirs["train"])]
        for split in ("val", "validation", "test"):
            unknown = [p.name for p in _class_folders(split_dirs[split])] if split in split_dirs else []
            unknown = [name for name in unknown if name not in class_names]
            if unknown:
                raise DataError(f"{split_dirs[split] / unknown[0]} is a class that {split_dirs['train']} does not have: "
                                "every split needs the classes of train/")
        train, skipped = _read_image_folder(split_dirs["train"], class_names, image_size)
        _check_class_folders(split_dirs["train"], class_names, train)
        val_dir = split_dirs.get("val") or split_dirs.get("validation")
        test = val = None
        if "test" in split_dirs:
            test, more = _read_image_folder(split_dirs["test"], class_names, image_size)
            skipped += more
        if val_dir is not None:
            val, more = _read_image_folder(val_dir, class_names, image_size)
            skipped += more
        if test is None:
            train, test = hold_out(train, 0.1, seed + 1)
            notes.append("test: seeded 10% of train/")
        if val is None:
            train, val = hold_out(train, 0.1, seed)
            notes.append("validation: seeded 10% of train/")
    else:
        class_names = [p.name for p in _class_folders(root)]
        if not class_names:
            raise DataError(f"no class folders in {root}: expected {root}/<class>/<image files>")
        everything, skipped = _read_image_folder(root, class_names, image_size)
        _check_class_folders(root, class_names, everything)
        rest, test = hold_out(everything, 0.1, seed + 1)
        train, val = hold_out(rest, 0.1 / 0.9, seed)
        notes.append("seeded split of all images: 80% train, 10% validation, 10% test")
    if len(train) == 0:
        raise DataError(f"no readable images in {root}")
    return DatasetSplits("folder", train, val, test, class_names, skipped, notes)


# ----------------------------------------------------------------------------------------------
# synthetic

SYNTHETIC_CLASSES = ("disc", "square", "ring", "horizontal-bars", "vertical-bars", "diagonal-bars", "plus",
                     "triangle", "checkerboard", "two-dots")


def make_synthetic(count: int, seed: int, image_size: int = 32) -> ImageSet:
    """A generated, learnable 10-class set: one coloured shape per image on a noisy background.

    The class decides the shape (:data:`SYNTHETIC_CLASSES`) and the hue of the shape (class ``c``
    has hue ``c / 10`` plus a little jitter), so both shape and colour carry the label; position,
    size, brightness, background and noise are random. Images are ``uint8`` ``(count, 3, S, S)``,
    labels cycle through the classes in a seeded random order. Same ``seed`` -> same images.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 10
    labels = labels[torch.randperm(count, generator=g)]
    s = image_size
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    yy, xx = coords.view(1, s, 1).expand(count, s, s), coords.view(1, 1, s).expand(count, s, s)

    def rand(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=g)

    cx, cy = rand(count, 1, 1, low=0.35, high=0.65), rand(count, 1, 1, low=0.35, high=0.65)
    r = rand(count, 1, 1, low=0.18, high=0.3)
    dx, dy = xx - cx, yy - cy
    period = rand(count, 1, 1, low=0.16, high=0.24)
    box = (dx.abs() < r) & (dy.abs() < r)
    masks = {
        0: dx ** 2 + dy ** 2 < r ** 2,
        1: box,
        2: ((dx ** 2 + dy ** 2).sqrt() - r * 0.75).abs() < r * 0.25,
        3: box & (torch.remainder(yy / period, 1.0) < 0.5),
        4: box & (torch.remainder(xx / period, 1.0) < 0.5),
        5: box & (torch.remainder((xx + yy) / period, 1.0) < 0.5),
        6: box & ((dx.abs() < r * 0.3) | (dy.abs() < r * 0.3)),
        7: (dy < r) & (dy > -r) & (dx.abs() < (dy + r) * 0.5),
        8: box & ((torch.remainder(xx / period, 1.0) < 0.5) ^ (torch.remainder(yy / period, 1.0) < 0.5)),
        9: ((dx - r * 0.6) ** 2 + dy ** 2 < (r * 0.45) ** 2) | ((dx + r * 0.6) ** 2 + dy ** 2 < (r * 0.45) ** 2),
    }
    mask = torch.zeros(count, s, s, dtype=torch.bool)
    for label, shape_mask in masks.items():
        chosen = labels == label
        mask[chosen] = shape_mask[chosen]
    hue = (labels.float() / 10 + rand(count, low=-0.02, high=0.02)) % 1.0
    value = rand(count, low=0.7, high=1.0)
    # HSV (saturation 0.8) -> RGB, vectorised
    k = torch.stack([(5 + hue * 6) % 6, (3 + hue * 6) % 6, (1 + hue * 6) % 6], dim=1)
    colour = value[:, None] * (1 - 0.8 * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    background = rand(count, 3, 1, 1, low=0.0, high=0.35)
    noise = 0.06 * torch.randn(count, 3, s, s, generator=g)
    images = torch.where(mask[:, None], colour[:, :, None, None], background) + noise
    return ImageSet((images.clamp(0, 1) * 255).round().to(torch.uint8), labels.to(torch.int64))


# ----------------------------------------------------------------------------------------------
# entry point


def _resize(data: ImageSet, size: int) -> ImageSet:
    if tuple(data.images.shape[-2:]) == (size, size) or len(data) == 0:
        return data
    resized = F.interpolate(data.images.float(), size=(size, size), mode="bilinear", align_corners=False,
                            antialias=True)
    return ImageSet(resized.round().clamp(0, 255).to(torch.uint8), data.labels)


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


def load_dataset(name: str, data_dir=None, *, image_size: Optional[int] = None, seed: int = 0,
                 val_fraction: float = 0.1, val_flips: bool = False, download: bool = True,
                 synthetic_size: Tuple[int, int] = (2000, 500)) -> DatasetSplits:
    """Load ``name`` (one of :data:`DATASETS`) with its train / validation / test splits.

    ``image_size`` resizes every image (default: 32 for CIFAR and synthetic; required-ish for
    ``folder``, where it defaults to 32 too; 224 for :data:`PAPER_DATASETS`, which are split as
    the papers, see :mod:`gpconv.experiments.paper_datasets`). ``val_fraction`` of the training images (seeded)
    become the validation set, except for folder datasets with their own ``val/`` folder.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    if name in PAPER_DATASETS:
        from .paper_datasets import load_paper_dataset
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


# ----------------------------------------------------------------------------------------------
# augmentation


@dataclass
class KerasAugment:
    """Batched random affine augmentation on tensors, as Keras' ``ImageDataGenerator`` of the papers.

    Defaults are the reference's ``create_image_generator(rotation_range=20, width_shift_range=0.3,
    height_shift_range=0.3)`` with its other defaults: shear 0.2 (Keras reads it in *degrees*), zoom
    0.3 (independent x and y scales in ``[0.7, 1.3]``), horizontal flip, ``fill_mode='nearest'``
    (edge pixels repeat: ``padding_mode='border'``). Keras interpolates with order 1, so the default
    ``interpolation`` is ``'bilinear'``; ``'nearest'`` is available. Works on any device; the random
    parameters come from the given CPU ``torch.Generator`` so a run is reproducible and resumable.
    """

    rotation_degrees: float = 20.0
    shift: float = 0.3
    shear_degrees: float = 0.2
    zoom: float = 0.3
    horizontal_flip: bool = True
    interpolation: str = "bilinear"

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = images.shape[0]

        def uniform(bound):
            return (torch.rand(n, generator=generator) * 2 - 1) * bound

        theta = torch.deg2rad(uniform(self.rotation_degrees))
        shear = torch.deg2rad(uniform(self.shear_degrees))
        zx, zy = 1 + uniform(self.zoom), 1 + uniform(self.zoom)
        tx, ty = uniform(self.shift) * 2, uniform(self.shift) * 2  # fraction of size -> [-1, 1] coordinates
        flip = torch.rand(n, generator=generator) < 0.5 if self.horizontal_flip else torch.zeros(n, dtype=torch.bool)
        cos, sin = torch.cos(theta), torch.sin(theta)
        # output pixel -> input pixel: rotation . shear . zoom, then shift (as Keras' transform_matrix)
        rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
        shear_m = torch.stack([torch.stack([torch.ones(n), -torch.sin(shear)], -1),
                               torch.stack([torch.zeros(n), torch.cos(shear)], -1)], -2)
        zoom_m = torch.diag_embed(torch.stack([zx, zy], -1))
        linear = rotation @ shear_m @ zoom_m
        linear[:, :, 0] *= torch.where(flip, -1.0, 1.0)[:, None]  # flip the output's x axis
        matrix = torch.cat([linear, torch.stack([tx, ty], -1)[:, :, None]], dim=2)
        matrix = matrix.to(device=images.device, dtype=images.dtype)
        grid = F.affine_grid(matrix, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode=self.interpolation, padding_mode="border", align_corners=False)
