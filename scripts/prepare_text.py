r"""Tokenise a directory of text files into train/val token shards for pretraining.

    python scripts/prepare_text.py --input_dir my_corpus --tokenizer_dir checkpoints/my-tokenizer \
        --out_dir data/my_corpus

Every file under --input_dir (recursively) ending in one of --extensions is one document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from litmodel.cli import cli_main
from litmodel.data import DEFAULT_SEED, DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, prepare_corpus, text_dir_corpus


def main(
    input_dir: Path,
    tokenizer_dir: Path,
    out_dir: Path = Path("data/text"),
    extensions: list[str] = [".txt", ".md"],
    val_fraction: float = DEFAULT_VAL_FRACTION,
    num_workers: Optional[int] = None,
    seed: int = DEFAULT_SEED,
    dtype: Literal["auto", "uint16", "uint32"] = "auto",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    block_size: Optional[int] = None,
    max_files: Optional[int] = None,
    max_bytes: Optional[int] = None,
) -> None:
    """Tokenise a directory of text files into <out_dir>/train and <out_dir>/val token shards.

    Args:
        input_dir: Directory searched recursively for text files (one document per file).
        tokenizer_dir: Directory with tokenizer.json or tokenizer.model (a tokenizer or checkpoint dir).
        out_dir: Output data dir; gets train/ and val/ (replaced atomically if it was prepared before).
        extensions: File name endings to include.
        val_fraction: Approximate fraction of documents that go to val (by a stable hash of the file path).
        num_workers: Tokeniser processes (default: min(2, cpu_count)).
        seed: Seed of the train/val split hash.
        dtype: Token dtype on disk; auto = uint16 when the vocabulary has <= 65536 ids, else uint32.
        shard_tokens: Tokens per shard file.
        block_size: If set, fail unless the train split holds one sequence of block_size + 1 tokens.
        max_files: Use only the first N files (sorted by path).
        max_bytes: Use files (sorted by path) until their total size reaches this many bytes.
    """
    corpus = text_dir_corpus(input_dir, extensions, max_files=max_files, max_bytes=max_bytes)
    indexes = prepare_corpus(corpus, tokenizer_dir, out_dir, val_fraction=val_fraction, dtype=dtype,
                             shard_tokens=shard_tokens, num_workers=num_workers, seed=seed, block_size=block_size)
    print_summary(out_dir, indexes)


def print_summary(out_dir: Path, indexes: dict) -> None:
    for split, index in indexes.items():
        print(f"{split}: {index['num_documents']} documents, {index['num_tokens']} tokens ({index['dtype']}) "
              f"in {len(index['shards'])} shard(s) -> {Path(out_dir) / split}")


def setup(argv: Optional[list[str]] = None) -> None:
    from litmodel.cli import parse_function_args

    main(**parse_function_args(main, argv, __doc__))


if __name__ == "__main__":
    cli_main(setup)()
