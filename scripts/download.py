r"""Download a model from the Hugging Face Hub and convert it into checkpoints/<org>/<name>/.

    python scripts/download.py --repo_id HuggingFaceTB/SmolLM2-135M
    python scripts/download.py --repo_id list          # the models litmodel knows by name
    HF_HUB_OFFLINE=1 python scripts/download.py --repo_id EleutherAI/pythia-70m   # from the local Hub cache

Fetches config.json, the tokenizer files and the weights (safetensors preferred over .bin) into the
Hub cache (HF_HOME / HF_HUB_CACHE), then converts them. Gated models (Llama, Mistral) need their
license accepted on the Hub page and a token: --access_token or the HF_TOKEN environment variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from litmodel.hub import download, registry_table
from litmodel.cli import cli_main, parse_function_args


def main(
    repo_id: str,
    access_token: Optional[str] = None,
    checkpoint_dir: Path = Path("checkpoints"),
    tokenizer_only: bool = False,
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
) -> Optional[Path]:
    """Download a Hub model and convert it into <checkpoint_dir>/<org>/<name>.

    Args:
        repo_id: Hub id like EleutherAI/pythia-70m, a registry name like pythia-70m, or "list" to print the registry.
        access_token: Hugging Face token for gated/private repos (default: the HF_TOKEN environment variable).
        checkpoint_dir: Root dir of the checkpoints; the model goes to <checkpoint_dir>/<org>/<name>.
        tokenizer_only: Only fetch the tokenizer files (no weights, no conversion).
        dtype: Cast floating-point weights to this dtype while converting (default: keep the checkpoint's).
    """
    if repo_id == "list":
        print(registry_table())
        return None
    return download(repo_id, checkpoint_dir, access_token=access_token, tokenizer_only=tokenizer_only, dtype=dtype)


def setup(argv: Optional[list[str]] = None) -> None:
    main(**parse_function_args(main, argv, __doc__))


if __name__ == "__main__":
    cli_main(setup)()
