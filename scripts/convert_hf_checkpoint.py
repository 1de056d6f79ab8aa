r"""Convert a Hugging Face model dir into a litmodel checkpoint dir.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir path/to/hf_dir --out_dir checkpoints/org/name

Reads config.json and the weights (model.safetensors, sharded safetensors with
model.safetensors.index.json, or pytorch_model.bin [sharded]), streams them tensor by tensor into
<out_dir>/model.safetensors (litmodel names), writes <out_dir>/model_config.yaml and copies the
tokenizer files. Outputs are renamed into place only when complete.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also works from a checkout without install

from litmodel.hf import convert_hf_checkpoint
from litmodel.utils import cli_main


def main(
    checkpoint_dir: Path,
    out_dir: Optional[Path] = None,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
) -> Path:
    """Convert a Hugging Face checkpoint dir into a litmodel checkpoint dir.

    Args:
        checkpoint_dir: Hugging Face model dir (config.json + safetensors or pytorch_model.bin weights).
        out_dir: Where the litmodel checkpoint is written (default: checkpoint_dir itself).
        dtype: Cast floating-point weights to this dtype (default: keep each tensor's dtype).
    """
    return convert_hf_checkpoint(checkpoint_dir, out_dir, dtype=dtype, verbose=True)


def setup(argv: Optional[list[str]] = None) -> None:
    from litmodel.cli import parse_function_args

    main(**parse_function_args(main, argv, __doc__))


if __name__ == "__main__":
    cli_main(setup)()
