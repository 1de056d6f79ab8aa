r"""Tokenise the embedded default corpus, the .py files of the running Python's standard library,
into train/val token shards for pretraining.

    python scripts/prepare_stdlib.py --tokenizer_dir checkpoints/my-tokenizer --out_dir data/stdlib
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from litmodel.cli import cli_main, parse_function_args
from litmodel.data import prepare_and_report, stdlib_corpus


def main(
    tokenizer_dir: Path,
    out_dir: Path = Path("data/stdlib"),
    exclude_tests: bool = True,
    max_files: Optional[int] = None,
    max_bytes: Optional[int] = None,
    **prepare_options: Any,
) -> None:
    """Tokenise the Python standard library's .py files into <out_dir>/train and <out_dir>/val token shards.

    Args:
        tokenizer_dir: Directory with tokenizer.json or tokenizer.model (a tokenizer or checkpoint dir).
        out_dir: Output data dir; gets train/ and val/ (replaced atomically if it was prepared before).
        exclude_tests: Skip the test/, tests/ and idle_test/ directories (site-packages is always skipped).
        max_files: Use only the first N files (sorted by path).
        max_bytes: Use files (sorted by path) until their total size reaches this many bytes.
        prepare_options: --val_fraction, --num_workers, --seed, --dtype, --shard_tokens, --block_size: see
            litmodel.data.prepare.prepare_and_report (the flags are listed below).
    """
    corpus = stdlib_corpus(exclude_tests=exclude_tests, max_files=max_files, max_bytes=max_bytes)
    prepare_and_report(corpus, tokenizer_dir, out_dir, **prepare_options)


def setup(argv: Optional[list[str]] = None) -> None:
    main(**parse_function_args(main, argv, __doc__))


if __name__ == "__main__":
    cli_main(setup)()
