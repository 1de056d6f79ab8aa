r"""Tokenise a dataset repo from the Hugging Face Hub into train/val token shards for pretraining.

    python scripts/prepare_hub.py --repo_id org/name --tokenizer_dir checkpoints/my-tokenizer \
        --out_dir data/name

Files are fetched with huggingface_hub.snapshot_download(repo_type="dataset", allow_patterns=--patterns)
(HF_HOME / HF_HUB_OFFLINE are honoured: offline, the local cache is used). Documents: a .txt file is
one; a .jsonl line, a .json record, a .parquet row (needs pyarrow) is one, its text under --text_key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from litmodel.cli import cli_main, parse_function_args
from litmodel.data import hub_corpus, prepare_and_report
from litmodel.data.sources import DEFAULT_HUB_PATTERNS


def main(
    repo_id: str,
    tokenizer_dir: Path,
    out_dir: Optional[Path] = None,
    text_key: str = "text",
    patterns: list[str] = list(DEFAULT_HUB_PATTERNS),
    revision: Optional[str] = None,
    max_files: Optional[int] = None,
    max_bytes: Optional[int] = None,
    **prepare_options: Any,
) -> None:
    """Tokenise a Hub dataset repo into <out_dir>/train and <out_dir>/val token shards.

    Args:
        repo_id: Dataset repo on the Hub, as org/name.
        tokenizer_dir: Directory with tokenizer.json or tokenizer.model (a tokenizer or checkpoint dir).
        out_dir: Output data dir (default: data/<name>); gets train/ and val/, replaced atomically.
        text_key: Field (.jsonl/.json) or column (.parquet) holding each document's text.
        patterns: Repo paths to fetch and read (fnmatch patterns, as snapshot_download's allow_patterns).
        revision: Branch, tag or commit (default: main).
        max_files: Read only the first N matching files (sorted by path).
        max_bytes: Read matching files (sorted by path) until their total size reaches this many bytes.
        prepare_options: --val_fraction, --num_workers, --seed, --dtype, --shard_tokens, --block_size: see
            litmodel.data.prepare.prepare_and_report (the flags are listed below).
    """
    out_dir = Path("data") / repo_id.split("/")[-1] if out_dir is None else out_dir
    corpus = hub_corpus(repo_id, text_key=text_key, patterns=patterns, revision=revision,
                        max_files=max_files, max_bytes=max_bytes)
    prepare_and_report(corpus, tokenizer_dir, out_dir, **prepare_options)


def setup(argv: Optional[list[str]] = None) -> None:
    main(**parse_function_args(main, argv, __doc__))


if __name__ == "__main__":
    cli_main(setup)()
