"""Hugging Face interop: read HF checkpoint dirs, stream conversions both ways, download from the Hub.

Conversions are streamed. The output safetensors header (every tensor's name, dtype, shape and byte
offsets) is computed up front from the source headers; then each output tensor's bytes are appended
in order. A tensor whose bytes stay as they are (renamed, or fused parts concatenated along dim 0,
dtype unchanged: every Llama-family tensor) is copied file-to-file with ``os.copy_file_range``, in
the kernel; any other is built from its sources, read with ``pread`` into reused buffers (never a
whole file). So only one output tensor and its sources are ever in memory, and outputs are written
under temporary names and renamed into place only when complete.

    convert_hf_checkpoint(hf_dir, out_dir)        # HF dir -> litmodel checkpoint dir
    convert_lit_checkpoint(lit_dir, out_dir)      # litmodel checkpoint dir -> HF dir
    download(repo_id, checkpoint_root)            # Hub (or its cache) -> checkpoints/<org>/<name>
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

import torch

from litmodel import build_meta_model
from litmodel.checkpoint import CONFIG_FILE, MODEL_FILE, SAFETENSORS_DTYPES, load_config, read_safetensors_header
from litmodel.config import HF_MODEL_TYPES, Config, hf_text_config, name_to_config
from litmodel.convert import IGNORED_HF_SUFFIXES, VISION_PREFIXES, hf_aliases, hf_to_lit_plan, lit_to_hf_plan
from litmodel.convert import _cat, _same  # the plans' layout-preserving functions
from litmodel.atomic import publish, staging_dir
from litmodel.utils import LitModelError, parse_dtype

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
HF_CONFIG = "config.json"

# Used only if litmodel.tokenizer is unavailable; the union of both lists is downloaded.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt")

_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_BYTE_PRESERVING = (_same, _cat)


def tokenizer_file_names() -> tuple[str, ...]:
    try:
        from litmodel.tokenizer import TOKENIZER_FILES
    except ImportError:
        TOKENIZER_FILES = ()
    return tuple(dict.fromkeys((*TOKENIZER_FILES, *_TOKENIZER_FILES)))


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files (and generation_config.json) that exist in ``src`` into ``dst``."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        return [n for n in tokenizer_file_names() if (src / n).is_file()]
    try:
        from litmodel.tokenizer import copy_tokenizer_files as _copy
    except ImportError:
        _copy = None
    if _copy is not None:
        _copy(src, dst)
    copied = []
    for name in tokenizer_file_names():
        if (src / name).is_file():
            if not (dst / name).is_file():
                shutil.copyfile(src / name, dst / name)  # follows the HF cache's symlinks
            copied.append(name)
    return copied


def parse_size(size: int | str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a number of bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m:
        raise LitModelError(f"cannot parse size {size!r}; use a number of bytes or e.g. 500MB, 5GB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


# ================================================================== reading source tensors
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


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise LitModelError(f"{index} is corrupt ({err!r}); re-download it") from None
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise LitModelError(f"{index.parent / missing[0]} is listed in {index.name} but missing "
                            f"({len(missing)} of {len(files)} shards missing); re-download the checkpoint")
    return [index.parent / f for f in files]


def hf_weight_files(hf_dir: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "bin", files): sharded safetensors, single safetensors, then the .bin fallbacks."""
    if (hf_dir / SAFE_INDEX).is_file():
        return "safetensors", _index_files(hf_dir / SAFE_INDEX)
    if (hf_dir / SAFE_WEIGHTS).is_file():
        return "safetensors", [hf_dir / SAFE_WEIGHTS]
    if (hf_dir / BIN_INDEX).is_file():
        return "bin", _index_files(hf_dir / BIN_INDEX)
    if (hf_dir / BIN_WEIGHTS).is_file():
        return "bin", [hf_dir / BIN_WEIGHTS]
    raise LitModelError(f"no weights in {hf_dir}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}; "
                        "download the complete checkpoint (python scripts/download.py --repo_id <org/name>)")


