"""CIFAR-10 and CIFAR-100 from the official "python version" files, read without running code.

The files are in ``data_dir`` (``cifar-10-batches-py/`` or ``cifar-100-python/``, or those files
directly in ``data_dir``). When absent, the official archive is downloaded into ``data_dir`` and its
MD5 checked; the URL can be overridden with ``GPCONV_CIFAR10_URL`` / ``GPCONV_CIFAR100_URL`` (and the
checksum with ``..._MD5``). The batch files are pickles: :class:`SafeUnpickler` reads plain data only.
"""

from __future__ import annotations

import os
import pickle
import tarfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...io import first_line
from .download import download_and_extract
from .splits import DataError, ImageSet

__all__ = ["CifarSource", "CIFAR_SOURCES", "SafeUnpickler", "load_cifar"]


@dataclass(frozen=True)
class CifarSource:
    """Where one CIFAR set comes from and what its python-version files are called."""

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


def _cifar_folder(data_dir: Path, source: CifarSource) -> Optional[Path]:
    for candidate in (data_dir / source.folder, data_dir):
        if all((candidate / name).is_file() for name in (*source.train_files, source.test_file)):
            return candidate
    return None


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

