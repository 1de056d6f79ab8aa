"""Finetune a model with LoRA (low-rank adapters on frozen weights) on instruction/chat data.

    python finetune/lora.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \\
        --data JSON --data.json_path my_data.json --out_dir out/finetune/smollm2-lora
    python finetune/lora.py --config configs/finetune/smollm2-135m-lora.yaml --data.json_path my_data.json
    python finetune/lora.py --config configs/finetune/qwen2.5-1.5b-lora.yaml --devices 2 --strategy fsdp ...

out_dir/final/ holds lora.safetensors + lora_config.yaml and (unless --merge false) the merged model, a
checkpoint dir that generate/base.py, generate/chat.py and scripts/convert_lit_checkpoint.py read as is.
The recipe itself is litmodel/finetune.py (shared with finetune/full.py): read it top to bottom.
"""

from litmodel.cli import cli_main
from litmodel.finetune import setup

if __name__ == "__main__":
    cli_main(setup)("lora", description=__doc__)
