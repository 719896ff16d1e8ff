"""The output rule every gpconv command that writes files follows (docs/training.md, "Output files").

* Never delete or overwrite a file gpconv did not write in this run: a command first lists the
  files it will write (:func:`claim_outputs`) and refuses, in one line, when one of them exists,
  unless the user passed ``--overwrite``.
* Every file is written atomically (:func:`atomic_write`): a temporary ``.NAME.XXXXXXXX.tmp`` in the
  same folder, flushed and fsynced, given the user's umask, renamed over ``NAME``, then the folder
  is fsynced so the rename survives a power cut. A failed write (disk full, unwritable folder)
  raises :class:`OutputError` (one line) and leaves the previous ``NAME`` untouched.
* Temporary files left by a killed write are removed the next time a command claims that folder
  (:func:`remove_stale_temporaries`; only names of that exact pattern, for the files it writes).

Tables gpconv prints or writes (``gpconv table``, ``summary`` and ``evaluate``, ``results.md`` of
``gpconv report``, :func:`gpconv.summarize`) are rendered by one function, :func:`render_table`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence

__all__ = ["OutputError", "atomic_write", "atomic_write_text", "existing_outputs", "claim_outputs",
           "remove_stale_temporaries", "check_writable", "check_not_a_file", "folder_lock", "folder_locked", "FolderBusy", "render_table", "first_line"]

_RANDOM = "[a-z0-9_]{8}"  # what tempfile.mkstemp puts between the prefix and the suffix


class OutputError(OSError):
    """A file cannot be written, or writing it would replace a file gpconv did not write (one line)."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open a folder
        return
    try:
        os.fsync(handle)
    except OSError:  # pragma: no cover - some file systems refuse to fsync a folder
        pass
    finally:
        os.close(handle)


