"""Pretrain a GPT-family model (GPT-2, GPT-NeoX/Pythia) from scratch.

    python pretrain/gpt.py                                          # offline CPU default: configs/pretrain/default.yaml
    python pretrain/gpt.py --config configs/pretrain/gpt2-124m.yaml --devices 8

The recipe itself is litmodel/pretrain.py (shared with pretrain/llama.py): read it top to bottom.
"""

from pathlib import Path

from litmodel.cli import cli_main
from litmodel.pretrain import setup

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    cli_main(setup)("gpt", ROOT / "configs" / "pretrain" / "default.yaml", description=__doc__)
