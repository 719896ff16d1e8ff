"""Where the papers' datasets come from, what each archive holds, and their download.

``oxford_pets``, ``malaria``, ``colorectal_histology`` and ``cropped_plantdoc`` (Mendel 2022
Tables 3-4, Entropy 2022 Tables 7-8; docs/datasets.md): the official archives with their published
SHA-256 (:data:`SOURCES`), the split fractions of the papers, and one listing function per dataset
that turns the unpacked files into :class:`Entry` rows (:func:`list_entries`).
``GPCONV_DATASET_MIRROR`` (a base URL) replaces the official hosts; the checksums still apply.
"""

from __future__ import annotations

import csv
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from .. import PAPER_DATASETS
from .download import download_and_extract
from .folders import IMAGE_SUFFIXES, class_folders
from .splits import DataError

__all__ = ["PLANTDOC_COMMIT", "Archive", "PaperSource", "SOURCES", "Entry", "list_entries", "ensure_unpacked"]

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
    classes = [folder.name for folder in class_folders(root)]
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


def list_entries(name: str, data_dir: Path) -> Tuple[List[Entry], List[str]]:
    """The images of ``name`` unpacked in ``data_dir`` (:class:`Entry` rows) and its class names."""
    return _LISTINGS[name](data_dir)

# ----------------------------------------------------------------------------------------------
# download


def ensure_unpacked(name: str, data_dir: Path, download: bool) -> None:
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

