"""Pretrain a Llama-family model (Llama, TinyLlama, SmolLM2/3, Qwen2.5/3, Qwen3-MoE, Mixtral, Mistral, Phi-3/4, OLMo 2 shapes)
from scratch.

    python pretrain/llama.py                                        # offline CPU default: configs/pretrain/llama-default.yaml
    python pretrain/llama.py --config configs/pretrain/tinyllama-1.1b.yaml --devices 8 --num_nodes 4

The recipe itself is litmodel/pretrain.py (shared with pretrain/gpt.py): read it top to bottom.
"""

from pathlib import Path

from litmodel.cli import cli_main
from litmodel.pretrain import setup

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    cli_main(setup)("llama", ROOT / "configs" / "pretrain" / "llama-default.yaml", description=__doc__)
