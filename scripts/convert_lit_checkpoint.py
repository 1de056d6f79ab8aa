r"""Export a litmodel checkpoint dir as a Hugging Face model dir.

    python scripts/convert_lit_checkpoint.py --checkpoint_dir checkpoints/org/name --out_dir hf/name

Writes config.json, model.safetensors (sharded with model.safetensors.index.json above
--max_shard_size), generation_config.json and the tokenizer files, so that
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)` gives the same logits.

    python scripts/convert_lit_checkpoint.py --checkpoint_dir out/finetune/lora/final --out_dir adapter --format peft

exports the LoRA adapter of a LoRA finetuning output as a PEFT adapter dir (adapter_model.safetensors +
adapter_config.json): `peft.PeftModel.from_pretrained(hf_base_model, "adapter")`, vLLM's LoRA support.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from litmodel.cli import cli_main, parse_function_args
from litmodel.hf import convert_lit_checkpoint
from litmodel.peft_io import export_peft


def main(
    checkpoint_dir: Path,
    out_dir: Path,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
    max_shard_size: Union[int, str] = "5GB",
    format: Literal["hf", "peft"] = "hf",
    base_checkpoint_dir: Optional[Path] = None,
) -> Path:
    """Export a litmodel checkpoint dir as a Hugging Face model dir.

    Args:
        checkpoint_dir: litmodel checkpoint dir (model.safetensors + model_config.yaml).
        out_dir: The Hugging Face dir to write (must differ from checkpoint_dir).
        dtype: Cast floating-point weights to this dtype (default: keep each tensor's dtype).
        max_shard_size: Largest safetensors file, in bytes or like 500MB / 5GB; larger models are sharded.
        format: hf (a full Hugging Face model dir) or peft (only the LoRA adapter of a LoRA finetuning output, in
            PEFT's format, for the Hugging Face base model it was trained on).
        base_checkpoint_dir: With --format peft: the base model the adapter was trained on (default: the one named in
            lora_config.yaml); its Hub repo id becomes base_model_name_or_path.
    """
    if format == "peft":
        out = export_peft(checkpoint_dir, out_dir, base_checkpoint_dir)
        print(f"wrote PEFT adapter {out}")
        return out
    return convert_lit_checkpoint(checkpoint_dir, out_dir, dtype=dtype, max_shard_size=max_shard_size, verbose=True)


def setup(argv: Optional[list[str]] = None) -> None:
    main(**parse_function_args(main, argv, __doc__))


if __name__ == "__main__":
    cli_main(setup)()
