"""Datasets, download with checksum, folder datasets, splits and augmentation."""

import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch

from gpconv.experiments.data import (DataError, KerasAugment, add_flipped_copies, load_cifar, load_dataset, make_synthetic,
                         to_float)
from conftest import SHARED

CIFAR_SUBSET = SHARED / "data" / "cifar10-subset"


def _cifar10_archive(images_per_batch=4) -> bytes:
    """A tiny archive in the official cifar-10-python.tar.gz layout."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            entry = {"data": rng.integers(0, 256, (images_per_batch, 3072), dtype=np.uint8),
                     "labels": [int(v) for v in rng.integers(0, 10, images_per_batch)]}
            payload = pickle.dumps(entry)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        meta = pickle.dumps({"label_names": [f"c{i}" for i in range(10)]})
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    return buffer.getvalue()


@pytest.fixture
def archive_server(tmp_path):
    """Serve a tiny CIFAR-10 archive from 127.0.0.1; yields (url, md5)."""
    served = tmp_path / "served"
    served.mkdir()
    payload = _cifar10_archive()
    (served / "cifar-10-python.tar.gz").write_bytes(payload)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz", hashlib.md5(payload).hexdigest()
    finally:
        server.shutdown()
        server.server_close()


def test_cifar10_download_checks_the_checksum_and_extracts(tmp_path, archive_server):
    url, md5 = archive_server
    train, test, names = load_cifar("cifar10", tmp_path / "data", url=url, md5=md5)
    assert (len(train), len(test)) == (20, 4) and names == [f"c{i}" for i in range(10)]
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    assert (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").is_file()


def test_cifar10_download_with_a_wrong_checksum_fails_and_removes_the_file(tmp_path, archive_server):
    url, _ = archive_server
    with pytest.raises(DataError, match="checksum mismatch"):
        load_cifar("cifar10", tmp_path / "data", url=url, md5="0" * 32)
    assert not (tmp_path / "data" / "cifar-10-python.tar.gz").exists()
    assert not (tmp_path / "data" / "cifar-10-batches-py").exists()


def test_cifar10_offline_says_where_the_files_must_be(tmp_path, monkeypatch):
    monkeypatch.setenv("GPCONV_CIFAR10_URL", "http://127.0.0.1:9/nothing.tar.gz")  # port 9: refused
    with pytest.raises(DataError) as caught:
        load_cifar("cifar10", tmp_path / "absent")
    message = str(caught.value)
    assert "cifar-10-batches-py" in message and str(tmp_path / "absent") in message and "\n" not in message


def _write_image(path, colour, size=(20, 12)):
    from PIL import Image

    Image.new("RGB", size, colour).save(path)


def test_folder_dataset_skips_corrupt_images_and_splits_seeded(tmp_path):
    for name, colour in (("cats", (250, 0, 0)), ("dogs", (0, 0, 250))):
        (tmp_path / name).mkdir()
        for i in range(10):
            _write_image(tmp_path / name / f"{i}.png", colour)
    (tmp_path / "cats" / "broken.png").write_bytes(b"not a png at all")
    with pytest.warns(UserWarning, match="broken.png"):
        splits = load_dataset("folder", tmp_path, image_size=8, seed=3)
    assert splits.skipped_files == 1 and splits.class_names == ["cats", "dogs"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 2, 2)
    assert splits.train.images.shape[1:] == (3, 8, 8)
    red = splits.train.images[splits.train.labels == 0]
    assert red[:, 0].float().mean() > 200 and red[:, 2].float().mean() < 50
    with pytest.warns(UserWarning):
        again = load_dataset("folder", tmp_path, image_size=8, seed=3)
    assert torch.equal(again.test.images, splits.test.images)


def test_folder_dataset_with_train_and_test_folders(tmp_path):
    for split, count in (("train", 10), ("test", 3)):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                _write_image(tmp_path / split / name / f"{i}.jpg", (i * 20, 100, 0))
    splits = load_dataset("folder", tmp_path, image_size=16, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 2, 6)


def test_missing_folder_and_unknown_dataset_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("folder", tmp_path / "nope")
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", tmp_path)


def test_synthetic_is_seeded_balanced_and_class_dependent():
    first, second = make_synthetic(200, seed=5), make_synthetic(200, seed=5)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert torch.bincount(first.labels).tolist() == [20] * 10
    # the hue carries the label: the mean colour of the brightest pixels differs between classes
    means = torch.stack([to_float(first.images[first.labels == c]).mean(dim=(0, 2, 3)) for c in range(10)])
    assert torch.cdist(means, means).add(torch.eye(10)).min() > 0.01


def test_validation_flips_make_four_copies():
    data = make_synthetic(10, seed=0)
    flipped = add_flipped_copies(data)
    assert len(flipped) == 40 and torch.equal(flipped.images[10:20], data.images.flip(-1))
    assert torch.equal(flipped.images[20:30], data.images.flip(-2)) and torch.equal(flipped.labels[30:], data.labels)
    splits = load_dataset("synthetic", val_flips=True)
    assert len(splits.val) == 4 * 200


def test_augmentation_identity_flip_and_determinism():
    images = to_float(make_synthetic(6, seed=1).images)
    identity = KerasAugment(rotation_degrees=0, shift=0, shear_degrees=0, zoom=0, horizontal_flip=False)
    assert torch.allclose(identity(images, torch.Generator()), images, atol=1e-6)
    flip_only = KerasAugment(rotation_degrees=0, shift=0, shear_degrees=0, zoom=0, horizontal_flip=True)
    out = flip_only(images, torch.Generator().manual_seed(0))
    for original, result in zip(images, out):
        assert torch.allclose(result, original, atol=1e-6) or torch.allclose(result, original.flip(-1), atol=1e-6)
    augment = KerasAugment()
    a, b = augment(images, torch.Generator().manual_seed(4)), augment(images, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, images)
    assert a.min() >= 0 and a.max() <= 1  # nearest fill: no black borders outside the value range


def test_shift_moves_content_with_nearest_fill():
    image = torch.zeros(1, 1, 8, 8)
    image[..., 3] = 1.0  # a vertical line at column 3
    shifted = KerasAugment(rotation_degrees=0, shift=0.25, shear_degrees=0, zoom=0, horizontal_flip=False,
                           interpolation="nearest")
    out = shifted(image, torch.Generator().manual_seed(0))
    column = int(out[0, 0, 4].argmax())
    assert column != 3 and out.sum() == 8  # moved by whole pixels, still one line of 8 ones


@pytest.mark.skipif(not (CIFAR_SUBSET / "cifar-10-batches-py").is_dir(), reason="CIFAR-10 subset not present")
def test_real_cifar10_subset_loads_with_a_seeded_validation_split():
    splits = load_dataset("cifar10", CIFAR_SUBSET, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4577, 508, 1017)
    assert splits.class_names[0] == "airplane" and splits.num_classes == 10


# ------------------------------------------------------------------------------------------ issue 22: image modes


def _save(path, array, mode=None):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(path)


@pytest.mark.parametrize("dtype,values,suffix,expected", [
    (np.uint16, (1000, 30000), ".png", (4, 117)),  # I;16 PNG: divided by 257, not clipped to 255
    (np.uint16, (0, 65535), ".tif", (0, 255)),
    (np.int32, (1000, 65535), ".tif", (4, 255)),  # mode I within 16 bits
    (np.float32, (0.25, 1.0), ".tif", (64, 255)),  # mode F in [0, 1]
    (np.uint8, (10, 200), ".png", (10, 200)),  # mode L: unchanged
], ids=["I;16-png", "I;16-tif", "I", "F", "L"])
def test_folder_images_of_any_depth_keep_their_values(dtype, values, suffix, expected, tmp_path):
    import warnings

    for name, value in zip(("dark", "bright"), values):
        for index in range(10):
            _save(tmp_path / name / f"{index}{suffix}", np.full((6, 6), value, dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped
        splits = load_dataset("folder", tmp_path, image_size=6)
    images = torch.cat([splits.train.images, splits.val.images, splits.test.images])
    labels = torch.cat([splits.train.labels, splits.val.labels, splits.test.labels])
    for label, value in zip((splits.class_names.index("dark"), splits.class_names.index("bright")), expected):
        assert set(images[labels == label].unique().tolist()) == {value}
    assert splits.skipped_files == 0


def test_images_pillow_cannot_open_or_scale_are_skipped_and_counted(tmp_path):
    from PIL import Image

    for name in ("a", "b"):
        for index in range(10):
            _save(tmp_path / name / f"{index}.png", np.full((6, 6, 3), 50 * (name == "b"), np.uint8))
    (tmp_path / "a" / "garbage.png").write_bytes(b"not an image")
    good = (tmp_path / "a" / "0.png").read_bytes()
    (tmp_path / "a" / "truncated.png").write_bytes(good[:len(good) // 2])
    _save(tmp_path / "a" / "negative.tif", np.full((6, 6), -3, np.int32))  # mode I: scale unknown
    _save(tmp_path / "b" / "large.tif", np.full((6, 6), 7.5, np.float32))  # mode F outside [0, 1]
    (tmp_path / "b" / "empty.jpg").write_bytes(b"")
    Image.new("LAB", (6, 6), (0, 128, 128)).save(tmp_path / "b" / "lab.tif")  # CIELAB black: read, as black
    with pytest.warns(UserWarning, match="skipping unreadable image") as caught:
        splits = load_dataset("folder", tmp_path, image_size=6)
    assert splits.skipped_files == 5 == len([w for w in caught if "skipping" in str(w.message)])
    assert len(splits.train) + len(splits.val) + len(splits.test) == 21
    everything = torch.cat([splits.train.images, splits.val.images, splits.test.images])
    assert int(everything.max()) == 50 and int((everything.flatten(1).amax(1) <= 1).sum()) == 11


def test_a_class_named_train_is_a_class(tmp_path):
    for name in ("train", "cars", "bikes"):
        for index in range(10):
            _save(tmp_path / name / f"{index}.png", np.full((4, 4, 3), 20 * index, np.uint8))
    splits = load_dataset("folder", tmp_path, image_size=4)
    assert splits.class_names == ["bikes", "cars", "train"]


def test_a_test_split_with_a_class_train_lacks_is_refused(tmp_path):
    for split, names in (("train", ("a", "b")), ("test", ("a", "c"))):
        for name in names:
            for index in range(10):
                _save(tmp_path / split / name / f"{index}.png", np.full((4, 4, 3), index, np.uint8))
    with pytest.raises(DataError, match=r"test/c is a class that .*train does not have"):
        load_dataset("folder", tmp_path, image_size=4)


def _png16(path, array):
    """A 16-bit PNG (RGB, or grey + alpha) written by hand: Pillow cannot write these."""
    import struct
    import zlib

    height, width, channels = array.shape
    raw = b"".join(b"\x00" + array[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)

    header = struct.pack(">IIBBBBB", width, height, 16, {3: 2, 2: 4}[channels], 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [3, 2], ids=["RGB-48-bit", "grey-alpha-32-bit"])
def test_16_bit_colour_pngs_keep_their_values(channels, tmp_path):
    for name, value in (("dark", 1000), ("bright", 30000)):
        for index in range(10):
            pixels = np.full((4, 4, channels), value, np.uint16)
            pixels[..., -1] = 65535 if channels == 2 else value  # opaque alpha
            _png16(tmp_path / name / f"{index}.png", pixels)
    splits = load_dataset("folder", tmp_path, image_size=4)
    images = torch.cat([splits.train.images, splits.val.images, splits.test.images]).float()
    labels = torch.cat([splits.train.labels, splits.val.labels, splits.test.labels])
    for name, value in (("dark", 1000), ("bright", 30000)):
        chosen = images[labels == splits.class_names.index(name)]
        assert (chosen - value / 257).abs().max() <= 1  # Pillow keeps the high byte: within one level
