"""The checkpoint dir: `model.safetensors` (litmodel names), `model_config.yaml`, tokenizer files.

Loading builds the model on the meta device and assigns tensors memory-mapped straight from the
safetensors file, so the weights are never held twice in memory.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch
import torch.nn as nn

from litmodel import build_meta_model
from litmodel.config import Config
from litmodel.atomic import atomic_dir, atomic_file
from litmodel.utils import LitModelError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model_config.yaml"

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


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
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"})


def model_state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as it goes into `model.safetensors` (a tied head is stored once)."""
    sd = model.state_dict()
    if getattr(model, "config", None) is not None and model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def check_checkpoint_dir(checkpoint_dir: str | Path) -> Path:
    """The dir, or a one-line error saying what is wrong and the command that fixes it."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise LitModelError(f"checkpoint dir {d} does not exist; download one with "
                            f"`python scripts/download.py --repo_id <org/name>` or pass the right --checkpoint_dir")
    if not (d / CONFIG_FILE).is_file() or not (d / MODEL_FILE).is_file():
        if (d / "config.json").is_file():
            raise LitModelError(f"{d} is a Hugging Face dir, not a litmodel checkpoint; convert it with "
                                f"`python scripts/convert_hf_checkpoint.py --checkpoint_dir {d}`")
        missing = [f for f in (CONFIG_FILE, MODEL_FILE) if not (d / f).is_file()]
        raise LitModelError(f"{d} is not a litmodel checkpoint dir (missing {', '.join(missing)}); "
                            "pass a dir written by scripts/download.py, pretraining or finetuning")
    return d


def load_config(checkpoint_dir: str | Path) -> Config:
    return Config.from_yaml(check_checkpoint_dir(checkpoint_dir) / CONFIG_FILE)


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise a one-line error naming the first tensor that does not fit the model."""
    expected = model_state_for_saving(model)
    for name, t in state_dict.items():
        if name not in expected:
            raise LitModelError(f"{source}: unexpected tensor {name!r}; the file does not belong to this model config")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise LitModelError(f"{source}: tensor {name!r} has shape {tuple(t.shape)} but the config needs "
                                f"{tuple(expected[name].shape)}; the weights do not match model_config.yaml")
    missing = [n for n in expected if n not in state_dict]
    if missing:
        raise LitModelError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               config: Config | None = None) -> nn.Module:
    """Build the model on the meta device and fill it from `model.safetensors` (memory-mapped)."""
    d = check_checkpoint_dir(checkpoint_dir)
    config = config or load_config(d)
    model = build_meta_model(config)
    state_dict = mmap_safetensors(d / MODEL_FILE)
    check_state_dict(model, state_dict, str(d / MODEL_FILE))
    device = torch.device(device)
    if dtype is not None or device.type != "cpu":
        state_dict = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                      for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    return model.eval()


def save_checkpoint_dir(out_dir: str | Path, model_or_state: nn.Module | dict, config: Config,
                        tokenizer_dir: str | Path | None = None) -> Path:
    """Write a complete checkpoint dir atomically: a half-written dir is never left under `out_dir`."""
    if isinstance(model_or_state, nn.Module):
        state = model_state_for_saving(model_or_state)
    else:
        state = dict(model_or_state)
        if config.tie_embeddings:
            state.pop("lm_head.weight", None)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_safetensors(state, tmp / MODEL_FILE)
        config.to_yaml(tmp / CONFIG_FILE)
        if tokenizer_dir is not None:
            from litmodel.tokenizer import copy_tokenizer_files

            copy_tokenizer_files(tokenizer_dir, tmp)
    return out_dir
