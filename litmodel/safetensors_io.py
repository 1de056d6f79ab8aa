"""The safetensors format: read a header, memory-map a file, save tensors, stream-write a planned file.

    read_safetensors_header(path) -> (header, data_start)   # checks the file is complete
    mmap_safetensors(path) -> {name: tensor}                 # copy-on-write views, nothing copied
    save_safetensors(tensors, path)                          # atomic (temp file, then rename)
    TensorSource.from_safetensors_files(files, description)  # lazy, name-addressed reads with pread
    write_safetensors_stream(path, steps, chunks)            # header from the planned steps, then bytes

``TensorSource`` also reads ``pytorch_model*.bin`` files (``torch.load(mmap=True, weights_only=True)``),
the fallback of Hugging Face repos without safetensors. The streaming writer appends each output
tensor's bytes in order: a tensor, or a byte range of a source file copied in the kernel
(``os.copy_file_range``), so only one output tensor is ever in memory.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Union

import torch
from safetensors.torch import save_file

from litmodel.atomic import atomic_file
from litmodel.utils import LitModelError

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def read_safetensors_header(path: str | Path) -> tuple[dict, int]:
    """(header without `__metadata__`, offset where the tensor data starts); checks the file is complete."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise LitModelError(f"{path} is not a valid safetensors file ({err}); re-download or re-convert it") from err
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise LitModelError(f"{path} is truncated ({size} bytes, its header needs {8 + n + end}); "
                            "re-download or re-convert it")
    return header, 8 + n