def _reason(error: BaseException, folder: Path) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    try:
        if shutil.disk_usage(folder).free < (1 << 20):
            return "no space left on device"
    except OSError:
        pass
    return first_line(error)


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name when it has none): what a one-line error
    quotes of a library's exception."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def atomic_write(path, write: Callable) -> Path:
    """Write ``path`` atomically: ``write(binary file)`` fills a temporary file in the same folder,
    which is fsynced, given mode ``0o666 & ~umask``, renamed over ``path``; then the folder is fsynced.
    :class:`OutputError` (one line, the old ``path`` untouched, no temporary left) when it fails."""
    path = Path(path)
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
        with os.fdopen(handle, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
            os.fchmod(out.fileno(), 0o666 & ~_umask())
        os.replace(temporary, path)
        temporary = None
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        raise OutputError(f"cannot write {path}: {_reason(error, path.parent)}") from None
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
    _fsync_folder(path.parent)
    return path


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` with :func:`atomic_write`."""
    return atomic_write(Path(path), lambda out: out.write(text.encode("utf-8")))


def existing_outputs(folder, names: Iterable[str]) -> List[str]:
    """Those of ``names`` that already exist in ``folder``."""
    folder = Path(folder)
    return [name for name in names if os.path.lexists(folder / name)]


def remove_stale_temporaries(folder, names: Iterable[str]) -> List[Path]:
    """Remove the temporaries :func:`atomic_write` leaves when killed mid-write (``.NAME.XXXXXXXX.tmp``)
    for ``names`` in ``folder``; returns what was removed."""
    folder = Path(folder)
    pattern = re.compile(r"^\.(" + "|".join(re.escape(name) for name in names) + r")\." + _RANDOM + r"\.tmp$")
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        if pattern.match(path.name) and path.is_file() and not path.is_symlink():
            path.unlink()
            removed.append(path)
    return removed


def check_writable(folder) -> Path:
    """Create ``folder`` (and its parents) and check a file can be written there; OutputError otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputError(f"cannot write to {folder}: {_reason(error, folder)}") from None
    return folder


def check_not_a_file(folder, option: str = "--output") -> None:
    """OutputError (one line) when ``folder`` exists and is not a folder."""
    if Path(folder).exists() and not Path(folder).is_dir():
        raise OutputError(f"{option} {folder} is a file, not a folder")


class FolderBusy(OutputError):
    """Another process holds a folder's lock file (:func:`folder_lock` with ``busy``)."""


@contextmanager
def folder_lock(folder, name: str, *, busy: Optional[str] = None) -> Iterator[None]:
    """Hold the lock file ``folder/name`` (an OS lock through ``filelock``, released when the block ends
    or the process dies; created writable by everyone, umask aside, so that other users sharing the
    folder can lock it too). Without ``busy``, wait for another process to release it (the file stays: a
    waiter may hold it open). With ``busy``, raise :class:`FolderBusy` with that one-line message at once
    instead, and remove the file when done: nobody waits on it, and a refused or finished run leaves its
    folder as it found it; the same thread taking it again inside the block is a no-op. ``folder`` must
    exist; a lock file that cannot be opened is an :class:`OutputError` (one line)."""
    from filelock import FileLock, Timeout  # a dependency of torch

    path = Path(folder) / name
    key = (str(path.resolve()), threading.get_ident())
    if busy is not None and key in _HELD:  # this thread holds it already (shrink, then its train): reentrant
        yield
        return
    lock = FileLock(str(path), mode=0o666)
    try:
        lock.acquire(timeout=-1 if busy is None else 0)
    except Timeout:
        raise FolderBusy(busy) from None
    except OSError as error:
        raise OutputError(f"cannot take the lock file {path}: {_reason(error, path.parent)}") from None
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        if busy is not None:
            path.unlink(missing_ok=True)  # still held: whoever opens the name now gets a fresh file, after us
        lock.release()


def folder_locked(folder, name: str) -> bool:
    """Whether another process (or thread) holds the lock file ``folder/name`` now (:func:`folder_lock`)."""
    from filelock import FileLock, Timeout

    path = Path(folder) / name
    if not path.is_file():
        return False
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except (Timeout, OSError):
        return True
    lock.release()
    return False


_HELD: set = set()  # (resolved path, thread) of the busy-mode locks held in this process


def claim_outputs(folder, names: Iterable[str], *, overwrite: bool = False, option: str = "--output") -> Path:
    """Prepare ``folder`` for a command that writes ``names`` there: refuse (OutputError, one line) when
    one of them exists and ``overwrite`` is false; create the folder, check it is writable and remove
    stale temporaries of ``names``."""
    folder, names = Path(folder), list(names)
    check_not_a_file(folder, option)
    found = existing_outputs(folder, names)
    if found and not overwrite:
        raise OutputError(f"{folder} already holds {', '.join(found)}: gpconv does not replace files it did not "
                          f"write in this run; pass --overwrite to replace them or choose another {option}")
    check_writable(folder)
    remove_stale_temporaries(folder, names)
    return folder


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, markdown: bool = False,
                 align: Optional[str] = None, rule: bool = True) -> str:
    """``headers`` and ``rows`` (cells already formatted as strings) as a table.

    ``align``: one letter per column, ``l`` (left) or ``r`` (right); default: the first column left,
    the others right. Plain text (``markdown=False``): columns padded to their widest cell and
    separated by two spaces, trailing spaces removed, a line of dashes under the header when
    ``rule``. Markdown: ``| a | b |`` lines, the alignment row ``|---|---:|`` after the header."""
    headers, rows = [str(cell) for cell in headers], [[str(cell) for cell in row] for row in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers) or set(align) - {"l", "r"} or any(len(row) != len(headers) for row in rows):
        raise ValueError(f"render_table: {len(headers)} headers, alignment {align!r} and rows of "
                         f"{sorted({len(row) for row in rows})} cells do not match")
    if markdown:
        lines = ["| " + " | ".join(line) + " |" for line in [headers] + rows]
        lines.insert(1, "|" + "".join("---|" if a == "l" else "---:|" for a in align))
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in [headers] + rows) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) if a == "l" else cell.rjust(width)
                       for cell, width, a in zip(line, widths, align)).rstrip() for line in [headers] + rows]
    if rule:
        lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)
