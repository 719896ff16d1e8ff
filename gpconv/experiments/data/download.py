"""Download with resume and checksum, and safe all-or-nothing extraction of tar and zip archives."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import List, Optional, Sequence

from .splits import DataError

__all__ = ["download_and_extract", "file_digest"]


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """Hex digest of the file at ``path`` (``algorithm``: any :mod:`hashlib` name)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        actual = file_digest(archive, algorithm) if expected else expected
        if actual != expected:
            raise refuse(f"checksum mismatch for {archive} {origin}: {algorithm} {actual}, expected {expected}")
    try:
        return _extract(archive, data_dir)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, _UnsafeArchive) as error:
        raise refuse(f"cannot unpack {archive}: {error}") from None

