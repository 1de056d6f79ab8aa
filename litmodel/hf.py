"""Hugging Face <-> litmodel conversion: read HF model dirs, check them, stream the conversion both ways.

Conversions are streamed. The output safetensors header (every tensor's name, dtype, shape and byte
offsets) is computed up front from the source headers; then each output tensor's bytes are appended
in order. A tensor whose bytes stay as they are (renamed, or fused parts concatenated along dim 0,
dtype unchanged: every Llama-family tensor) is copied file-to-file with ``os.copy_file_range``, in
the kernel; any other is built from its sources, read with ``pread`` into reused buffers (never a
whole file). So only one output tensor and its sources are ever in memory, and outputs are written
under temporary names and renamed into place only when complete.

    convert_hf_checkpoint(hf_dir, out_dir)        # HF dir -> litmodel checkpoint dir
    convert_lit_checkpoint(lit_dir, out_dir)      # litmodel checkpoint dir -> HF dir

The name and layout maps (which tensors each output is built from) are in ``litmodel.hf_names``; the
safetensors reading and streaming writer in ``litmodel.safetensors_io``; Hub downloads in ``litmodel.hub``.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from litmodel import build_meta_model
from litmodel.atomic import publish, staging_dir
from litmodel.checkpoint import CONFIG_FILE, MODEL_FILE, check_checkpoint_dir, load_config, model_state_for_saving
from litmodel.config import HF_MODEL_TYPES, Config, hf_text_config
from litmodel.config_registry import name_to_config
from litmodel.hf_names import (IGNORED_HF_SUFFIXES, VISION_PREFIXES, cat_rows, hf_aliases, hf_to_lit_plan,
                               lit_to_hf_plan, unchanged)
from litmodel.safetensors_io import Chunk, Step, TensorSource, read_safetensors_header, write_safetensors_stream
from litmodel.tokenizer import copy_tokenizer_files
from litmodel.utils import LitModelError, parse_dtype

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
HF_CONFIG = "config.json"

_BYTE_PRESERVING = (unchanged, cat_rows)


def parse_size(size: int | str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a number of bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?)B?\s*", str(size).upper())
    if not m:
        raise LitModelError(f"cannot parse size {size!r}; use a number of bytes or e.g. 500MB, 5GB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


# ================================================================== reading Hugging Face dirs
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


# ================================================================== plans -> steps, with validation
def _meta(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _apply_meta(fn: Callable[..., torch.Tensor], metas: list[torch.Tensor]) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of ``fn``'s output, computed without data (meta tensors).

    Renames and concatenations are worked out directly: `torch.cat` on the meta device goes
    through torch._refs, whose first use imports torch._dynamo (seconds of start-up).
    """
    if fn is unchanged:
        return tuple(metas[0].shape), metas[0].dtype
    if fn is cat_rows and len({(tuple(m.shape[1:]), m.dtype) for m in metas}) == 1:
        return (sum(m.shape[0] for m in metas), *metas[0].shape[1:]), metas[0].dtype
    if hasattr(fn, "out_shape") and len({(tuple(m.shape[1:]), m.dtype) for m in metas}) == 1:
        return fn.out_shape([tuple(m.shape) for m in metas]), metas[0].dtype
    out = fn(*metas)
    return tuple(out.shape), out.dtype


def expected_lit_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Every tensor `model.safetensors` holds for ``config`` (tied heads not stored)."""
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


# ================================================================== running the steps
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
        if step.fn is not unchanged and _concatenates(step.fn) and all(t.dim() >= 1 for t in tensors):
            chunks = [cast(j, t) for j, t in enumerate(tensors)]  # cat along dim 0 = the parts' bytes in order
        else:
            chunks = [cast(0, step.fn(*tensors))]
        if sum(c.numel() for c in chunks) != math.prod(step.shape):  # cannot happen: shapes come from the plan
            raise RuntimeError(f"{step.name}: built {sum(c.numel() for c in chunks)} elements, planned {step.shape}")
        yield chunks
        del chunks, tensors


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
