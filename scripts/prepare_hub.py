r"""Tokenise a dataset repo from the Hugging Face Hub into train/val token shards for pretraining.

    python scripts/prepare_hub.py --repo_id org/name --tokenizer_dir checkpoints/my-tokenizer \
        --out_dir data/name

Files are fetched with huggingface_hub.snapshot_download(repo_type="dataset", allow_patterns=--patterns)
(HF_HOME / HF_HUB_OFFLINE are honoured: offline, the local cache is used). Documents: a .txt file is
one; a .jsonl line, a .json record, a .parquet row (needs pyarrow) is one, its text under --text_key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from litmodel.cli import cli_main
from litmodel.data import DEFAULT_SEED, DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, hub_corpus, prepare_corpus
from litmodel.data.sources import DEFAULT_HUB_PATTERNS


def main(
    repo_id: str,
    tokenizer_dir: Path,
    out_dir: Optional[Path] = None,
    text_key: str = "text",
    patterns: list[str] = list(DEFAULT_HUB_PATTERNS),
    revision: Optional[str] = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    num_workers: Optional[int] = None,
    seed: int = DEFAULT_SEED,
    dtype: Literal["auto", "uint16", "uint32"] = "auto",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    block_size: Optional[int] = None,
    max_files: Optional[int] = None,
    max_bytes: Optional[int] = None,
) -> None:
    """Tokenise a Hub dataset repo into <out_dir>/train and <out_dir>/val token shards.

    Args:
        repo_id: Dataset repo on the Hub, as org/name.
        tokenizer_dir: Directory with tokenizer.json or tokenizer.model (a tokenizer or checkpoint dir).
        out_dir: Output data dir (default: data/<name>); gets train/ and val/, replaced atomically.
        text_key: Field (.jsonl/.json) or column (.parquet) holding each document's text.
        patterns: Repo paths to fetch and read (fnmatch patterns, as snapshot_download's allow_patterns).
        revision: Branch, tag or commit (default: main).
        val_fraction: Approximate fraction of documents that go to val (by a stable hash of path:record).
        num_workers: Tokeniser processes (default: min(2, cpu_count)).
        seed: Seed of the train/val split hash.
        dtype: Token dtype on disk; auto = uint16 when the vocabulary has <= 65536 ids, else uint32.
        shard_tokens: Tokens per shard file.
        block_size: If set, fail unless the train split holds one sequence of block_size + 1 tokens.
        max_files: Read only the first N matching files (sorted by path).
        max_bytes: Read matching files (sorted by path) until their total size reaches this many bytes.
    """
    out_dir = Path("data") / repo_id.split("/")[-1] if out_dir is None else out_dir
    corpus = hub_corpus(repo_id, text_key=text_key, patterns=patterns, revision=revision,
                        max_files=max_files, max_bytes=max_bytes)
    indexes = prepare_corpus(corpus, tokenizer_dir, out_dir, val_fraction=val_fraction, dtype=dtype,
                             shard_tokens=shard_tokens, num_workers=num_workers, seed=seed, block_size=block_size)
    for split, index in indexes.items():
        print(f"{split}: {index['num_documents']} documents, {index['num_tokens']} tokens ({index['dtype']}) "
              f"in {len(index['shards'])} shard(s) -> {out_dir / split}")


def setup(argv: Optional[list[str]] = None) -> None:
    from litmodel.cli import parse_function_args

    main(**parse_function_args(main, argv, __doc__))


if __name__ == "__main__":
    cli_main(setup)()
