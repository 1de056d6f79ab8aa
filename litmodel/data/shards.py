"""Token shards: the on-disk format, the writer, the memory-mapped reader and ``prepare_corpus``.

Layout of a prepared data dir (written atomically: built in a hidden temp dir beside it, renamed
into place only when both splits are complete)::

    <data_dir>/train/index.json   shard-00000.bin  shard-00001.bin ...
    <data_dir>/val/index.json     shard-00000.bin ...

A shard is a raw little-endian array of token ids (``uint16`` when the vocabulary has at most
65536 ids, else ``uint32``). Documents are concatenated with the EOS id after each one (GPT-2
style, no BOS), and a document may continue from one shard into the next, so the shards of a
split read as one token array. ``index.json`` records the dtype, the token count of every shard,
the vocabulary size, the EOS id, a hash of the tokenizer files, the source and the split.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from litmodel.atomic import atomic_dir, swap_into_place
from litmodel.utils import LitModelError

FORMAT = "litmodel.token_shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SPLITS = ("train", "val")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
DEFAULT_SHARD_TOKENS = 1 << 26  # 64Mi tokens: 128 MiB (uint16) or 256 MiB (uint32) per shard
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SEED = 42
UINT16_IDS = 1 << 16  # ids 0..65535 fit in uint16, so a vocabulary of 65536 still does

PREPARE_HINT = ("`python scripts/prepare_stdlib.py --tokenizer_dir <tokenizer_dir> --out_dir {data_dir}` "
                "(or `python scripts/prepare_text.py --input_dir <dir> ...` / `python scripts/prepare_hub.py "
                "--repo_id <org/name> ...` for your own corpus)")
TRAIN_TOKENIZER_HINT = "python scripts/train_tokenizer.py ... --out_dir {tokenizer_dir}"


def default_num_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


# --------------------------------------------------------------------------------------------
# tokenizer helpers
# --------------------------------------------------------------------------------------------
def tokenizer_hash(tokenizer_dir: str | os.PathLike) -> str:
    """sha256 over the tokenizer's vocabulary files (``tokenizer.json`` and/or ``tokenizer.model``).

    Two dirs holding the same tokenizer files have the same hash wherever they live.
    """
    tokenizer_dir = Path(tokenizer_dir)
    files = [tokenizer_dir / name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not files:
        raise _missing_tokenizer(tokenizer_dir)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _missing_tokenizer(tokenizer_dir: Path) -> LitModelError:
    what = "does not exist" if not tokenizer_dir.exists() else "holds no tokenizer.json or tokenizer.model"
    return LitModelError(
        f"tokenizer dir {tokenizer_dir} {what}; train a tokenizer with "
        f"`{TRAIN_TOKENIZER_HINT.format(tokenizer_dir=tokenizer_dir)}` or pass --tokenizer_dir of a checkpoint dir"
    )


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """``litmodel.tokenizer.Tokenizer(tokenizer_dir)``, after checking the dir holds a tokenizer."""
    tokenizer_dir = Path(tokenizer_dir)
    if not any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
        raise _missing_tokenizer(tokenizer_dir)
    from litmodel.tokenizer import Tokenizer  # imported lazily: heavy, and owned by another module

    return Tokenizer(tokenizer_dir)


def choose_dtype(vocab_size: int, dtype: str = "auto") -> np.dtype:
    """``uint16`` when every id of a ``vocab_size`` vocabulary fits (<= 65536 ids), else ``uint32``."""
    if dtype not in ("auto", "uint16", "uint32"):
        raise LitModelError(f"unknown token dtype {dtype!r}; use --dtype auto, uint16 or uint32")
    if dtype == "uint16" and vocab_size > UINT16_IDS:
        raise LitModelError(
            f"the tokenizer has {vocab_size} ids, more than uint16 can hold ({UINT16_IDS}); "
            "use --dtype uint32 or --dtype auto"
        )
    if dtype == "auto":
        dtype = "uint16" if vocab_size <= UINT16_IDS else "uint32"
    return np.dtype(dtype)


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
# writer
# --------------------------------------------------------------------------------------------
class ShardWriter:
    """Append token arrays to ``<split_dir>/shard-XXXXX.bin`` files of ``shard_tokens`` tokens each."""

    def __init__(self, split_dir: str | os.PathLike, dtype: np.dtype, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        if shard_tokens < 1:
            raise LitModelError(f"shard_tokens must be >= 1, got {shard_tokens}; pass a positive --shard_tokens")
        self.split_dir = Path(split_dir)
        self.split_dir.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shard_tokens = int(shard_tokens)
        self.shards: list[dict[str, Any]] = []
        self.num_tokens = 0
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        pos = 0
        while pos < len(tokens):
            if self._file is None or self.shards[-1]["num_tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["num_tokens"]
            part = tokens[pos:pos + room]
            self._file.write(part.astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["num_tokens"] += len(part)
            self.num_tokens += len(part)
            pos += len(part)

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"shard-{len(self.shards):05d}.bin"
        self._file = open(self.split_dir / name, "wb")
        self.shards.append({"file": name, "num_tokens": 0})

    def close(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._file.close()
            self._file = None
        return self.shards


def write_index(split_dir: str | os.PathLike, index: dict[str, Any]) -> None:
    path = Path(split_dir) / INDEX_NAME
    tmp = path.with_name(f".{INDEX_NAME}.tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    swap_into_place(tmp, path)


def read_index(split_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``index.json`` of a split dir, with a clear error naming the prepare command when absent."""
    split_dir = Path(split_dir)
    path = split_dir / INDEX_NAME
    if not path.is_file():
        if (split_dir / "train" / INDEX_NAME).is_file():
            raise LitModelError(f"{split_dir} is a data dir, not a split dir; pass {split_dir / 'train'} "
                                f"(or {split_dir / 'val'})")
        data_dir = split_dir.parent if split_dir.name in SPLITS else split_dir
        what = "does not exist" if not split_dir.exists() else f"has no {INDEX_NAME}"
        raise LitModelError(f"no prepared token data: {split_dir} {what}; prepare it with "
                            f"{PREPARE_HINT.format(data_dir=data_dir)}")
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LitModelError(f"cannot read {path} ({err}); prepare the data dir again") from err
    if index.get("format") != FORMAT:
        raise LitModelError(f"{path} is not a litmodel token-shard index; prepare the data dir again")
    if index.get("version", 0) > FORMAT_VERSION:
        raise LitModelError(f"{path} has format version {index['version']}, newer than this litmodel "
                            f"({FORMAT_VERSION}); upgrade litmodel or prepare the data again")
    return index


