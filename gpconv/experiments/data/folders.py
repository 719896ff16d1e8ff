"""Image folders: ``data_dir/<class>/*``, or ``train/`` with ``val/`` (or ``validation/``) and ``test/``.

Images in ``data_dir/<class>/*`` get a seeded 10% validation / 10% test split; with
``data_dir/train/<class>/*``, a missing ``val/`` or ``test/`` is taken, seeded, from ``train`` (a
``train/`` without subfolders is a class). Images are converted to 8-bit RGB faithfully
(:func:`to_rgb`: 16-bit and float images scaled, not clipped) and resized to ``image_size``; files
Pillow cannot open or convert are skipped with a warning and counted (``DatasetSplits.skipped_files``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from ...io import first_line
from .splits import DataError, DatasetSplits, ImageSet, hold_out

__all__ = ["IMAGE_SUFFIXES", "class_folders", "to_rgb", "load_folder"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def class_folders(root: Path) -> List[Path]:
    """The class folders of ``root``: its subfolders whose names do not start with a dot, sorted."""
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
    if "train" in split_dirs and not class_folders(split_dirs["train"]):
        split_dirs = {}  # train/ holds no class folders: it is a class of data_dir/<class>/*
    notes = []
    if "train" in split_dirs:
        class_names = [p.name for p in class_folders(split_dirs["train"])]
        for split in ("val", "validation", "test"):
            unknown = [p.name for p in class_folders(split_dirs[split])] if split in split_dirs else []
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
        class_names = [p.name for p in class_folders(root)]
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

