"""The checkpoint dir: `model.safetensors` (litmodel names), `model_config.yaml`, tokenizer files.

Loading builds the model on the meta device and assigns tensors memory-mapped straight from the
safetensors file, so the weights are never held twice in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn as nn

from litmodel import build_meta_model
from litmodel.atomic import atomic_dir
from litmodel.config import Config
from litmodel.safetensors_io import mmap_safetensors, save_safetensors
from litmodel.tokenizer import copy_tokenizer_files
from litmodel.utils import LitModelError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model_config.yaml"

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


def check_tensor_shapes(model: nn.Module, shapes: Mapping[str, Sequence[int]], source: str) -> None:
    """Raise a one-line error naming the first tensor of ``source`` (name -> shape) that does not fit the model."""
    expected = model_state_for_saving(model)
    for name, shape in shapes.items():
        if name not in expected:
            raise LitModelError(f"{source}: unexpected tensor {name!r}; the file does not belong to this model config")
        if tuple(shape) != tuple(expected[name].shape):
            raise LitModelError(f"{source}: tensor {name!r} has shape {tuple(shape)} but the config needs "
                                f"{tuple(expected[name].shape)}; the weights do not match model_config.yaml")
    missing = [n for n in expected if n not in shapes]
    if missing:
        raise LitModelError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")


def load_model(checkpoint_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               config: Config | None = None) -> nn.Module:
    """Build the model on the meta device and fill it from `model.safetensors` (memory-mapped)."""
    d = check_checkpoint_dir(checkpoint_dir)
    config = config or load_config(d)
    model = build_meta_model(config)
    state_dict = mmap_safetensors(d / MODEL_FILE)
    check_tensor_shapes(model, {k: t.shape for k, t in state_dict.items()}, str(d / MODEL_FILE))
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
            copy_tokenizer_files(tokenizer_dir, tmp)
    return out_dir
