"""Atomic publishing of outputs: write under a temporary name, flush it to disk, rename it into place.

Every writer of a file or a directory goes through here, so a crash (or an error) at any moment
leaves the last complete output under its name, never a half-written one:

    with atomic_file(path) as tmp: ...          # one file
    with atomic_dir(path) as tmp: ...           # a whole directory, replacing any old one
    with staging_dir(out_dir) as tmp:           # files added to a directory that holds others
        ...                                     # (a Hugging Face dir converted in place)
        publish(tmp, out_dir, last=("config.json",))
    swap_into_place(tmp, path)                  # just the rename step, for a temp built elsewhere

The temp is flushed (``fsync``) before the rename and the parent directory after it: without that
a power loss can leave a complete-looking name holding empty files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from litmodel.utils import LitModelError


def fsync_tree(path: str | os.PathLike, recursive: bool = True) -> None:
    """Flush ``path`` to disk: a file, or a directory's entries (and, ``recursive``, every file and
    directory below it). Call it before the rename that publishes a checkpoint, and on the parent
    after it: without it a power loss can leave a complete-looking name holding empty files."""
    path = Path(path)
    if not path.is_dir():
        _fsync(path)
        return
    if recursive:
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files:
                _fsync(Path(root) / name)
            _fsync(Path(root))
    else:
        _fsync(path)


def _fsync(path: Path) -> None:
    if os.name == "nt" and path.is_dir():  # Windows cannot open a directory to flush it
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_into_place(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename ``tmp`` onto ``path`` (file or directory), flushing ``tmp`` first and the parent after.

    A file over a file is one atomic rename. A directory (or a file over a directory) cannot be
    renamed over the old one, so the old one is moved aside first and removed after the swap: at
    every moment the old or the new complete output exists.
    """
    tmp, path = Path(tmp), Path(path)
    fsync_tree(tmp)  # the bytes reach the disk before the name does
    if (path.exists() or path.is_symlink()) and (tmp.is_dir() or (path.is_dir() and not path.is_symlink())):
        old = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.old"
        os.replace(path, old)
        os.replace(tmp, path)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, path)
    fsync_tree(path.parent, recursive=False)  # and the rename itself


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash (or an exception) inside the block leaves any previous ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        swap_into_place(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it replaces ``path`` only if the block succeeds.

    With an existing ``path`` the old directory is moved aside first and removed after the swap
    (``swap_into_place``), so at every moment the old or the new complete directory exists.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise LitModelError(f"{path} already exists; choose another output directory or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        swap_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- adding files to a directory that may hold others (conversion in place, Hub downloads)
@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A temp dir where the outputs are written: inside ``out_dir`` when it exists, else beside it.

    Parent dirs created here are removed again if the block fails, so a failed run leaves nothing.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LitModelError(f"output dir {out_dir} is a file; pass a directory as --out_dir")
    created: list[Path] = []
    base = out_dir if out_dir.is_dir() else out_dir.parent
    try:
        for p in reversed([base, *base.parents]):
            if not p.exists():
                p.mkdir()
                created.append(p)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=base))
    except OSError as err:
        _remove_dirs(created)
        raise LitModelError(f"cannot create the output under {base} ({err.strerror or err}); "
                            "choose another --out_dir") from None
    try:
        yield tmp
    except OSError as err:  # disk full, permissions, ...: say so on one line, leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(created)
        raise LitModelError(f"writing {out_dir} failed ({err.strerror or err}"
                            f"{': ' + str(err.filename) if getattr(err, 'filename', None) else ''}); "
                            "free disk space or choose another --out_dir") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_dirs(created)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def _remove_dirs(created: list[Path]) -> None:
    for p in reversed(created):
        with contextlib.suppress(OSError):
            p.rmdir()


def publish(tmp: Path, out_dir: Path, last: tuple[str, ...] = (), remove: Iterable[str] = ()) -> None:
    """Move the complete outputs from ``tmp`` into ``out_dir`` (one rename if it does not exist yet).

    Into an existing dir each file is renamed separately, the files named in ``last`` at the end
    (their presence marks a complete dir); stale files named in ``remove`` are deleted before them.
    """
    if not out_dir.exists():
        swap_into_place(tmp, out_dir)
        return
    fsync_tree(tmp)  # contents on disk before any name is published
    names = sorted(p.name for p in tmp.iterdir())
    for name in names:
        if name not in last:
            os.replace(tmp / name, out_dir / name)
    for stale in remove:
        if stale not in names:
            (out_dir / stale).unlink(missing_ok=True)
    for name in last:
        if name in names:
            os.replace(tmp / name, out_dir / name)
    fsync_tree(out_dir, recursive=False)
