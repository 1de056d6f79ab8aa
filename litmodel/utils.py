"""Small shared helpers: user-facing errors, dtype names, nested-tensor mapping, the allocator tuning."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any, Callable, Mapping

import torch


class LitModelError(Exception):
    """A user-facing error: the message names the problem and the fix, on one line."""


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
