"""Train a byte-level BPE or SentencePiece tokenizer on text files.

    python scripts/train_tokenizer.py --data_dir data/ --out_dir checkpoints/my-tok --vocab_size 8192
    python scripts/train_tokenizer.py --data_dir corpus.txt --kind sentencepiece --sp_model_type unigram \\
        --vocab_size 4096 --out_dir checkpoints/my-sp-tok

Writes ``tokenizer.json`` (bpe) or ``tokenizer.model`` (sentencepiece), ``tokenizer_config.json`` and
``generation_config.json`` into ``--out_dir`` atomically; the directory loads with ``litmodel.tokenizer.Tokenizer``
and ``transformers.AutoTokenizer``. The flags are the arguments of ``litmodel.tokenizer_training.train_tokenizer``.
``--config x.yaml`` / ``--print_config`` work as in every litmodel script.
"""

from __future__ import annotations

from jsonargparse import CLI

from litmodel.tokenizer_training import train_tokenizer
from litmodel.cli import cli_main


def setup() -> None:
    CLI(train_tokenizer, as_positional=False)


if __name__ == "__main__":
    cli_main(setup)()
