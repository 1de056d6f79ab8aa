"""Training state on disk: where the resumable ``out_dir/step-XXXXXX.pt`` files (``step-XXXXXX/`` DCP dirs under
FSDP) go, which one a run resumes from, pruning old ones; gathering a model's whole (or only its trainable,
e.g. LoRA) state across ranks for saving; the LoRA resume hooks; and the final checkpoint dir a run writes."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from litmodel.checkpoint import save_checkpoint_dir
from litmodel.config import Config
from litmodel.fabric import Fabric
from litmodel.lora import LoRAConfig
from litmodel.utils import LitModelError

STEP_STATE_NAME = re.compile(r"^step-(\d{6,})(\.pt)?$")  # a file (one process) or a DCP dir (FSDP)


def step_state_path(out_dir: Path, step: int, sharded: bool = False) -> Path:
    """Where the resumable state of ``step`` lives: ``step-XXXXXX.pt`` (one file) or ``step-XXXXXX/`` (FSDP shards)."""
    return Path(out_dir) / (f"step-{step:06d}" if sharded else f"step-{step:06d}.pt")


def latest_step_state(out_dir: Path) -> Path | None:
    """The newest complete ``step-XXXXXX.pt`` file or ``step-XXXXXX/`` dir in ``out_dir`` (temp names never match)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in out_dir.iterdir() if (m := STEP_STATE_NAME.match(p.name)))
    return steps[-1][1] if steps else None


def resolve_resume(out_dir: Path, resume: str | bool | None) -> Path | None:
    """What to resume from: ``auto`` (the latest step dir, if any), a path, or nothing.

    Without ``--resume`` an out_dir that already holds a run is refused, so a new run never
    overwrites another one's checkpoints.
    """
    out_dir = Path(out_dir)
    if resume in (None, False, "", "none"):
        if latest_step_state(out_dir) is not None or (out_dir / "final").exists():
            raise LitModelError(f"{out_dir} already holds a run; pass --resume auto to continue it, "
                                "or choose another --out_dir")
        return None
    if resume in ("auto", True):
        return latest_step_state(out_dir)
    path = Path(resume)
    if not path.exists():
        raise LitModelError(f"--resume {path} does not exist; pass a step-XXXXXX dir under the out_dir or 'auto'")
    return path


def prune_step_states(out_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` step states, files or dirs (the oldest go only after a newer one is complete)."""
    steps = sorted((int(m.group(1)), p) for p in Path(out_dir).iterdir() if (m := STEP_STATE_NAME.match(p.name)))
    for _, p in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def full_model_state(fabric, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on global rank 0 (None elsewhere), gathered shard by shard
    under FSDP (collective: every rank must call it)."""
    module = getattr(model, "module", model)
    if fabric.strategy == "fsdp":
        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return sd if fabric.is_global_zero else None


def save_final_checkpoint(fabric, model: nn.Module, config: Config, out_dir: Path,
                          tokenizer_dir: Path | None, dtype: torch.dtype | None = None) -> None:
    """Write ``out_dir`` as a checkpoint dir (weights, model_config.yaml, tokenizer files) from rank 0."""
    state = full_model_state(fabric, model)
    if fabric.is_global_zero:
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_checkpoint_dir(out_dir, state, config, tokenizer_dir)
    fabric.barrier()


# ---- LoRA's resumable state: the trainable weights and their optimizer state, gathered -----------
def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) weights, gathered whole on CPU (collective under FSDP; filled on rank 0)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    sd = get_model_state_dict(model.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                     ignore_frozen_params=True))
    return {k: v for k, v in sd.items() if k in trainable}  # DSD keeps a frozen tied head (lm_head.weight)


def save_lora_state(fabric: Fabric, model, optimizer, path: Path, state: dict) -> None:
    """The loop's `save_fn` for LoRA: ``state`` plus the gathered trainable weights and their optimizer state."""
    state["lora_state"] = trainable_state(model)
    with fabric.allow_optimizer_step():  # DSD may run a zero-lr step to create the state
        state["optimizer_state"] = get_optimizer_state_dict(
            model.module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    fabric.save(path, state)
    state["lora_state"], state["optimizer_state"] = {}, {}


def load_lora_state(fabric: Fabric, model, optimizer, lora: LoRAConfig, path: Path, state: dict) -> None:
    """The loop's `load_fn` for LoRA: the counters into ``state``, the weights and optimizer state into place."""
    fabric.load(path, state)
    if dict(state["lora_config"]) != lora.to_dict():
        raise LitModelError(f"{path} was trained with LoRA {dict(state['lora_config'])} but this run asks for "
                            f"{lora.to_dict()}; pass the same --lora.* (and --quantize) flags to resume it")
    set_model_state_dict(model.module, dict(state["lora_state"]),
                         options=StateDictOptions(full_state_dict=True, strict=False))
    with fabric.allow_optimizer_step():  # DSD may run a zero-lr step to create the state
        set_optimizer_state_dict(model.module, optimizer, dict(state["optimizer_state"]),
                                 options=StateDictOptions(full_state_dict=True))
    state["lora_state"], state["optimizer_state"] = {}, {}
