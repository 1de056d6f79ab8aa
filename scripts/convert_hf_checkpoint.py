r"""Convert a Hugging Face model dir into a litmodel checkpoint dir.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir path/to/hf_dir --out_dir checkpoints/org/name

Reads config.json and the weights (model.safetensors, sharded safetensors with
model.safetensors.index.json, or pytorch_model.bin [sharded]), streams them tensor by tensor into
<out_dir>/model.safetensors (litmodel names), writes <out_dir>/model_config.yaml and copies the
tokenizer files. Outputs are renamed into place only when complete.

    python scripts/convert_hf_checkpoint.py --peft_adapter path/to/adapter --base_checkpoint_dir checkpoints/org/name \
        --out_dir out/imported-lora

reads a PEFT LoRA adapter dir (adapter_config.json + adapter_model.safetensors) as a litmodel LoRA dir
(lora.safetensors + lora_config.yaml + the merged model), equal to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from litmodel.cli import cli_main, parse_function_args
from litmodel.hf import convert_hf_checkpoint
from litmodel.peft_io import import_peft
from litmodel.utils import LitModelError


def main(
    checkpoint_dir: Optional[Path] = None,
    out_dir: Optional[Path] = None,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
    peft_adapter: Optional[Path] = None,
    base_checkpoint_dir: Optional[Path] = None,
    merge: bool = True,
) -> Path:
    """Convert a Hugging Face checkpoint dir into a litmodel checkpoint dir.

    Args:
        checkpoint_dir: Hugging Face model dir (config.json + safetensors or pytorch_model.bin weights).
        out_dir: Where the litmodel checkpoint is written (default: checkpoint_dir itself).
        dtype: Cast floating-point weights to this dtype (default: keep each tensor's dtype).
        peft_adapter: Instead, import this PEFT LoRA adapter dir as a litmodel LoRA dir (needs --base_checkpoint_dir
            and --out_dir).
        base_checkpoint_dir: With --peft_adapter: the litmodel checkpoint dir of the adapter's base model.
        merge: With --peft_adapter: also write the merged model into out_dir (so the generate scripts use it as is).
    """
    if peft_adapter is not None:
        if base_checkpoint_dir is None or out_dir is None:
            raise LitModelError("--peft_adapter needs --base_checkpoint_dir (the litmodel checkpoint of the adapter's "
                                "base model) and --out_dir")
        out = import_peft(peft_adapter, base_checkpoint_dir, out_dir, merge=merge)
        print(f"wrote litmodel LoRA dir {out}")
        return out
    if checkpoint_dir is None:
        raise LitModelError("pass --checkpoint_dir (a Hugging Face model dir) or --peft_adapter")
    return convert_hf_checkpoint(checkpoint_dir, out_dir, dtype=dtype, verbose=True)


def setup(argv: Optional[list[str]] = None) -> None:
    main(**parse_function_args(main, argv, __doc__))


if __name__ == "__main__":
    cli_main(setup)()
