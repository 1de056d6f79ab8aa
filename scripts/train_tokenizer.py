"""Train a byte-level BPE or SentencePiece tokenizer on text files.

    python scripts/train_tokenizer.py --data_dir data/ --out_dir checkpoints/my-tok --vocab_size 8192
    python scripts/train_tokenizer.py --data_dir corpus.txt --kind sentencepiece --sp_model_type unigram \\
        --vocab_size 4096 --out_dir checkpoints/my-sp-tok

Writes ``tokenizer.json`` (bpe) or ``tokenizer.model`` (sentencepiece), ``tokenizer_config.json`` and
``generation_config.json`` into ``--out_dir`` atomically; the directory loads with ``litmodel.tokenizer.Tokenizer``
and ``transformers.AutoTokenizer``. ``--config x.yaml`` / ``--print_config`` work as in every litmodel script.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from litmodel.cli import cli_main
from litmodel.tokenizer import train_tokenizer


def main(
    data_dir: list[str] | str,
    out_dir: Path,
    kind: Literal["bpe", "sentencepiece"] = "bpe",
    vocab_size: int = 8192,
    special_tokens: list[str] | None = None,
    glob: str = "**/*.txt",
    sp_model_type: Literal["bpe", "unigram"] = "bpe",
    min_frequency: int = 2,
    max_bytes: int | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    add_bos_token: bool | None = None,
    overwrite: bool = False,
) -> None:
    """Train a tokenizer and write it to ``out_dir``.

    Args:
        data_dir: A text file or directory (searched recursively with ``glob``), or a list of them:
            ``--data_dir data/``, ``--data_dir '[a.txt, more/]'``.
        out_dir: Output directory; must not exist or be empty unless ``--overwrite true``.
        kind: ``bpe`` (byte-level BPE, tokenizer.json) or ``sentencepiece`` (tokenizer.model, byte fallback).
        vocab_size: Vocabulary size, special tokens and the 256 byte tokens included.
        special_tokens: Special tokens, given the first ids. Default: ``<|endoftext|>`` (bos = eos) for bpe;
            ``<unk>``, ``<s>``, ``</s>``, ``<pad>`` for sentencepiece.
        glob: Pattern of the files to read under each directory of ``data_dir``.
        sp_model_type: SentencePiece algorithm: ``bpe`` or ``unigram``.
        min_frequency: Minimum pair frequency for a BPE merge (bpe kind).
        max_bytes: Read at most this many bytes of text (for speed); default: all.
        bos_token: BOS token (default: ``<s>``/``<|begin_of_text|>``-like special token, else the eos token).
        eos_token: EOS token (default: ``</s>``/``<|endoftext|>``-like special token, else the first one).
        pad_token: Padding token (default: ``<pad>``-like special token, else none).
        add_bos_token: Whether encoding adds BOS by default (default: false for bpe, true for sentencepiece).
        overwrite: Replace a non-empty ``out_dir``.
    """
    train_tokenizer(
        data_dir,
        out_dir,
        kind=kind,
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        glob=glob,
        sp_model_type=sp_model_type,
        min_frequency=min_frequency,
        max_bytes=max_bytes,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        add_bos_token=add_bos_token,
        overwrite=overwrite,
        show_progress=True,
    )


def setup() -> None:
    from jsonargparse import CLI

    CLI(main, as_positional=False)


if __name__ == "__main__":
    cli_main(setup)()
