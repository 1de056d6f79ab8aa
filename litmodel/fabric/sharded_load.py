"""Filling a set-up (FSDP-sharded or plain) model from a safetensors file, tensor by tensor, each
rank reading from disk only the rows of its own shards.

Peak memory per rank is its shards plus one tensor's local rows (the read buffer), instead of
the whole model: the file is read with ``readinto`` at the shard's offset, never memory-mapped
whole, so no page of another rank's rows enters this process.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from litmodel.safetensors_io import SAFETENSORS_DTYPES, read_safetensors_header
from litmodel.fabric.wrappers import clean_name
from litmodel.utils import LitModelError


def local_box(t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, offset in the global tensor) of this rank's part of ``t``."""
    if isinstance(t, DTensor):
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return tuple(shape), tuple(offset)
    return tuple(t.shape), (0,) * t.ndim


@torch.no_grad()
def copy_full_into(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full tensor ``full`` into ``dst`` (a DTensor shard or a plain tensor)."""
    shape, offset = local_box(dst)
    local = dst.to_local() if isinstance(dst, DTensor) else dst
    for d, (n, o) in enumerate(zip(shape, offset)):
        full = full.narrow(d, o, n)
    if local.numel():
        local.copy_(full)


def _read_box(f: BinaryIO, info: dict, data_start: int, shape: tuple[int, ...],
              offset: tuple[int, ...]) -> torch.Tensor:
    """The box ``offset : offset + shape`` of a stored tensor; only its rows (dim 0) are read."""
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    full_shape = tuple(info["shape"])
    begin = data_start + info["data_offsets"][0]
    if not full_shape:
        rows, row_start, rest = 1, 0, ()
    else:
        rows, row_start, rest = shape[0], offset[0], full_shape[1:]
    buf = torch.empty((rows, *rest), dtype=dtype)
    row_bytes = math.prod(rest) * dtype.itemsize
    if buf.numel():
        f.seek(begin + row_start * row_bytes)
        view = memoryview(buf.view(torch.uint8).numpy()).cast("B")
        if f.readinto(view) != len(view):
            raise LitModelError(f"{f.name} ended early while reading a tensor; re-download or re-convert it")
    if not full_shape:
        return buf.reshape(())
    for d in range(1, len(full_shape)):
        buf = buf.narrow(d, offset[d], shape[d])
    return buf


@torch.no_grad()
def load_safetensors_sharded(module: nn.Module, path: str | os.PathLike, strict: bool = True) -> list[str]:
    """Copy every tensor of the safetensors file ``path`` into the parameter or buffer of ``module``
    with the same name (wrapper prefixes ignored), cast to its dtype and moved to its device, this
    rank's shard only. Returns the names of the model's state that the file does not hold (a tied
    weight counts as loaded through its other name); ``strict``: a tensor of the file that the model
    lacks, or a shape mismatch, is an error."""
    path = Path(path)
    header, data_start = read_safetensors_header(path)
    targets: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        targets.setdefault(clean_name(name), p)
    for name, b in module.named_buffers(remove_duplicate=False):
        targets.setdefault(clean_name(name), b)
    expected = {clean_name(k) for k in module.state_dict()}
    for name, info in header.items():
        if name not in targets:
            if strict:
                raise LitModelError(f"{path}: tensor {name!r} is not in the model; load a checkpoint of the same model "
                                    "config")
            continue
        if tuple(info["shape"]) != tuple(targets[name].shape):
            raise LitModelError(f"{path}: tensor {name!r} has shape {tuple(info['shape'])} but the model's is "
                                f"{tuple(targets[name].shape)}; the weights do not match the model config")
    loaded: set[int] = set()
    with open(path, "rb") as f:
        for name, info in header.items():
            target = targets.get(name)
            if target is None:
                continue
            shape, offset = local_box(target)
            local = target.to_local() if isinstance(target, DTensor) else target
            if local.numel():
                local.copy_(_read_box(f, info, data_start, shape, offset))
            loaded.add(id(target))
    return [n for n, t in targets.items() if n in expected and id(t) not in loaded]