def check_tokenizer_match(index: dict[str, Any], split_dir: str | os.PathLike,
                          tokenizer_dir: str | os.PathLike) -> None:
    """Raise when ``split_dir`` was tokenised with other tokenizer files than ``tokenizer_dir`` holds."""
    expected = tokenizer_hash(tokenizer_dir)
    if index.get("tokenizer_hash") != expected:
        split_dir = Path(split_dir)
        data_dir = split_dir.parent if split_dir.name in SPLITS else split_dir
        raise LitModelError(
            f"{split_dir} was prepared with a different tokenizer (hash {str(index.get('tokenizer_hash'))[:12]}, "
            f"from {index.get('tokenizer_dir')}) than {tokenizer_dir} (hash {expected[:12]}); prepare it again with "
            f"the run's tokenizer: `python scripts/prepare_<source>.py --tokenizer_dir {tokenizer_dir} "
            f"--out_dir {data_dir}` (or use another data dir)"
        )


# --------------------------------------------------------------------------------------------
# memory-mapped reader
# --------------------------------------------------------------------------------------------
class TokenShards:
    """All shards of a split, memory-mapped, read as one virtual token array.

    ``len(shards)`` is the token count; ``shards[i]`` is one id; ``shards[a:b]`` (step 1) is a new
    numpy array in the stored dtype, crossing shard boundaries as needed. Pass ``tokenizer_dir`` to
    check that the data was prepared with that tokenizer.
    """

    def __init__(self, split_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None):
        self.split_dir = Path(split_dir)
        self.index = read_index(self.split_dir)
        if tokenizer_dir is not None:
            check_tokenizer_match(self.index, self.split_dir, tokenizer_dir)
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        self.vocab_size: int = self.index["vocab_size"]
        self.eos_id: int = self.index["eos_id"]
        self.tokenizer_hash: str = self.index["tokenizer_hash"]
        self._arrays: list[np.memmap] = []
        offsets = [0]
        for shard in self.index["shards"]:
            n = int(shard["num_tokens"])
            if n == 0:
                continue
            path = self.split_dir / shard["file"]
            size = path.stat().st_size if path.is_file() else -1
            if size != n * self.dtype.itemsize:
                raise LitModelError(
                    f"shard {path} is missing or has {size} bytes instead of {n * self.dtype.itemsize}; "
                    f"the data dir is damaged, prepare it again"
                )
            self._arrays.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(n,)))
            offsets.append(offsets[-1] + n)
        self._offsets = np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def num_tokens(self) -> int:
        return len(self)

    def __getitem__(self, key: int | slice) -> np.ndarray | int:
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise ValueError("TokenShards supports only slices with step 1")
            return self._read(start, max(start, stop))
        key = int(key)
        if key < 0:
            key += n
        if not 0 <= key < n:
            raise IndexError(f"token index {key} out of range for {n} tokens")
        return int(self._read(key, key + 1)[0])

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype=self.dtype)
        shard = int(np.searchsorted(self._offsets, start, side="right")) - 1
        pos = start
        while pos < stop:
            begin, end = int(self._offsets[shard]), int(self._offsets[shard + 1])
            take = min(stop, end) - pos
            out[pos - start:pos - start + take] = self._arrays[shard][pos - begin:pos - begin + take]
            pos += take
            shard += 1
        return out

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.split_dir)!r}, tokens={len(self)}, shards={len(self._arrays)}, "
                f"dtype={self.dtype.name})")


# --------------------------------------------------------------------------------------------
# prepare_corpus
# --------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_dir: str, dtype: str) -> None:
    try:
        tok = load_tokenizer(tokenizer_dir)
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
    tok = load_tokenizer(tokenizer_dir)
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

    from tqdm.auto import tqdm

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
                import multiprocessing as mp

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
