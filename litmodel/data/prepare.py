"""Preparing a corpus: tokenise documents in worker processes, assign each to train or val, and write
both splits' token shards (`litmodel.data.shards`) into a data dir, atomically.

``prepare_corpus`` is the one path every prepare script and the pretraining recipe's default corpus
(``ensure_prepared``) take; ``prepare_and_report`` is the prepare scripts' shared tail (their
``--val_fraction``, ``--num_workers``, ... flags are its parameters).
"""

from __future__ import annotations

import collections
import hashlib
import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from litmodel.data.shards import (DEFAULT_SHARD_TOKENS, FORMAT, FORMAT_VERSION, INDEX_NAME, SPLITS, ShardWriter,
                                  choose_dtype, read_index, tokenizer_hash, train_tokenizer_hint, write_index)
from litmodel.tokenizer import load_tokenizer
from litmodel.atomic import atomic_dir
from litmodel.utils import LitModelError

DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SEED = 42


def default_num_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


# --------------------------------------------------------------------------------------------
# split assignment
# --------------------------------------------------------------------------------------------
def split_score(doc_id: str, seed: int = DEFAULT_SEED) -> float:
    """A stable pseudo-random number in [0, 1) for a document: same id and seed, same number."""
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def assign_splits(doc_ids: Sequence[str], val_fraction: float = DEFAULT_VAL_FRACTION,
                  seed: int = DEFAULT_SEED) -> list[str]:
    """The split ("train"/"val") ``prepare_corpus`` gives each document of ``doc_ids`` (in order).

    A document goes to val when ``split_score(doc_id, seed) < val_fraction``. Two fix-ups make the
    split usable on tiny corpora: with ``val_fraction > 0`` and no val document among >= 2
    documents, the last train document moves to val; with no train document, the last val
    document moves to train. (Empty documents are skipped by ``prepare_corpus`` and take no part.)
    """
    splits = ["val" if split_score(str(d), seed) < val_fraction else "train" for d in doc_ids]
    if val_fraction > 0 and "val" not in splits and len(splits) >= 2:
        splits[len(splits) - 1] = "val"  # the last document is a train document here
    if "train" not in splits and splits:
        splits[len(splits) - 1 - splits[::-1].index("val")] = "train"
    return splits


# --------------------------------------------------------------------------------------------
# prepare_corpus
# --------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_dir: str, dtype: str) -> None:
    try:
        tok = load_tokenizer(tokenizer_dir, train_tokenizer_hint(tokenizer_dir))
    except Exception as err:  # a failing Pool initializer would respawn forever: report it on the first task
        _WORKER.update(error=err)
        return
    _WORKER.update(tokenizer=tok, eos_id=tok.eos_id, dtype=np.dtype(dtype))


def _encode_texts(texts: list[str]) -> list[np.ndarray]:
    if "error" in _WORKER:
        raise _WORKER["error"]
    tok, eos_id, dtype = _WORKER["tokenizer"], _WORKER["eos_id"], _WORKER["dtype"]
    limit = np.iinfo(dtype).max
    out = []
    for text in texts:
        ids = np.asarray(tok.encode(text, bos=False, eos=False) + [eos_id], dtype=np.int64)
        if ids.max() > limit:
            raise LitModelError(f"token id {int(ids.max())} does not fit in {dtype.name}; prepare with --dtype uint32")
        out.append(ids.astype(dtype))
    return out


def _chunks(documents: Iterable[Any], max_docs: int, max_chars: int) -> Iterator[tuple[list[str], list[str]]]:
    ids: list[str] = []
    texts: list[str] = []
    chars = 0
    for i, doc in enumerate(documents):
        if isinstance(doc, str):
            doc_id, text = str(i), doc
        else:
            doc_id, text = doc
        if not isinstance(text, str):
            raise LitModelError(f"document {doc_id!r} is a {type(text).__name__}, not text; "
                                "give each document as a str")
        if not text:
            continue  # empty documents are skipped: they would only add a lone EOS
        ids.append(str(doc_id))
        texts.append(text)
        chars += len(text)
        if len(texts) >= max_docs or chars >= max_chars:
            yield ids, texts
            ids, texts, chars = [], [], 0
    if texts:
        yield ids, texts


