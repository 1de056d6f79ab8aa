"""Finetune every weight of a model on instruction/chat data.

    python finetune/full.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct \\
        --data JSON --data.json_path my_data.json --out_dir out/finetune/smollm2-full
    python finetune/full.py --config configs/finetune/smollm2-135m-full.yaml --data.json_path my_data.json

out_dir/final/ is a checkpoint dir (model.safetensors + model_config.yaml + tokenizer files) that
generate/base.py, generate/chat.py and scripts/convert_lit_checkpoint.py read as is.
The recipe itself is litmodel/finetune.py (shared with finetune/lora.py): read it top to bottom.
"""

from litmodel.cli import cli_main
from litmodel.finetune import setup

if __name__ == "__main__":
    cli_main(setup)("full", description=__doc__)
