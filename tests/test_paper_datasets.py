"""The papers' named datasets: tiny archives in the real layouts, served from 127.0.0.1."""

import dataclasses
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gpconv.cli import main
from gpconv.experiments.data import DataError, ImageSet, add_flipped_copies, load_dataset
from gpconv.experiments.paper_datasets import PLANTDOC_COMMIT, SOURCES, MappedImages, stratified_split

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20), (20, 230, 230), (230, 20, 230),
           (128, 128, 128), (250, 250, 250)]


def _image_bytes(colour, size=(24, 18), fmt="PNG"):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=fmt)
    return buffer.getvalue()


def _zip(files):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, payload in files.items():
            bundle.writestr(name, payload)
    return buffer.getvalue()


def _tar(files, mode="w"):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def oxford_archives():
    """images.tar.gz (an uncompressed tar, as the real one) and annotations.tar.gz with its lists."""
    breeds = ["Abyssinian", "american_bulldog", "Bengal"]
    images, trainval, test = {}, [], []
    for label, breed in enumerate(breeds):
        for number in range(1, 16):
            images[f"images/{breed}_{number}.jpg"] = _image_bytes(COLOURS[label], fmt="JPEG")
            species = 1 if breed[0].isupper() else 2  # cats' names are capitalised
            line = f"{breed}_{number} {label + 1} {species} {label + 1}"
            (test if number > 10 else trainval).append(line)
    images["images/Abyssinian_100.mat"] = b"not an image"
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n"
    annotations = {"annotations/trainval.txt": "\n".join(trainval).encode() + b"\n",
                   "annotations/test.txt": "\n".join(test).encode() + b"\n",
                   "annotations/list.txt": (header + "\n".join(trainval + test) + "\n").encode(),
                   "annotations/README": b"OXFORD-IIIT PET Dataset\n"}
    return {"images.tar.gz": _tar(images), "annotations.tar.gz": _tar(annotations, "w:gz")}


def malaria_archives():
    files = {}
    for label, name in enumerate(["Parasitized", "Uninfected"]):
        for number in range(20):
            path = f"cell_images/{name}/C{number}P1ThinF_IMG_20150604_1_cell_{number}.png"
            files[path] = _image_bytes(COLOURS[label])
        files[f"cell_images/{name}/Thumbs.db"] = b"\x00" * 16
    return {"cell_images.zip": _zip(files)}


def colorectal_archives():
    classes = ["01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA", "07_ADIPOSE", "08_EMPTY"]
    root = "Kather_texture_2016_image_tiles_5000"
    files = {f"{root}/{name}/1A11_CRC-Prim-HE-07_022.tif_Row_{number}_Col_151.tif":
             _image_bytes(COLOURS[label], size=(15, 15), fmt="TIFF")
             for label, name in enumerate(classes) for number in range(10)}
    return {f"{root}.zip": _zip(files)}


def plantdoc_archives():
    """The GitHub archive of PlantDoc-Object-Detection-Dataset: CSVs of boxes, TRAIN/ and TEST/ photos."""
    root = f"PlantDoc-Object-Detection-Dataset-{PLANTDOC_COMMIT}"
    classes = ["Apple Scab Leaf", "Bell_pepper leaf", "grape leaf black rot"]
    header = "filename,width,height,class,xmin,ymin,xmax,ymax\n"
    files, csvs = {}, {"TRAIN": header, "TEST": header}
    for label, name in enumerate(classes):
        for number in range(6):
            folder = "TEST" if number >= 4 else "TRAIN"
            photo = Image.new("RGB", (60, 40), (0, 0, 0))
            photo.paste(COLOURS[label], (0, 0, 30, 40))  # the left half has the class colour, the right is black
            buffer = io.BytesIO()
            photo.save(buffer, format="JPEG", quality=95)
            filename = f"{name.replace(' ', '%20')}_{number}.jpg"
            files[f"{root}/{folder}/{filename}"] = buffer.getvalue()
            for box in ("2,3,28,37", "4,1,27,39"):  # two boxes per photo, both inside the coloured half
                csvs[folder] += f"{filename},60,40,{name},{box}\n"
    csvs["TEST"] += f"{filename},60,40,{classes[-1]},10,10,10,30\n"  # an empty box: skipped
    files[f"{root}/train_labels.csv"] = csvs["TRAIN"].encode()
    files[f"{root}/test_labels.csv"] = csvs["TEST"].encode()
    files[f"{root}/README.md"] = b"# PlantDoc\n"
    return {f"{root}.zip": _zip(files)}


FIXTURES = {"oxford_pets": oxford_archives, "malaria": malaria_archives, "colorectal_histology": colorectal_archives,
            "cropped_plantdoc": plantdoc_archives}
