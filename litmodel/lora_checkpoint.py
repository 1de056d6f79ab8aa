"""The LoRA dir, written, read and merged in one place: ``lora.safetensors`` (only the LoRA weights) +
``lora_config.yaml`` (rank, alpha, dropout, targets, the base checkpoint dir and its quantization) and,
when merged, the complete checkpoint dir beside them (``model.safetensors`` + ``model_config.yaml`` +
tokenizer files) that every other script reads as is.

```python
save_lora(out_dir, model, cfg)                       # a LoRA model's adapter -> out_dir
load_lora(fresh_base_model, out_dir)                 # applies LoRA as lora_config.yaml says, loads the weights
write_lora_checkpoint(final, lora_state, cfg, base)  # a finetuning run's out_dir/final (atomic; merged by default)
merge_lora_checkpoint(lora_dir)                      # scripts/merge_lora.py: adapter + base -> merged dir
```

The layers and the merge math are `litmodel.lora`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import yaml

from litmodel.atomic import atomic_dir, atomic_file
from litmodel.checkpoint import CONFIG_FILE, MODEL_FILE, check_checkpoint_dir, load_model, model_state_for_saving
from litmodel.lora import LoRAConfig, apply_lora, lora_modules, lora_state_dict, merge_lora, remove_lora
from litmodel.nf4 import round_trip_nf4_
from litmodel.safetensors_io import mmap_safetensors, save_safetensors
from litmodel.tokenizer import copy_tokenizer_files
from litmodel.utils import LitModelError

LORA_WEIGHTS_FILE = "lora.safetensors"
LORA_CONFIG_FILE = "lora_config.yaml"


# ---- writing --------------------------------------------------------------------------------------
def _config_of(model: nn.Module, lora_config: LoRAConfig | dict | None) -> LoRAConfig:
    mods = lora_modules(model)
    if not mods:
        raise LitModelError("the model has no LoRA layers; nothing to save (call apply_lora first)")
    if lora_config is None:
        raise LitModelError("save_lora needs the LoRAConfig the model was adapted with")
    cfg = lora_config if isinstance(lora_config, LoRAConfig) else LoRAConfig(**lora_config)
    for name, m in mods.items():
        if (m.r, m.alpha, m.dropout) != (cfg.r, cfg.alpha, cfg.dropout):
            raise LitModelError(f"{name} has r={m.r}, alpha={m.alpha}, dropout={m.dropout} but the LoRA config says "
                                f"r={cfg.r}, alpha={cfg.alpha}, dropout={cfg.dropout}; pass the config used in apply_lora")
    return cfg


def save_lora(path_dir: str | os.PathLike, model: nn.Module, lora_config: LoRAConfig | dict | None) -> Path:
    """Write ``lora.safetensors`` (only LoRA weights) and ``lora_config.yaml`` into ``path_dir``; other files in
    ``path_dir`` (e.g. a checkpoint's ``model.safetensors``) are left alone."""
    out = Path(path_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_adapter(out, lora_state_dict(model), _config_of(model, lora_config))
    return out


def write_lora_checkpoint(out_dir: Path, lora_state: dict[str, torch.Tensor], lora: LoRAConfig,
                          base_checkpoint_dir: Path, merge: bool = True) -> Path:
    """Write ``out_dir`` atomically: the adapter (``lora.safetensors``, ``lora_config.yaml`` naming the base)
    and, with ``merge``, the merged checkpoint (the same code as scripts/merge_lora.py)."""
    with atomic_dir(out_dir) as tmp:
        write_adapter(tmp, lora_state, _with_base(lora, base_checkpoint_dir))
        if merge:
            write_merged(tmp, base_checkpoint_dir, tmp)
    return Path(out_dir)


def write_adapter(d: Path, lora_state: dict[str, torch.Tensor], lora: LoRAConfig) -> None:
    """``lora.safetensors`` + ``lora_config.yaml`` into the existing dir ``d``: the config is renamed into place
    only after the weights are complete."""
    with atomic_file(Path(d) / LORA_CONFIG_FILE) as tmp_config:
        tmp_config.write_text(yaml.safe_dump(lora.to_dict(), sort_keys=False))
        save_safetensors(lora_state, Path(d) / LORA_WEIGHTS_FILE)


def write_lora_config(d: Path, lora: LoRAConfig, base_checkpoint_dir: Optional[Path]) -> None:
    _with_base(lora, base_checkpoint_dir).to_yaml(Path(d) / LORA_CONFIG_FILE)


def _with_base(lora: LoRAConfig, base_checkpoint_dir: Optional[Path]) -> LoRAConfig:
    base = str(base_checkpoint_dir) if base_checkpoint_dir is not None else None
    return dataclasses.replace(lora, base_checkpoint_dir=base)


# ---- reading ---------------------------------------------------------------------------------------
def read_lora_config(lora_dir: Path) -> tuple[LoRAConfig, Optional[str]]:
    """The LoRA config of ``lora_dir`` and the base checkpoint dir it names (None if it names none)."""
    cfg = LoRAConfig.from_yaml(Path(lora_dir) / LORA_CONFIG_FILE)
    return cfg, cfg.base_checkpoint_dir


def load_lora(model: nn.Module, path_dir: str | os.PathLike) -> nn.Module:
    """Apply LoRA to a base ``model`` as ``path_dir/lora_config.yaml`` says and load ``lora.safetensors``.

    Tensors are cast to the LoRA parameters' dtype and device. Raises a one-line `LitModelError`
    naming the tensor when one is missing, unexpected, or has a shape that does not fit the model.
    """
    d = Path(path_dir)
    weights = d / LORA_WEIGHTS_FILE
    if not d.is_dir():
        raise LitModelError(f"LoRA dir {d} does not exist; pass the out dir of a LoRA finetuning run")
    cfg = LoRAConfig.from_yaml(d / LORA_CONFIG_FILE)
    if not weights.is_file():
        raise LitModelError(f"{weights} does not exist; pass the out dir of a LoRA finetuning run")
    if lora_modules(model):
        raise LitModelError("the model already has LoRA layers; load_lora needs a base model")
    state = mmap_safetensors(weights)
    apply_lora(model, targets=cfg.targets, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)
    try:
        _check_lora_tensors(model, state, cfg, weights)
    except LitModelError:
        remove_lora(model)  # leave the caller's base model as it was
        raise
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(t.to(dtype=params[name].dtype))
    return model


def _check_lora_tensors(model: nn.Module, state: dict[str, torch.Tensor], cfg: LoRAConfig, weights: Path) -> None:
    expected = lora_state_dict(model)
    for name, t in state.items():
        if name not in expected:
            raise LitModelError(f"{weights}: unexpected tensor {name!r}; the adapter does not belong to this base "
                                f"model or to targets {list(cfg.targets)} in {LORA_CONFIG_FILE}")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise LitModelError(f"{weights}: tensor {name!r} has shape {tuple(t.shape)} but the base model with "
                                f"r={cfg.r}, targets {list(cfg.targets)} needs {tuple(expected[name].shape)}; the adapter "
                                f"was trained for another base model, rank or targets")
    missing = [n for n in expected if n not in state]
    if missing:
        raise LitModelError(f"{weights}: tensor {missing[0]!r} is missing ({len(missing)} missing in all); "
                            f"the file does not match targets {list(cfg.targets)} in {LORA_CONFIG_FILE}")


# ---- merging ---------------------------------------------------------------------------------------
def merged_model(base_checkpoint_dir: Path, lora_dir: Path) -> nn.Module:
    """The base model (in its stored dtype, on CPU) with the adapter of ``lora_dir`` folded in. A QLoRA adapter
    (``quantize: nf4`` in its config) is folded into the NF4-rounded base it was trained against."""
    model = load_model(base_checkpoint_dir)
    if LoRAConfig.from_yaml(Path(lora_dir) / LORA_CONFIG_FILE).quantize == "nf4":
        round_trip_nf4_(model)
    load_lora(model, lora_dir)
    return merge_lora(model)


def write_merged(lora_dir: Path, base_checkpoint_dir: Path, out_dir: Path) -> None:
    """Write the merged model's files (weights, model_config.yaml, tokenizer) into the existing dir ``out_dir``."""
    model = merged_model(base_checkpoint_dir, lora_dir)
    save_safetensors(model_state_for_saving(model), Path(out_dir) / MODEL_FILE)
    model.config.to_yaml(Path(out_dir) / CONFIG_FILE)
    copy_tokenizer_files(base_checkpoint_dir, out_dir)


def merge_lora_checkpoint(checkpoint_dir: Path, base_checkpoint_dir: Optional[Path] = None,
                          out_dir: Optional[Path] = None) -> Path:
    """Merge the adapter in ``checkpoint_dir`` into its base and write a complete checkpoint dir to ``out_dir``
    (default: ``checkpoint_dir`` itself, replaced atomically; the adapter files are kept)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise LitModelError(f"{checkpoint_dir} does not exist; pass the out_dir/final of a LoRA finetuning run")
    if not (checkpoint_dir / LORA_WEIGHTS_FILE).is_file():
        raise LitModelError(f"{checkpoint_dir} has no {LORA_WEIGHTS_FILE}; pass the out_dir/final of a LoRA "
                            "finetuning run")
    lora_cfg, named_base = read_lora_config(checkpoint_dir)
    base = base_checkpoint_dir or named_base
    if base is None:
        raise LitModelError(f"{checkpoint_dir / LORA_CONFIG_FILE} names no base model; pass --base_checkpoint_dir")
    base = Path(base)
    if not base.is_dir():
        hint = "" if base_checkpoint_dir else f" (named by {checkpoint_dir / LORA_CONFIG_FILE})"
        raise LitModelError(f"base checkpoint dir {base}{hint} does not exist; pass --base_checkpoint_dir")
    check_checkpoint_dir(base)
    if base.resolve() == checkpoint_dir.resolve():
        raise LitModelError(f"--base_checkpoint_dir {base} is the LoRA dir itself; pass the model it was trained on")
    out_dir = Path(out_dir) if out_dir is not None else checkpoint_dir
    with atomic_dir(out_dir) as tmp:
        shutil.copy2(checkpoint_dir / LORA_WEIGHTS_FILE, tmp / LORA_WEIGHTS_FILE)
        write_lora_config(tmp, lora_cfg, base)
        write_merged(tmp, base, tmp)
    return out_dir