def mmap_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file as copy-on-write views of a memory map (no copy made)."""
    header, start = read_safetensors_header(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors = {}
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise LitModelError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        count = (end - begin) // dtype.itemsize
        t = torch.frombuffer(mm, dtype=dtype, count=count, offset=start + begin) if count else torch.empty(0, dtype=dtype)
        tensors[name] = t.view(info["shape"])
    return tensors


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Write tensors atomically (temp file, then rename)."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"})


# ---- reading tensors lazily
@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0  # absolute byte offset in a safetensors file
    nbytes: int = 0


def _nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


class TensorSource:
    """Lazy, name-addressed access to the tensors of one or more weight files.

    safetensors: only headers are read up front; ``read(name)`` preads the tensor's bytes into a
    fresh buffer. ``pytorch_model*.bin``: loaded with ``torch.load(mmap=True, weights_only=True)``,
    one shard at a time (the previous shard's mapping is dropped when another is needed).
    """

    def __init__(self, infos: dict[str, TensorInfo], kind: str, description: str) -> None:
        self.infos, self.kind, self.description = infos, kind, description
        self._fds: dict[Path, int] = {}
        self._bin: tuple[Path, dict] | None = None

    # ---- construction
    @classmethod
    def from_safetensors_files(cls, files: list[Path], description: str) -> "TensorSource":
        infos: dict[str, TensorInfo] = {}
        for file in files:
            header, start = read_safetensors_header(file)
            for name, info in header.items():
                try:
                    dtype = SAFETENSORS_DTYPES[info["dtype"]]
                    shape = tuple(int(s) for s in info["shape"])
                    begin, end = (int(x) for x in info["data_offsets"])
                except (KeyError, TypeError, ValueError) as err:
                    raise LitModelError(f"{file} is corrupt (bad header entry for {name!r}: {err!r}); "
                                        "re-download or re-convert it") from None
                if end - begin != _nbytes(shape, dtype) or begin < 0:
                    raise LitModelError(f"{file} is corrupt (tensor {name!r} claims {end - begin} bytes for shape "
                                        f"{shape} {info['dtype']}); re-download or re-convert it")
                infos[name] = TensorInfo(file, shape, dtype, start + begin, end - begin)
        return cls(infos, "safetensors", description)

    @classmethod
    def from_bin_files(cls, files: list[Path], description: str) -> "TensorSource":
        infos: dict[str, TensorInfo] = {}
        for file in files:
            for name, t in _torch_load(file).items():
                if isinstance(t, torch.Tensor):
                    infos[name] = TensorInfo(file, tuple(t.shape), t.dtype, 0, t.numel() * t.element_size())
        return cls(infos, "bin", description)

    # ---- access
    def names(self) -> list[str]:
        return list(self.infos)

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name``; safetensors data is read into ``buffer`` (uint8, large enough) if given."""
        info = self.infos[name]
        if self.kind == "bin":
            if self._bin is None or self._bin[0] != info.file:
                self._bin = None  # drop the previous shard's mapping first
                self._bin = (info.file, _torch_load(info.file))
            return self._bin[1][name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        fd = self.fd(info.file)
        buf = torch.empty(info.nbytes, dtype=torch.uint8) if buffer is None else buffer[: info.nbytes]
        view = memoryview(buf.numpy())
        done = 0
        while done < info.nbytes:
            n = os.preadv(fd, [view[done:]], info.offset + done)
            if n <= 0:
                raise LitModelError(f"{info.file} is truncated (tensor {name!r}); re-download or re-convert it")
            done += n
        return buf.view(info.dtype).view(info.shape)

    def fd(self, file: Path) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bin = None


def _torch_load(file: Path) -> dict:
    try:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # legacy (non-zip) format cannot be memory-mapped
                raise
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except LitModelError:
        raise
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LitModelError(f"{file} is not a readable PyTorch checkpoint ({msg}); re-download it") from None
    if not isinstance(sd, dict):
        raise LitModelError(f"{file} does not hold a state dict; re-download it")
    return sd.get("state_dict", sd) if "state_dict" in sd and isinstance(sd["state_dict"], dict) else sd


# ---- streaming writer
@dataclass
class Step:
    """One planned output tensor: ``name``, ``shape`` and ``dtype`` go into the header; its bytes are
    ``fn`` applied to the source tensors ``sources`` (a conversion plan's rule, see ``litmodel.hf``)."""

    name: str
    sources: list[str]
    fn: Callable[..., torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shape, self.dtype)


def safetensors_header(steps: list[Step], metadata: dict | None = None) -> bytes:
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for s in steps:
        header[s.name] = {"dtype": _DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob


# A chunk of output bytes: a tensor, or a byte range (fd, offset, nbytes) of a source file that is
# copied as is (os.copy_file_range: in the kernel, never through this process's memory).
Chunk = Union[torch.Tensor, tuple[int, int, int]]


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        n = os.write(fd, view)
        view = view[n:]


def _copy_range(src_fd: int, dst_fd: int, offset: int, nbytes: int) -> None:
    """Append ``nbytes`` of ``src_fd`` from ``offset`` to ``dst_fd`` (in-kernel copy when possible)."""
    end = offset + nbytes
    try:
        while offset < end:
            n = os.copy_file_range(src_fd, dst_fd, end - offset, offset)
            if n == 0:
                raise LitModelError(f"source file is truncated at byte {offset}; re-download or re-convert it")
            offset += n
        return
    except (OSError, AttributeError):  # no copy_file_range here (old kernel, some filesystems): copy below
        pass
    buf = bytearray(min(64 << 20, end - offset))
    view = memoryview(buf)
    while offset < end:
        n = os.preadv(src_fd, [view[: min(len(buf), end - offset)]], offset)
        if n <= 0:
            raise LitModelError(f"source file is truncated at byte {offset}; re-download or re-convert it")
        _write_all(dst_fd, view[:n])
        offset += n


def write_safetensors_stream(path: Path, steps: list[Step], chunks: Iterable[list[Chunk] | torch.Tensor],
                             metadata: dict | None = None) -> int:
    """Write the header for ``steps``, then each step's bytes in order. Returns the file size.

    ``chunks`` yields, per step, a tensor or a list of chunks (see `run_steps`).
    """
    header = safetensors_header(steps, metadata)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, header)
        it = iter(chunks)
        for step in steps:
            item = next(it)
            written = 0
            for chunk in [item] if isinstance(item, torch.Tensor) else item:
                if isinstance(chunk, torch.Tensor):
                    t = chunk.contiguous()
                    if t.numel():
                        _write_all(fd, t.reshape(-1).view(torch.uint8).numpy())
                    written += t.numel() * t.element_size()
                    del t
                else:
                    _copy_range(chunk[0], fd, chunk[1], chunk[2])
                    written += chunk[2]
            if written != step.nbytes:
                raise RuntimeError(f"{step.name}: wrote {written} bytes, planned {step.nbytes}")
            del item
        return os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)
