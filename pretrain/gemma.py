"""Pretrain a Gemma-family model (Gemma 2, Gemma 3 text shapes) from scratch.

    python pretrain/gemma.py --model_name gemma-3-1b-pt --train.max_steps 100     # a registry shape
    python pretrain/gemma.py --config my-gemma.yaml                               # or your own config

The recipe itself is litmodel/pretrain.py (shared with pretrain/gpt.py and pretrain/llama.py): read it top to bottom.
"""

from litmodel.cli import cli_main
from litmodel.pretrain import setup

if __name__ == "__main__":
    cli_main(setup)("gemma", None, description=__doc__)