class _SplitSink:
    """A ShardWriter that holds back its last document, so the split fix-ups can move it."""

    def __init__(self, writer: ShardWriter):
        self.writer = writer
        self.pending: np.ndarray | None = None
        self.num_documents = 0

    def add(self, tokens: np.ndarray) -> None:
        if self.pending is not None:
            self.writer.write(self.pending)
        self.pending = tokens
        self.num_documents += 1

    def take_pending(self) -> np.ndarray:
        tokens, self.pending = self.pending, None
        self.num_documents -= 1
        return tokens

    def close(self) -> None:
        if self.pending is not None:
            self.writer.write(self.pending)
            self.pending = None
        self.writer.close()


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a directory that is not a prepared data dir (it would be deleted)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise LitModelError(f"{out_dir} exists and is not a directory; choose another --out_dir")
    entries = [p.name for p in out_dir.iterdir()]
    if entries and not (set(entries) <= set(SPLITS) and all((out_dir / e / INDEX_NAME).is_file() for e in entries)):
        raise LitModelError(f"{out_dir} exists and is not a prepared data dir (it would be replaced); "
                            "choose another --out_dir or remove it")


def prepare_corpus(
    documents: Iterable[tuple[str, str]] | Iterable[str],
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    dtype: str = "auto",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_workers: int | None = None,
    seed: int = DEFAULT_SEED,
    source: str | None = None,
    block_size: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Tokenise ``documents`` into ``<out_dir>/train`` and ``<out_dir>/val`` token shards.

    ``documents`` yields ``(doc_id, text)`` pairs (or plain strings, whose id is their position); a
    ``Corpus`` from ``litmodel.data.sources`` also supplies ``source`` and the document count. Each
    document becomes ``encode(text, bos=False) + [eos_id]``; empty documents are skipped. The split
    is ``assign_splits(doc_ids, val_fraction, seed)``: deterministic, independent of
    ``num_workers``, and val is non-empty whenever there are >= 2 documents and ``val_fraction > 0``.
    ``num_workers`` processes (default ``min(2, cpu_count)``) tokenise, each loading the tokenizer
    once; the output order is the input order. With ``block_size``, fail unless the train split
    holds at least one sequence of ``block_size + 1`` tokens. An existing prepared ``out_dir`` is
    replaced atomically; on any error nothing is left behind. Returns ``{"train": index, "val": index}``.
    """
    tokenizer_dir = Path(tokenizer_dir)
    out_dir = Path(out_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise LitModelError(f"val_fraction must be in [0, 1), got {val_fraction}; pass e.g. --val_fraction 0.05")
    if block_size is not None and block_size < 1:
        raise LitModelError(f"block_size must be >= 1, got {block_size}")
    if shard_tokens < 1:
        raise LitModelError(f"shard_tokens must be >= 1, got {shard_tokens}; pass a positive --shard_tokens")
    num_workers = default_num_workers() if num_workers is None else max(1, int(num_workers))
    tok = load_tokenizer(tokenizer_dir, train_tokenizer_hint(tokenizer_dir))
    tok_hash = tokenizer_hash(tokenizer_dir)
    vocab_size = int(tok.vocab_size)
    eos_id = tok.eos_id
    if eos_id is None:
        raise LitModelError(f"the tokenizer in {tokenizer_dir} has no EOS token to separate documents; "
                            "set eos_token in its tokenizer_config.json")
    np_dtype = choose_dtype(max(vocab_size, eos_id + 1), dtype)
    _check_out_dir(out_dir)
    if source is None:
        source = getattr(documents, "description", None) or "in-memory documents"
    total_docs = getattr(documents, "num_documents", None)

    with atomic_dir(out_dir) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the data dir gets the usual permissions
        sinks = {split: _SplitSink(ShardWriter(tmp / split, np_dtype, shard_tokens)) for split in SPLITS}
        doc_bar = tqdm(total=total_docs, desc="documents", unit="doc", disable=not progress, file=sys.stderr)
        tok_bar = tqdm(desc="tokens", unit="tok", unit_scale=True, disable=not progress, file=sys.stderr)

        def consume(ids: list[str], arrays: list[np.ndarray]) -> None:
            for doc_id, tokens in zip(ids, arrays):
                sinks["val" if split_score(doc_id, seed) < val_fraction else "train"].add(tokens)
            doc_bar.update(len(arrays))
            tok_bar.update(sum(len(a) for a in arrays))

        try:
            chunks = _chunks(documents, max_docs=64, max_chars=1 << 20)
            if num_workers == 1:
                _init_worker(str(tokenizer_dir), np_dtype.name)
                try:
                    for ids, texts in chunks:
                        consume(ids, _encode_texts(texts))
                finally:
                    _WORKER.clear()
            else:
                with mp.get_context().Pool(num_workers, _init_worker, (str(tokenizer_dir), np_dtype.name)) as pool:
                    pending: collections.deque = collections.deque()
                    for ids, texts in chunks:  # a bounded window of chunks in flight keeps memory flat
                        pending.append((ids, pool.apply_async(_encode_texts, (texts,))))
                        if len(pending) >= 4 * num_workers:
                            ids0, result = pending.popleft()
                            consume(ids0, result.get())
                    while pending:
                        ids0, result = pending.popleft()
                        consume(ids0, result.get())
        finally:
            doc_bar.close()
            tok_bar.close()

        train, val = sinks["train"], sinks["val"]
        if val_fraction > 0 and val.num_documents == 0 and train.num_documents >= 2:
            val.add(train.take_pending())
        if train.num_documents == 0 and val.num_documents >= 1:
            train.add(val.take_pending())
        if train.num_documents == 0:
            raise LitModelError(f"the corpus ({source}) has no non-empty documents; point the prepare "
                                "command at a directory/dataset that holds text")
        indexes = {}
        for split, sink in sinks.items():
            sink.close()
            indexes[split] = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "split": split,
                "dtype": np_dtype.name,
                "num_tokens": sink.writer.num_tokens,
                "num_documents": sink.num_documents,
                "vocab_size": vocab_size,
                "eos_id": int(eos_id),
                "bos": False,
                "tokenizer_hash": tok_hash,
                "tokenizer_dir": str(tokenizer_dir),
                "source": source,
                "val_fraction": val_fraction,
                "seed": seed,
                "shard_tokens": sink.writer.shard_tokens,
                "shards": sink.writer.shards,
            }
        if block_size is not None and indexes["train"]["num_tokens"] < block_size + 1:
            raise LitModelError(
                f"the corpus is too small: its train split has {indexes['train']['num_tokens']} tokens, fewer than "
                f"one sequence of block_size + 1 = {block_size + 1} tokens; add more text or use a smaller --block_size"
            )
        for split, index in indexes.items():
            write_index(tmp / split, index)
    return indexes


def is_prepared(data_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> bool:
    """Whether ``data_dir`` holds both prepared splits (made with ``tokenizer_dir``'s tokenizer, if given)."""
    data_dir = Path(data_dir)
    try:
        indexes = [read_index(data_dir / split) for split in SPLITS]
    except LitModelError:
        return False
    return tokenizer_dir is None or all(i.get("tokenizer_hash") == tokenizer_hash(tokenizer_dir) for i in indexes)


def ensure_prepared(data_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike,
                    corpus: Callable[[], Iterable[tuple[str, str]]], **prepare_kwargs: Any) -> bool:
    """Prepare ``data_dir`` from ``corpus()`` unless it is already prepared with this tokenizer.

    For recipes with a built-in default corpus, e.g.
    ``ensure_prepared("data/stdlib", tokenizer_dir, stdlib_corpus)``. A data dir prepared with
    another tokenizer is re-prepared (replaced atomically). Returns True when it prepared.
    (In a multi-process run call it on one process only, then synchronise.)
    """
    if is_prepared(data_dir, tokenizer_dir):
        return False
    prepare_corpus(corpus(), tokenizer_dir, data_dir, **prepare_kwargs)
    return True


def prepare_and_report(
    corpus: Iterable[tuple[str, str]],
    tokenizer_dir: Path,
    out_dir: Path,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    num_workers: Optional[int] = None,
    seed: int = DEFAULT_SEED,
    dtype: Literal["auto", "uint16", "uint32"] = "auto",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    block_size: Optional[int] = None,
) -> dict[str, dict[str, Any]]:
    """``prepare_corpus``, then one line per split: what the prepare scripts print.

    The scripts pass their ``**prepare_options`` through here, so the flags below are theirs too.

    Args:
        corpus: The documents (a ``Corpus`` from ``litmodel.data.sources``).
        tokenizer_dir: Directory with tokenizer.json or tokenizer.model (a tokenizer or checkpoint dir).
        out_dir: Output data dir; gets train/ and val/ (replaced atomically if it was prepared before).
        val_fraction: Approximate fraction of documents that go to val (by a stable hash of each document's id:
            its file path, or path:record for records of a Hub file).
        num_workers: Tokeniser processes (default: min(2, cpu_count)).
        seed: Seed of the train/val split hash.
        dtype: Token dtype on disk; auto = uint16 when the vocabulary has <= 65536 ids, else uint32.
        shard_tokens: Tokens per shard file.
        block_size: If set, fail unless the train split holds one sequence of block_size + 1 tokens.
    """
    indexes = prepare_corpus(corpus, tokenizer_dir, out_dir, val_fraction=val_fraction, dtype=dtype,
                             shard_tokens=shard_tokens, num_workers=num_workers, seed=seed, block_size=block_size)
    for split, index in indexes.items():
        print(f"{split}: {index['num_documents']} documents, {index['num_tokens']} tokens ({index['dtype']}) "
              f"in {len(index['shards'])} shard(s) -> {Path(out_dir) / split}")
    return indexes
