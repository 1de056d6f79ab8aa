"""Small shared helpers: user-facing errors, atomic writes, dtype names, nested-tensor mapping, allocator tuning."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch


class LitModelError(Exception):
    """A user-facing error: the message names the problem and the fix, on one line."""


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
        fsync_tree(tmp)  # the bytes reach the disk before the name does
        os.replace(tmp, path)
        fsync_tree(path.parent, recursive=False)  # and the rename itself
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; it replaces ``path`` only if the block succeeds.

    With an existing ``path`` the old directory is moved aside first and removed after the swap,
    so at every moment either the old or the new complete directory exists under a known name.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise LitModelError(f"{path} already exists; choose another output directory or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            fsync_tree(path.parent, recursive=False)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
            fsync_tree(path.parent, recursive=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def num_parameters(module: torch.nn.Module, requires_grad: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if requires_grad is None or p.requires_grad == requires_grad)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise LitModelError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def tune_allocator() -> bool:
    """Keep glibc malloc from unmapping and re-mapping large buffers at every training step.

    glibc serves allocations above its mmap threshold with fresh mmaps and returns them on free,
    so each step page-faults its activations in again (a quarter of CPU time in the kernel). With
    M_MMAP_MAX=0 every buffer comes from the heap and M_TRIM_THRESHOLD keeps freed memory for
    reuse. Call it before the first large allocation. Returns False where it does not apply
    (not glibc, or LITMODEL_NO_TUNE_ALLOCATOR=1, or another allocator was preloaded).
    """
    if os.environ.get("LITMODEL_NO_TUNE_ALLOCATOR") == "1" or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    ok = mallopt(M_MMAP_MAX, 0) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    ok &= mallopt(M_TOP_PAD, 64 * 2**20) == 1
    if ok:
        os.environ["LITMODEL_ALLOCATOR_TUNED"] = "1"  # spawned workers (litmodel.fabric) do the same
    return bool(ok)


def apply_to_tensors(data: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``data`` with ``fn`` applied to every tensor in it (nested lists, tuples, named tuples and mappings)."""
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(apply_to_tensors(d, fn) for d in data))
    if isinstance(data, (list, tuple)):
        return type(data)(apply_to_tensors(d, fn) for d in data)
    if isinstance(data, Mapping):
        return type(data)((k, apply_to_tensors(v, fn)) for k, v in data.items())
    return data
