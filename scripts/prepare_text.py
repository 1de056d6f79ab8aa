r"""Tokenise a directory of text files into train/val token shards for pretraining.

    python scripts/prepare_text.py --input_dir my_corpus --tokenizer_dir checkpoints/my-tokenizer \
        --out_dir data/my_corpus

Every file under --input_dir (recursively) ending in one of --extensions is one document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from litmodel.cli import cli_main, parse_function_args
from litmodel.data import prepare_and_report, text_dir_corpus


def main(
    input_dir: Path,
    tokenizer_dir: Path,
    out_dir: Path = Path("data/text"),
    extensions: list[str] = [".txt", ".md"],
    max_files: Optional[int] = None,
    max_bytes: Optional[int] = None,
    **prepare_options: Any,
) -> None:
    """Tokenise a directory of text files into <out_dir>/train and <out_dir>/val token shards.

    Args:
        input_dir: Directory searched recursively for text files (one document per file).
        tokenizer_dir: Directory with tokenizer.json or tokenizer.model (a tokenizer or checkpoint dir).
        out_dir: Output data dir; gets train/ and val/ (replaced atomically if it was prepared before).
        extensions: File name endings to include.
        max_files: Use only the first N files (sorted by path).
        max_bytes: Use files (sorted by path) until their total size reaches this many bytes.
        prepare_options: --val_fraction, --num_workers, --seed, --dtype, --shard_tokens, --block_size: see
            litmodel.data.prepare.prepare_and_report (the flags are listed below).
    """
    corpus = text_dir_corpus(input_dir, extensions, max_files=max_files, max_bytes=max_bytes)
    prepare_and_report(corpus, tokenizer_dir, out_dir, **prepare_options)


def setup(argv: Optional[list[str]] = None) -> None:
    main(**parse_function_args(main, argv, __doc__))


if __name__ == "__main__":
    cli_main(setup)()