def check_hf_dir(hf_dir: str | Path) -> Path:
    d = Path(hf_dir)
    if d.exists() and not d.is_dir():
        raise LitModelError(f"--checkpoint_dir {d} is a file; pass the directory that holds config.json and the "
                            "weights")
    if not d.is_dir():
        raise LitModelError(f"checkpoint dir {d} does not exist; pass a Hugging Face model dir (with config.json and "
                            "weights) or download one with `python scripts/download.py --repo_id <org/name>`")
    if not any(d.iterdir()):
        raise LitModelError(f"checkpoint dir {d} is empty; download a model into it with "
                            "`python scripts/download.py --repo_id <org/name>`")
    if not (d / HF_CONFIG).is_file():
        if (d / CONFIG_FILE).is_file():
            raise LitModelError(f"{d} is already a litmodel checkpoint dir (model_config.yaml, no config.json); "
                                "nothing to convert - use it directly, or export it with "
                                "scripts/convert_lit_checkpoint.py")
        raise LitModelError(f"{d} has no config.json, so it is not a Hugging Face model dir; pass the dir that "
                            "holds config.json and the weights")
    return d


def read_hf_config(hf_dir: Path) -> dict:
    try:
        hf = json.loads((hf_dir / HF_CONFIG).read_text())
    except ValueError as err:
        raise LitModelError(f"{hf_dir / HF_CONFIG} is not valid JSON ({err}); re-download it") from None
    if not isinstance(hf, dict):
        raise LitModelError(f"{hf_dir / HF_CONFIG} is not a JSON object; re-download it")
    hf = hf_text_config(hf)  # a multimodal Gemma 3: its language model
    if hf.get("model_type") not in HF_MODEL_TYPES:
        raise LitModelError(f"unsupported model_type {hf.get('model_type')!r} in {hf_dir / HF_CONFIG}; "
                            f"supported: {', '.join(HF_MODEL_TYPES)}")
    return hf


