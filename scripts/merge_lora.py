r"""Merge a LoRA adapter into its base model: a plain checkpoint dir for the generate and convert scripts.

    python scripts/merge_lora.py --checkpoint_dir out/finetune/lora/final
    python scripts/merge_lora.py --checkpoint_dir out/finetune/lora/final \
        --base_checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --out_dir out/merged

Reads lora.safetensors + lora_config.yaml (written by finetune/lora.py, e.g. with --merge false), loads the
base model (by default the base_checkpoint_dir named in lora_config.yaml) in its stored dtype, folds
W += (alpha / r) * B @ A into the weights and writes model.safetensors + model_config.yaml + the tokenizer
files. By default the merged files go into --checkpoint_dir itself (replaced atomically, adapter kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from litmodel.cli import cli_main


def main(checkpoint_dir: Path, base_checkpoint_dir: Optional[Path] = None, out_dir: Optional[Path] = None) -> Path:
    """Merge a LoRA adapter into its base model.

    Args:
        checkpoint_dir: Dir with lora.safetensors + lora_config.yaml (out_dir/final of a LoRA finetuning run).
        base_checkpoint_dir: The base model's checkpoint dir (default: base_checkpoint_dir in lora_config.yaml).
        out_dir: Where to write the merged checkpoint dir (default: checkpoint_dir, in place).
    """
    from litmodel.finetune import merge_lora_checkpoint

    out = merge_lora_checkpoint(checkpoint_dir, base_checkpoint_dir, out_dir)
    print(f"merged {checkpoint_dir} into {out}")
    return out


def setup(argv: Optional[list[str]] = None) -> None:
    from litmodel.cli import parse_function_args

    main(**parse_function_args(main, argv, __doc__))


if __name__ == "__main__":
    cli_main(setup)()
