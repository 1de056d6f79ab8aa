"""A SentencePiece ``tokenizer.model`` encoded and decoded the way transformers' (non-legacy) Llama tokenizer does.

``litmodel.tokenizer.Tokenizer`` uses ``SentencePieceModel`` for a directory without ``tokenizer.json``: special and
added tokens (control pieces, ``tokenizer_config.json``'s added tokens) are matched in the text first, and text after
them gets no "▁" dummy prefix; decoding is lossless (no clean-up of spaces).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import sentencepiece as spm

from litmodel.utils import LitModelError


def token_str(value: Any) -> str | None:
    """``bos_token``-style config values are strings or AddedToken dicts ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class SentencePieceModel:
    """``tokenizer.model`` plus the added tokens of ``tokenizer_config.json``.

    Attributes: ``vocab_size`` (pieces and added tokens), ``special_ids`` (control, unknown and special added tokens:
    what ``decode(..., skip_special_tokens=True)`` drops), ``bos_id``/``eos_id``/``pad_id`` of the model itself.
    """

    def __init__(self, model_file: Path, config: dict) -> None:
        try:
            sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except Exception as err:
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise LitModelError(f"could not load {model_file} ({msg}); re-download the tokenizer files") from None
        self._sp = sp
        n = sp.get_piece_size()
        self._pieces: list[str] = [sp.id_to_piece(i) for i in range(n)]
        self._byte_of: dict[int, int] = {i: int(self._pieces[i][3:5], 16) for i in range(n) if sp.is_byte(i)}
        self.special_ids: set[int] = {i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
        self._piece_to_id = {p: i for i, p in enumerate(self._pieces)}
        # whole-token strings matched in the text before SentencePiece runs (as HF's added tokens are): control and
        # unknown pieces and the config's added tokens (user-defined pieces SentencePiece matches itself)
        self._added: dict[str, int] = {}
        for i in range(n):
            if sp.is_control(i) or sp.is_unknown(i):
                self._added[self._pieces[i]] = i
        for idx, tok in (config.get("added_tokens_decoder") or {}).items():
            content = token_str(tok)
            if content is None:
                continue
            idx = int(idx)
            self._added[content] = idx
            if idx < n:
                self._pieces[idx] = content
            if not isinstance(tok, dict) or tok.get("special", True):
                self.special_ids.add(idx)
        # named extra special tokens (transformers 4: additional_special_tokens, 5: extra_special_tokens)
        for key in ("additional_special_tokens", "extra_special_tokens"):
            for tok in config.get(key) or []:
                content = token_str(tok)
                idx = self._piece_to_id.get(content) if content is not None else None
                if idx is not None:
                    self._added.setdefault(content, idx)
                    self.special_ids.add(idx)
        self._id_to_added = {i: t for t, i in self._added.items()}
        self._split_re = (
            re.compile("|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True) if t))
            if self._added else None
        )
        self.vocab_size = max([n - 1, *self._added.values()]) + 1
        probe = sp.encode("a", out_type=str)  # SentencePiece's add_dummy_prefix: "a" -> ["▁a"] or ["▁", "a"]
        self._dummy_prefix = bool(probe) and probe[0].startswith("▁")
        # "\n" is never inside a piece (SentencePiece trains on lines), the unk piece is what HF's slow tokenizer used
        unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else "<unk>"
        self._sentinels = [(t, sp.encode(t)) for t in ("\n", unk, "0")]
        # the model's own bos/eos/pad (None when absent); tokenizer_config.json may name others
        self.bos_id: int | None = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else None

    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        return self._piece_to_id.get(token)

    def id_to_token(self, idx: int) -> str | None:
        if idx in self._id_to_added:
            return self._id_to_added[idx]
        return self._pieces[idx] if 0 <= idx < len(self._pieces) else None

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``: added tokens matched first, SentencePiece on the text between them."""
        if self._split_re is None:
            return self._sp.encode(text)
        ids: list[int] = []
        pos = 0
        for m in self._split_re.finditer(text):
            if m.start() > pos:
                ids += self._encode_segment(text[pos:m.start()], at_start=pos == 0)
            ids.append(self._added[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self._encode_segment(text[pos:], at_start=pos == 0)
        return ids

    def _encode_segment(self, text: str, at_start: bool) -> list[int]:
        # Like HF's Metaspace(prepend_scheme="first"): only text at the very start gets SentencePiece's dummy "▁"
        # prefix, text after a special token does not. SentencePiece cannot switch the prefix off per call, so encode
        # sentinel + text and drop the sentinel's pieces, checking they are unchanged (no piece crosses the boundary,
        # so the rest is exactly the encoding of `text` alone).
        if at_start or not self._dummy_prefix:
            return self._sp.encode(text)
        for sentinel, head in self._sentinels:
            ids = self._sp.encode(sentinel + text)
            if ids[: len(head)] == head:
                return ids[len(head):]
        return self._sp.encode(text)  # pragma: no cover - no usable sentinel; keeps the dummy prefix

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        # Same as HF's Llama decoder (Replace "▁"->" ", ByteFallback, Fuse, Strip one leading space), except that
        # invalid UTF-8 byte runs become U+FFFD per maximal invalid subsequence (so decoding is splittable).
        out = bytearray()
        pieces, byte_of, added, special = self._pieces, self._byte_of, self._id_to_added, self.special_ids
        n = len(pieces)
        for i in ids:
            if i in special:
                if skip_special_tokens:
                    continue
                out += (added.get(i) or pieces[i]).encode("utf-8")
            elif i in byte_of:
                out.append(byte_of[i])
            elif i in added:
                out += added[i].encode("utf-8")
            elif 0 <= i < n:
                out += pieces[i].replace("▁", " ").encode("utf-8")
        text = out.decode("utf-8", errors="replace")
        if self._dummy_prefix and text.startswith(" "):
            text = text[1:]
        return text
