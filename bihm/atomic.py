"""Atomic file writes: nothing is lost or half-written, and files are shared as usual.

Every output of bihm (configs, metrics, pictures, checkpoints, shards, JSON) is written to a
temporary name in the destination folder, flushed and fsynced, given the permissions a new
file gets under the process umask (mkstemp's 0600 would hide results from teammates on a
shared cluster), and renamed over the destination; the folder is fsynced so the rename
survives a crash. A reader sees the old file or the new one, never a part.

`check_writable` is the matching start-up check: a command calls it on each of its output
paths before any work, so a typo or a read-only folder stops it at once rather than after
an hour of sampling.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from bihm.errors import UserError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (reading it means setting it, so briefly, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make the finished temporary file `tmp` the file `path`: fsync it, give it mode
    0666 & ~umask, rename it over `path` (same folder) and fsync the folder."""
    tmp, path = Path(tmp), Path(path)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, the file written there
    becomes `path` (see `commit`). On an error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


PROBE_PREFIX = ".bihm-probe."


def probe_folder(folder: str | os.PathLike) -> None:
    """Create `folder` (with its parents, as a writer would) and write and remove a small
    file in it; raises the OSError of the first step that fails.

    A real write rather than `os.access`: root passes every permission check, and a
    read-only mount, a full disk or a quota shows itself only when a file is written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=PROBE_PREFIX, suffix=".tmp")
    try:
        os.write(fd, b"bihm")
    finally:
        os.close(fd)
        os.unlink(name)


def check_writable(
    path: str | os.PathLike, what: str, *, folder: bool = False, source: str = ""
) -> Path:
    """Raise a one-line UserError naming `what` (the flag or config key) and `path` unless
    bihm can write the file `path` (folder=False: a probe file in its folder, which is
    created if missing, as the writer would) or files into the folder `path`
    (folder=True). `source` says where the path came from, if not from `what` itself
    (e.g. "--run-dir, or run_dir in the config"). Returns `path`."""
    path = Path(path)
    name = f"{what} {path}" + (f" ({source})" if source else "")
    if not folder and path.is_dir():
        raise UserError(f"{name}: is a folder; give a file name")
    target = path if folder else path.parent
    blocker = next((p for p in (target, *target.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"{name}: cannot write there ({blocker} is a file, not a folder)")
    try:
        probe_folder(target)
    except OSError as err:
        why = err.strerror or type(err).__name__
        if err.filename is not None and PROBE_PREFIX not in str(err.filename):
            why += f": {err.filename}"  # e.g. the folder that could not be created
        raise UserError(f"{name}: cannot write there ({why})") from err
    return path