def guess_repo_id(hf_dir: Path, hf: dict) -> str | None:
    """The Hub id a dir came from: `_name_or_path`, an HF cache path or a registry `org/name` path."""
    name = hf.get("_name_or_path")
    if isinstance(name, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return name
    for part in hf_dir.resolve().parts:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/", 1)
    candidate = f"{hf_dir.parent.name}/{hf_dir.name}"
    if candidate in name_to_config or hf_dir.name in name_to_config:
        return name_to_config.get(candidate, name_to_config.get(hf_dir.name))["hf_repo_id"]
    return None


# ================================================================== streaming safetensors writer
@dataclass
class Step:
    """One output tensor: built by ``fn`` from the source tensors ``sources``."""

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


def _concatenates(fn: Callable) -> bool:
    """Whether ``fn``'s output bytes are its inputs' bytes in order (rename, cat along dim 0, stack)."""
    return fn in _BYTE_PRESERVING or getattr(fn, "concat_bytes", False)


def _byte_ranges(step: Step, source: TensorSource) -> list[tuple[int, int, int]] | None:
    """The source byte ranges whose concatenation is the output, when the step keeps the bytes as
    they are (a renamed tensor, or fused tensors concatenated along dim 0, in the same dtype)."""
    if source.kind != "safetensors" or not _concatenates(step.fn):
        return None
    infos = [source.infos[n] for n in step.sources]
    if any(i.dtype != step.dtype for i in infos):
        return None
    return [(source.fd(i.file), i.offset, i.nbytes) for i in infos]


def run_steps(steps: list[Step], source: TensorSource) -> Iterator[list[Chunk]]:
    """For each step, the chunks whose bytes, in order, are its output tensor.

    Layout-preserving steps become source byte ranges; the others read their sources into a few
    reused buffers (so pages are faulted in once, not per tensor) and build the tensor. Consecutive
    steps with the same sources share one read. Chunks are valid until the next step is requested.
    """
    cache: dict[str, torch.Tensor] = {}
    in_buffers: list[torch.Tensor] = []
    out_buffers: list[torch.Tensor] = []

    def buffer(pool: list[torch.Tensor], j: int, nbytes: int) -> torch.Tensor:
        while len(pool) <= j:
            pool.append(torch.empty(0, dtype=torch.uint8))
        if pool[j].numel() < nbytes:
            pool[j] = torch.empty(0, dtype=torch.uint8)  # free the old one first
            pool[j] = torch.empty(nbytes, dtype=torch.uint8)
        return pool[j][:nbytes]

    def cast(j: int, t: torch.Tensor) -> torch.Tensor:
        if t.dtype == step.dtype:
            return t
        out = buffer(out_buffers, j, t.numel() * step.dtype.itemsize).view(step.dtype).view(t.shape)
        return out.copy_(t)  # into a reused buffer: no fresh pages to fault in

    for step in steps:
        ranges = _byte_ranges(step, source)
        if ranges is not None:
            yield list(ranges)
            continue
        if list(cache) != step.sources:
            cache = {n: source.read(n, buffer(in_buffers, j, source.infos[n].nbytes)
                                    if source.kind == "safetensors" else None)
                     for j, n in enumerate(step.sources)}
        tensors = [cache[n] for n in step.sources]
        if step.fn is not _same and _concatenates(step.fn) and all(t.dim() >= 1 for t in tensors):
            chunks = [cast(j, t) for j, t in enumerate(tensors)]  # cat along dim 0 = the parts' bytes in order
        else:
            chunks = [cast(0, step.fn(*tensors))]
        if sum(c.numel() for c in chunks) != math.prod(step.shape):  # cannot happen: shapes come from the plan
            raise RuntimeError(f"{step.name}: built {sum(c.numel() for c in chunks)} elements, planned {step.shape}")
        yield chunks
        del chunks, tensors


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


# ================================================================== plans -> steps, with validation
def _meta(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _apply_meta(fn: Callable[..., torch.Tensor], metas: list[torch.Tensor]) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of ``fn``'s output, computed without data (meta tensors).

    Renames and concatenations are worked out directly: `torch.cat` on the meta device goes
    through torch._refs, whose first use imports torch._dynamo (seconds of start-up).
    """
    if fn is _same:
        return tuple(metas[0].shape), metas[0].dtype
    if fn is _cat and len({(tuple(m.shape[1:]), m.dtype) for m in metas}) == 1:
        return (sum(m.shape[0] for m in metas), *metas[0].shape[1:]), metas[0].dtype
    if hasattr(fn, "out_shape") and len({(tuple(m.shape[1:]), m.dtype) for m in metas}) == 1:
        return fn.out_shape([tuple(m.shape) for m in metas]), metas[0].dtype
    out = fn(*metas)
    return tuple(out.shape), out.dtype


def expected_lit_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor `model.safetensors` holds for ``config`` (tied heads not stored)."""
    from litmodel.checkpoint import model_state_for_saving

    model = build_meta_model(config)
    return {k: tuple(v.shape) for k, v in model_state_for_saving(model).items()}


def _target_dtype(src: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and src.is_floating_point else src


def hf_to_lit_steps(config: Config, source: TensorSource, dtype: torch.dtype | None) -> list[Step]:
    """Check the source against ``config`` (first bad tensor named, with both shapes) and plan the output."""
    lit_shapes = expected_lit_shapes(config)
    lit_meta = {k: _meta(s) for k, s in lit_shapes.items()}
    available = set(source.names())
    stored: dict[str, str] = {}  # plan's HF name -> name in the file
    for hf_name, (srcs, fn) in lit_to_hf_plan(config).items():
        want = _apply_meta(fn, [lit_meta[n] for n in srcs])[0]
        name = next((a for a in hf_aliases(hf_name) if a in available), None)
        if name is None:
            n_missing = sum(all(a not in available for a in hf_aliases(h)) for h in lit_to_hf_plan(config))
            raise LitModelError(f"{source.description}: tensor {hf_name!r} is missing ({n_missing} missing in all); "
                                "the weights do not match config.json, or the download is incomplete")
        have = source.infos[name].shape
        if have != want:
            raise LitModelError(f"{source.description}: tensor {name!r} has shape {have} but config.json needs "
                                f"{want}; the weights do not match config.json")
        stored[hf_name] = name
    head_names = {"lm_head.weight", "embed_out.weight", "language_model.lm_head.weight"}
    used = set(stored.values())
    for name in source.names():
        if name in used or name.endswith(IGNORED_HF_SUFFIXES):
            continue
        if config.tie_embeddings and name in head_names:
            continue  # a tied head stored anyway: the embedding is used
        if config.model_type == "gemma3_text" and name.startswith(VISION_PREFIXES):
            continue  # a multimodal Gemma 3: litmodel takes the language model only
        raise LitModelError(f"{source.description}: unexpected tensor {name!r} (shape {source.infos[name].shape}); "
                            "the weights do not match config.json")
    return _plan_steps(hf_to_lit_plan(config), stored, source, lit_shapes, dtype)


def lit_to_hf_steps(config: Config, source: TensorSource, dtype: torch.dtype | None) -> list[Step]:
    lit_shapes = expected_lit_shapes(config)
    for name, want in lit_shapes.items():
        if name not in source.infos:
            missing = [n for n in lit_shapes if n not in source.infos]
            raise LitModelError(f"{source.description}: tensor {name!r} is missing ({len(missing)} missing in all); "
                                "the weights do not match model_config.yaml")
        if source.infos[name].shape != want:
            raise LitModelError(f"{source.description}: tensor {name!r} has shape {source.infos[name].shape} but "
                                f"model_config.yaml needs {want}; the weights do not match model_config.yaml")
    for name in source.names():
        if name not in lit_shapes and not (config.tie_embeddings and name == "lm_head.weight"):
            raise LitModelError(f"{source.description}: unexpected tensor {name!r}; the weights do not match "
                                "model_config.yaml")
    plan = lit_to_hf_plan(config)
    return _plan_steps(plan, {n: n for n in lit_shapes}, source, None, dtype)


def _plan_steps(plan, stored: dict[str, str], source: TensorSource, expect: dict | None,
                dtype: torch.dtype | None) -> list[Step]:
    steps = []
    for out_name, (srcs, fn) in plan.items():
        names = [stored[s] for s in srcs]
        metas = [_meta(source.infos[n].shape, source.infos[n].dtype) for n in names]
        shape, out_dtype = _apply_meta(fn, metas)
        if expect is not None and expect.get(out_name) != shape:
            raise LitModelError(f"{source.description}: {out_name!r} would get shape {shape}, the model needs "
                                f"{expect.get(out_name)}; the weights do not match the config")
        steps.append(Step(out_name, names, fn, shape, _target_dtype(out_dtype, dtype)))
    if expect is not None and set(expect) - set(plan):
        raise LitModelError(f"no conversion rule for {sorted(set(expect) - set(plan))[0]!r}")
    return steps


# ================================================================== HF -> litmodel
def convert_hf_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path | None = None,
                          dtype: str | torch.dtype | None = None, name: str | None = None,
                          verbose: bool = False) -> Path:
    """Convert a Hugging Face model dir into a litmodel checkpoint dir (``out_dir``, default: in place)."""
    start = time.perf_counter()
    hf_dir = check_hf_dir(checkpoint_dir)
    out_dir = Path(out_dir) if out_dir is not None else hf_dir
    target = parse_dtype(dtype)
    hf = read_hf_config(hf_dir)
    config = Config.from_hf_config(hf, name=name or guess_repo_id(hf_dir, hf))
    kind, files = hf_weight_files(hf_dir)
    if kind == "safetensors" and files == [hf_dir / SAFE_WEIGHTS] and (hf_dir / CONFIG_FILE).is_file():
        header, _ = read_safetensors_header(files[0])
        if any(k.startswith("blocks.") for k in header):
            raise LitModelError(f"{hf_dir} was already converted in place (model.safetensors has litmodel names); "
                                "use it directly, or re-download the Hugging Face weights to convert again")
    desc = str(files[0]) if len(files) == 1 else f"{hf_dir} ({len(files)} shards)"
    if kind == "safetensors":
        source = TensorSource.from_safetensors_files(files, desc)
    else:
        source = TensorSource.from_bin_files(files, desc)
    try:
        steps = hf_to_lit_steps(config, source, target)
        with staging_dir(out_dir) as tmp:
            write_safetensors_stream(tmp / MODEL_FILE, steps, run_steps(steps, source))
            config.to_yaml(tmp / CONFIG_FILE)
            if out_dir.resolve() != hf_dir.resolve():
                copy_tokenizer_files(hf_dir, tmp)
            publish(tmp, out_dir, last=(CONFIG_FILE,))
    finally:
        source.close()
    if verbose:
        size = (out_dir / MODEL_FILE).stat().st_size
        print(f"converted {desc} -> {out_dir} ({len(steps)} tensors, {size / 1e6:.1f} MB, model {config.name}) "
              f"in {time.perf_counter() - start:.2f}s")
    return out_dir


# ================================================================== litmodel -> HF
def shard_steps(steps: list[Step], max_bytes: int) -> list[list[Step]]:
    shards: list[list[Step]] = [[]]
    size = 0
    for s in steps:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def convert_lit_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, dtype: str | torch.dtype | None = None,
                           max_shard_size: int | str = "5GB", verbose: bool = False) -> Path:
    """Export a litmodel checkpoint dir as a Hugging Face model dir transformers can load."""
    from litmodel.checkpoint import check_checkpoint_dir

    lit_dir = check_checkpoint_dir(checkpoint_dir)
    out_dir = Path(out_dir)
    if out_dir.resolve() == lit_dir.resolve():
        raise LitModelError(f"--out_dir must differ from --checkpoint_dir ({lit_dir}): both use model.safetensors")
    target = parse_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    config = load_config(lit_dir)
    source = TensorSource.from_safetensors_files([lit_dir / MODEL_FILE], str(lit_dir / MODEL_FILE))
    try:
        steps = lit_to_hf_steps(config, source, target)
        hf = config.to_hf_config()
        floats = [s.dtype for s in steps if s.dtype.is_floating_point]
        if floats:
            dtype_name = str(max(set(floats), key=floats.count)).removeprefix("torch.")
            hf.update(torch_dtype=dtype_name, dtype=dtype_name)
        shards = shard_steps(steps, max_bytes)
        names = ([SAFE_WEIGHTS] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        tensors = run_steps(steps, source)
        with staging_dir(out_dir) as tmp:
            for fname, shard in zip(names, shards):
                write_safetensors_stream(tmp / fname, shard, tensors)
            if len(shards) > 1:
                index = {"metadata": {"total_size": sum(s.nbytes for s in steps)},
                         "weight_map": {s.name: f for f, shard in zip(names, shards) for s in shard}}
                (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            (tmp / HF_CONFIG).write_text(json.dumps(hf, indent=2) + "\n")
            copy_tokenizer_files(lit_dir, tmp)
            stale = [p.name for p in out_dir.glob("model*.safetensors")] if out_dir.is_dir() else []
            stale += [SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX]
            stale += [p.name for p in out_dir.glob("pytorch_model-*.bin")] if out_dir.is_dir() else []
            publish(tmp, out_dir, last=(HF_CONFIG,), remove=stale)
    finally:
        source.close()
    if verbose:
        print(f"exported {lit_dir} -> {out_dir} ({len(steps)} tensors in {len(shards)} file(s))")
    return out_dir


# ================================================================== Hub downloads
def resolve_repo_id(repo_id: str) -> str:
    """`org/name` as given, or the Hub id of a registry short name (e.g. `pythia-70m`)."""
    if "/" not in repo_id:
        if repo_id in name_to_config:
            return name_to_config[repo_id]["hf_repo_id"]
        Config.from_name(repo_id)  # raises with the closest names
    return repo_id


def registry_table() -> str:
    from litmodel.config import configs

    width = max(len(c["name"]) for c in configs)
    return "\n".join(f"{c['name']:<{width}}  {c['hf_repo_id']}" for c in configs)


def weight_patterns(files: Iterable[str]) -> list[str]:
    """Which weight files to fetch: safetensors when the repo has them, else the .bin files."""
    files = [f for f in files if "/" not in f]
    if any(re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", f) for f in files):
        return ["model*.safetensors", SAFE_INDEX]
    if any(re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", f) for f in files):
        return ["pytorch_model*.bin", BIN_INDEX]
    return ["model*.safetensors", SAFE_INDEX]  # let the conversion report the missing weights


def _connection_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        for attr in ("TransportError", "ConnectionError", "Timeout", "TimeoutException"):
            cls = getattr(mod, attr, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                errors.append(cls)
    return tuple(errors)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


@contextlib.contextmanager
def hub_errors(repo_id: str, token: str | None) -> Iterator[None]:
    """Turn huggingface_hub's errors into one-line LitModelErrors that say what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError)

    fix = ("connect to the network, or set HF_HUB_OFFLINE=1 with a filled Hub cache (HF_HOME / HF_HUB_CACHE), or "
           "convert a local HF dir with `python scripts/convert_hf_checkpoint.py --checkpoint_dir <dir>`")
    page = f"https://huggingface.co/{repo_id}"
    try:
        yield
    except (GatedRepoError, RepositoryNotFoundError) as err:
        what = "is gated" if isinstance(err, GatedRepoError) else "was not found, or is gated or private"
        hint = "your token has no access: " if token else ""
        raise LitModelError(f"{repo_id} {what} on the Hugging Face Hub; {hint}accept the license on the Hub page "
                            f"({page}) and pass --access_token or set HF_TOKEN (check the name with "
                            "`--repo_id list`)") from None
    except HFValidationError as err:
        raise LitModelError(f"invalid repo id {repo_id!r} ({_first_line(err)}); use <org>/<name>, e.g. "
                            "EleutherAI/pythia-70m, or a name from `--repo_id list`") from None
    except LocalEntryNotFoundError as err:
        cause = err.__cause__ or err.__context__
        if isinstance(err, IncompleteSnapshotError):
            what = "the Hub is unreachable and its cached snapshot is incomplete"
        elif constants.is_offline_mode():
            what = f"HF_HUB_OFFLINE=1 is set and it is not in the local Hub cache ({constants.HF_HUB_CACHE})"
        else:
            reason = f" ({_first_line(cause)})" if cause is not None else ""
            what = f"the Hugging Face Hub is unreachable{reason} and it is not in the local Hub cache"
        raise LitModelError(f"cannot get {repo_id}: {what}; {fix}") from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise LitModelError(f"the Hub refused access to {repo_id} (HTTP {status}); accept the license on the Hub "
                                f"page ({page}) and pass --access_token or set HF_TOKEN") from None
        raise LitModelError(f"the Hugging Face Hub failed for {repo_id} ({_first_line(err)}); try again later, or "
                            "set HF_HUB_OFFLINE=1 to use the local cache") from None
    except _connection_errors() as err:
        raise LitModelError(f"cannot get {repo_id}: the Hugging Face Hub is unreachable ({_first_line(err)}); "
                            f"{fix}") from None


def list_repo_files(repo_id: str, token: str | None) -> list[str]:
    """The repo's file list: from the Hub, else from the cache (its tree listing or snapshot folder)."""
    from huggingface_hub import HfApi, constants, get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    api_error: BaseException | None = None
    if not constants.is_offline_mode():
        try:  # one request, no retries (list_repo_tree retries a dead connection for ~30 s)
            return [s.rfilename for s in HfApi(token=token).model_info(repo_id).siblings or []]
        except (HfHubHTTPError, *_connection_errors()) as err:
            api_error = err
    try:
        return [f.path for f in get_cached_repo_tree(repo_id)]
    except CachedRepoTreeNotFoundError:
        pass
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError as err:
        if isinstance(api_error, HfHubHTTPError):
            raise api_error from None
        raise err from api_error
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def download(repo_id: str, checkpoint_root: str | Path = "checkpoints", access_token: str | None = None,
             tokenizer_only: bool = False, dtype: str | None = None) -> Path:
    """Fetch the config, tokenizer and (safetensors-preferred) weights, convert to checkpoints/<org>/<name>."""
    from huggingface_hub import snapshot_download

    repo_id = resolve_repo_id(repo_id)
    token = access_token or os.environ.get("HF_TOKEN") or None
    parse_dtype(dtype)  # fail on a bad --dtype before downloading gigabytes
    out_dir = Path(checkpoint_root) / repo_id
    with hub_errors(repo_id, token):
        patterns = [HF_CONFIG, *tokenizer_file_names()]
        if not tokenizer_only:
            patterns += weight_patterns(list_repo_files(repo_id, token))
        snapshot = Path(snapshot_download(repo_id, allow_patterns=patterns, token=token))
    if tokenizer_only:
        if not any((snapshot / n).is_file() for n in tokenizer_file_names()):
            raise LitModelError(f"{repo_id} has no tokenizer files ({', '.join(tokenizer_file_names())})")
        with staging_dir(out_dir) as tmp:
            copy_tokenizer_files(snapshot, tmp)
            publish(tmp, out_dir)
        print(f"tokenizer of {repo_id} -> {out_dir}")
        return out_dir
    return convert_hf_checkpoint(snapshot, out_dir, dtype=dtype, name=repo_id, verbose=True)
