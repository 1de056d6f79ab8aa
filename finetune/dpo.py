"""Preference-tune a model with DPO (direct preference optimisation) on prompt / chosen / rejected pairs.

    python finetune/dpo.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \\
        --data JSON --data.json_path prefs.json --out_dir out/finetune/smollm2-dpo
    python finetune/dpo.py --checkpoint_dir out/finetune/smollm2-lora/final --data JSON --data.json_path prefs.json \\
        --method full --dpo.beta 0.1 --dpo.precompute_reference true --devices 2 --strategy fsdp

Records are TRL's: {"prompt": str or chat messages, "chosen": str or assistant message, "rejected": ...}.
out_dir/final/ is written as by finetune/lora.py and finetune/full.py (LoRA: lora.safetensors + the merged
model), so generate/chat.py, scripts/convert_lit_checkpoint.py and evaluation read it as is.
The recipe itself is litmodel/finetune_dpo.py: read it top to bottom. The loss: litmodel/dpo.py.
"""

from litmodel.cli import cli_main
from litmodel.finetune_dpo import setup

if __name__ == "__main__":
    cli_main(setup)(description=__doc__)
