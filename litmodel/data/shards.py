"""Token shards: the on-disk format, the writer and the memory-mapped reader (``prepare_corpus`` in
`litmodel.data.prepare` fills a data dir with them).

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

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from litmodel.atomic import swap_into_place
from litmodel.tokenizer import TOKENIZER_MODEL_FILES, missing_tokenizer_error
from litmodel.utils import LitModelError

FORMAT = "litmodel.token_shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 26  # 64Mi tokens: 128 MiB (uint16) or 256 MiB (uint32) per shard
UINT16_IDS = 1 << 16  # ids 0..65535 fit in uint16, so a vocabulary of 65536 still does

PREPARE_HINT = ("`python scripts/prepare_stdlib.py --tokenizer_dir <tokenizer_dir> --out_dir {data_dir}` "
                "(or `python scripts/prepare_text.py --input_dir <dir> ...` / `python scripts/prepare_hub.py "
                "--repo_id <org/name> ...` for your own corpus)")
TRAIN_TOKENIZER_HINT = "python scripts/train_tokenizer.py ... --out_dir {tokenizer_dir}"


# --------------------------------------------------------------------------------------------
# tokenizer helpers
# --------------------------------------------------------------------------------------------
def tokenizer_hash(tokenizer_dir: str | os.PathLike) -> str:
    """sha256 over the tokenizer's vocabulary files (``tokenizer.json`` and/or ``tokenizer.model``).

    Two dirs holding the same tokenizer files have the same hash wherever they live.
    """
    tokenizer_dir = Path(tokenizer_dir)
    files = [tokenizer_dir / name for name in TOKENIZER_MODEL_FILES if (tokenizer_dir / name).is_file()]
    if not files:
        raise missing_tokenizer_error(tokenizer_dir, train_tokenizer_hint(tokenizer_dir))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def train_tokenizer_hint(tokenizer_dir: str | os.PathLike) -> str:
    """The fix named when a data command's tokenizer dir holds no tokenizer."""
    return (f"train a tokenizer with `{TRAIN_TOKENIZER_HINT.format(tokenizer_dir=tokenizer_dir)}` "
            "or pass --tokenizer_dir of a checkpoint dir")


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

