"""Finetuning under FSDP without any rank holding the whole model.

The recipe builds the model (and its LoRA layers) on the meta device, ``fabric.setup`` shards it
and allocates only this rank's shards, and ``fill_from_checkpoint`` then reads each tensor's local
rows from ``model.safetensors``. LoRA weights (not in the checkpoint) are initialised from the RNG
state taken before ``apply_lora``, drawing the full matrices exactly as ``apply_lora`` does on a
real model, so a sharded run starts from the same adapters as a one-process run.

```python
model = load_model(checkpoint_dir, device="meta", dtype=dtype)
lora_rng = torch.get_rng_state()
apply_lora(model, ...); mark_only_lora_as_trainable(model)
model = fabric.setup(model)
fill_from_checkpoint(model, checkpoint_dir, lora_rng)
```
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from litmodel.checkpoint import MODEL_FILE
from litmodel.fabric.sharded_load import copy_full_into, load_safetensors_sharded
from litmodel.utils import LitModelError


@torch.no_grad()
def fill_from_checkpoint(model: nn.Module, checkpoint_dir: str | Path, lora_rng: torch.Tensor | None = None) -> None:
    """Load ``checkpoint_dir/model.safetensors`` into a set-up (sharded) model, then initialise its
    LoRA weights from ``lora_rng`` (the CPU RNG state before ``apply_lora``). Leaves the CPU RNG
    where ``apply_lora`` on a real model would have left it."""
    module = getattr(model, "module", model)
    path = Path(checkpoint_dir) / MODEL_FILE
    missing = load_safetensors_sharded(module, path)
    lora = [m for m in module.modules() if hasattr(m, "reset_lora_parameters")]  # LoRALinear, LoRAGroupedLinear
    unexpected = [n for n in missing if n.rsplit(".", 1)[-1] not in ("lora_A", "lora_B")]
    if unexpected:
        raise LitModelError(f"{path} has no tensor {unexpected[0]!r} ({len(unexpected)} missing in all); "
                            "the checkpoint does not match model_config.yaml")
    if not lora:
        return
    if lora_rng is None:
        raise LitModelError("the model has LoRA layers but no RNG state to initialise them from; pass the "
                            "torch.get_rng_state() taken before apply_lora")
    torch.set_rng_state(lora_rng)
    for m in lora:  # in apply_lora's order, full matrices in the parameter dtype, the layer's own init: the same draws
        a = torch.empty(m.lora_A.shape, dtype=m.lora_A.dtype)
        b = torch.empty(m.lora_B.shape, dtype=m.lora_B.dtype)
        type(m).reset_lora_parameters(SimpleNamespace(lora_A=a, lora_B=b))
        copy_full_into(m.lora_A, a)
        copy_full_into(m.lora_B, b)