# (train, val, test, classes) that the papers' rules give for the fixtures above
EXPECTED = {"oxford_pets": (27, 3, 15, 3), "malaria": (32, 4, 4, 2), "colorectal_histology": (64, 8, 8, 8),
            "cropped_plantdoc": (21, 6, 9, 3)}


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files``; honours Range unless ``server.ignore_range``; cuts names in ``server.cut`` once."""

    def do_GET(self):
        name = self.path.lstrip("/")
        self.server.requests.append((name, self.headers.get("Range")))
        payload = self.server.files.get(name)
        if payload is None:
            self.send_error(404)
            return
        start, wanted = 0, self.headers.get("Range")
        if wanted and not self.server.ignore_range:
            start = int(wanted.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        else:
            self.send_response(200)
        body = payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in self.server.cut:
            self.server.cut.discard(name)
            body = body[:len(body) // 2]
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """A loopback server set as GPCONV_DATASET_MIRROR; ``serve(name)`` publishes a dataset's fixture archives
    and registers their checksums, as the published ones are registered for the real archives."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.cut, httpd.ignore_range = {}, [], set(), False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("GPCONV_DATASET_MIRROR", f"http://127.0.0.1:{httpd.server_address[1]}")

    def serve(name, register=True):
        archives = FIXTURES[name]()
        httpd.files.update(archives)
        if register:
            checked = tuple(dataclasses.replace(a, sha256=hashlib.sha256(archives[a.file]).hexdigest())
                            for a in SOURCES[name].archives)
            monkeypatch.setitem(SOURCES, name, dataclasses.replace(SOURCES[name], archives=checked))
        return archives

    httpd.serve = serve
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def _leftovers(folder):
    return [p.name for p in folder.rglob("*") if ".part" in p.name or ".unpack-" in p.name]


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
@pytest.mark.parametrize("name", list(FIXTURES))
def test_each_dataset_downloads_checks_splits_and_is_reused(name, server, tmp_path):
    server.serve(name)
    splits = load_dataset(name, tmp_path, image_size=SIZE, seed=1)
    train, val, test, classes = EXPECTED[name]
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (train, val, test, classes)
    assert splits.image_size == (SIZE, SIZE)
    assert isinstance(splits.train.images, MappedImages) and isinstance(splits.train.images.array, np.memmap)
    # every image has its class colour: the labels follow the files (PlantDoc: the crop is the box)
    for part in (splits.train, splits.val, splits.test):
        pixels = part.images[torch.arange(len(part))].float().mean(dim=(2, 3))
        expected = torch.tensor([COLOURS[int(label)] for label in part.labels], dtype=torch.float32)
        assert (pixels - expected).abs().max() < 12
    assert len(server.requests) == len(SOURCES[name].archives)
    assert _leftovers(tmp_path) == []
    # a second run downloads nothing and gives the same split
    server.files.clear()
    again = load_dataset(name, tmp_path, image_size=SIZE, seed=1)
    assert len(server.requests) == len(SOURCES[name].archives)
    assert torch.equal(again.val.labels, splits.val.labels) and torch.equal(again.test.images[:], splits.test.images[:])


def test_class_names_and_skipped_files(server, tmp_path):
    server.serve("oxford_pets")
    server.serve("cropped_plantdoc")
    pets = load_dataset("oxford_pets", tmp_path / "pets", image_size=SIZE)
    assert pets.class_names == ["Abyssinian", "american_bulldog", "Bengal"]
    assert "official test list" in pets.notes[0]
    with pytest.warns(UserWarning, match="empty box"):
        plants = load_dataset("cropped_plantdoc", tmp_path / "plants", image_size=SIZE)
    assert plants.class_names == ["Apple Scab Leaf", "Bell_pepper leaf", "grape leaf black rot"]
    assert plants.skipped_files == 1


def test_split_is_seeded_stratified_and_keeps_the_official_test_list():
    labels = np.repeat(np.arange(3), [13779, 625, 7])
    train, val, test = stratified_split(labels, 0, 0.1, 0.1)
    assert len(np.intersect1d(train, val)) == len(np.intersect1d(train, test)) == len(np.intersect1d(val, test)) == 0
    assert len(train) + len(val) + len(test) == len(labels)
    assert np.bincount(labels[val]).tolist() == np.bincount(labels[test]).tolist() == [1378, 63, 1]
    again, other = stratified_split(labels, 0, 0.1, 0.1), stratified_split(labels, 1, 0.1, 0.1)
    assert np.array_equal(again[1], val) and not np.array_equal(other[1], val)
    official = np.arange(len(labels)) % 5 == 0
    train, val, test = stratified_split(labels, 0, 0.1, 0.0, official)
    assert np.array_equal(test, np.flatnonzero(official)) and not official[val].any() and not official[train].any()


def test_mapped_images_index_and_flip_like_tensors(tmp_path):
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    path = tmp_path / "images.u8"
    path.write_bytes(images.numpy().tobytes())
    array = np.memmap(path, dtype=np.uint8, mode="r", shape=(6, 3, 4, 4))
    rows = np.array([4, 1, 5])
    mapped = MappedImages(array, rows)
    assert mapped.shape == (3, 3, 4, 4) and torch.equal(mapped[torch.tensor([2, 0])], images[[5, 4]])
    assert torch.equal(mapped[1:], images[[1, 5]]) and torch.equal(mapped[0], images[4])
    flipped = add_flipped_copies(ImageSet(images[rows], torch.zeros(3, dtype=torch.int64))).images
    assert torch.equal(mapped.with_flipped_copies()[torch.arange(12)], flipped)


def test_val_flips_quadruple_the_mapped_validation_set(server, tmp_path):
    server.serve("colorectal_histology")
    plain = load_dataset("colorectal_histology", tmp_path, image_size=SIZE)
    flipped = load_dataset("colorectal_histology", tmp_path, image_size=SIZE, val_flips=True)
    assert len(flipped.val) == 4 * len(plain.val) and torch.equal(flipped.val.labels, plain.val.labels.repeat(4))
    n = len(plain.val)
    assert torch.equal(flipped.val.images[n:2 * n], plain.val.images[:].flip(-1))


def test_a_wrong_checksum_is_refused_and_nothing_is_unpacked(server, tmp_path):
    server.serve("malaria", register=False)  # the published checksum, which the fixture does not have
    with pytest.raises(DataError, match="checksum mismatch") as caught:
        load_dataset("malaria", tmp_path, image_size=SIZE)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_archive_put_there_by_hand_is_checked_but_never_removed(tmp_path):
    archives = malaria_archives()
    (tmp_path / "cell_images.zip").write_bytes(archives["cell_images.zip"])  # not the published checksum
    with pytest.raises(DataError, match="checksum mismatch .*put there, not downloaded.*remove or replace it"):
        load_dataset("malaria", tmp_path, image_size=SIZE, download=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell_images.zip"]


def test_an_archive_that_cannot_be_unpacked_is_removed(server, tmp_path, monkeypatch):
    server.serve("cropped_plantdoc")  # GitHub publishes no checksum for its archives: the zip's own CRCs apply
    name = SOURCES["cropped_plantdoc"].archives[0].file
    payload = bytearray(server.files[name])
    payload[len(payload) // 3:len(payload) // 3 + 64] = bytes(64)
    server.files[name] = bytes(payload)
    unchecked = dataclasses.replace(SOURCES["cropped_plantdoc"].archives[0], sha256=None)
    monkeypatch.setitem(SOURCES, "cropped_plantdoc", dataclasses.replace(SOURCES["cropped_plantdoc"],
                                                                        archives=(unchecked,)))
    with pytest.raises(DataError, match="cannot unpack") as caught:
        load_dataset("cropped_plantdoc", tmp_path, image_size=SIZE)
    assert "\n" not in str(caught.value) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ignore_range", [False, True])
def test_an_interrupted_download_resumes_or_restarts(server, tmp_path, ignore_range):
    archives = server.serve("malaria")
    server.cut.add("cell_images.zip")
    server.ignore_range = ignore_range
    with pytest.raises(DataError, match="interrupted.*next run resumes"):
        load_dataset("malaria", tmp_path, image_size=SIZE)
    partial = tmp_path / "cell_images.zip.part"
    assert 0 < partial.stat().st_size < len(archives["cell_images.zip"])
    assert not (tmp_path / "cell_images").exists()
    splits = load_dataset("malaria", tmp_path, image_size=SIZE)
    assert len(splits.train) == EXPECTED["malaria"][0] and not partial.exists()
    assert server.requests[-1][1] == f"bytes={len(archives['cell_images.zip']) // 2}-"


def test_unsafe_member_names_are_refused(server, tmp_path, monkeypatch):
    name = SOURCES["malaria"].archives[0].file
    server.files[name] = _zip({"cell_images/Parasitized/a.png": _image_bytes(COLOURS[0]), "../escaped.txt": b"x"})
    checked = dataclasses.replace(SOURCES["malaria"].archives[0], sha256=hashlib.sha256(server.files[name]).hexdigest())
    monkeypatch.setitem(SOURCES, "malaria", dataclasses.replace(SOURCES["malaria"], archives=(checked,)))
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="unsafe path"):
        load_dataset("malaria", tmp_path / "data", image_size=SIZE)
    assert not (tmp_path / "escaped.txt").exists() and list((tmp_path / "data").iterdir()) == []


def _gpconv(*argv, env):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "gpconv.cli", *argv], capture_output=True, text=True, cwd=ROOT,
                          env=environment, timeout=300)


def test_cli_offline_says_where_to_get_the_data_then_trains_on_the_unpacked_copy(server, tmp_path):
    dead = {"GPCONV_DATASET_MIRROR": "http://127.0.0.1:9"}  # port 9: refused
    argv = ["train", "--arch", "efficientnet_b0", "--image-size", str(SIZE), "--dataset", "malaria", "--data-dir",
            str(tmp_path / "malaria"), "--batch-size", "8", "--max-train-batches", "2", "--threads", "1",
            "--epochs", "1", "--val-flips"]
    result = _gpconv(*argv, "--output", str(tmp_path / "run0"), env=dead)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert SOURCES["malaria"].archives[0].url in result.stderr
    assert str(tmp_path / "malaria" / "cell_images.zip") in result.stderr
    server.serve("malaria")
    load_dataset("malaria", tmp_path / "malaria", image_size=SIZE)
    server.files.clear()  # in-process from here (faster): the unpacked copy and its cache are all there is
    assert main([*argv, "--output", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test_images"] == EXPECTED["malaria"][2]
