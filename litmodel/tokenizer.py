"""One ``Tokenizer`` over a checkpoint's tokenizer files, plus chat templates and tokenizer training.

Reads ``tokenizer.json`` (HF ``tokenizers``) or ``tokenizer.model`` (``sentencepiece``; ``tokenizer.json`` wins when
both exist, as in transformers' fast tokenizer), and the special tokens / defaults from ``tokenizer_config.json``,
``special_tokens_map.json`` and ``generation_config.json``. Encoding, decoding and chat-template rendering give the
same results as ``transformers.AutoTokenizer`` on the same directory (see ``tests/test_tokenizer.py``).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from litmodel.atomic import atomic_dir
from litmodel.utils import LitModelError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)

# Used when a checkpoint has no chat template of its own: "<role>: <content>\n" per turn, then "assistant: ".
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

# Tokens that end an assistant turn in common chat formats (added to `end_of_turn_ids` when in the vocabulary).
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "</s>",
)

# Special-token attributes transformers passes to chat templates (its `special_tokens_map`).
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise LitModelError(f"could not read {path} ({err}); re-download or recreate the tokenizer files") from None
    return data if isinstance(data, dict) else {}


def _token_str(value: Any) -> str | None:
    """``bos_token``-style config values are strings or AddedToken dicts ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


class Tokenizer:
    """Tokenizer of a checkpoint directory.

    Attributes: ``vocab_size`` (including added tokens), ``bos_id``, ``eos_id``, ``pad_id`` (``None`` when the
    checkpoint defines none), ``stop_ids`` (eos plus every ``generation_config.json`` ``eos_token_id``),
    ``end_of_turn_ids`` (``stop_ids`` plus chat end-of-turn tokens such as ``<|im_end|>``/``<|eot_id|>``),
    ``add_bos`` (whether ``encode`` prepends BOS by default), ``chat_template`` and ``has_chat_template``.
    """

    def __init__(self, checkpoint_dir: str | Path) -> None:
        path = Path(checkpoint_dir)
        model_file: Path | None = None
        if path.is_file() and (path.name.endswith(".json") or path.suffix == ".model"):
            model_file, path = path, path.parent
        if not path.is_dir():
            raise LitModelError(
                f"tokenizer directory {str(path)!r} does not exist; pass --tokenizer_dir (or --checkpoint_dir) "
                "pointing to a directory with tokenizer.json or tokenizer.model"
            )
        self.checkpoint_dir = path
        if model_file is None:
            for name in ("tokenizer.json", "tokenizer.model"):
                if (path / name).is_file():
                    model_file = path / name
                    break
        if model_file is None:
            raise LitModelError(
                f"no tokenizer.json or tokenizer.model in {str(path)!r}; run `python scripts/download.py --repo_id "
                "<org/name> --tokenizer_only` or pass --tokenizer_dir pointing to a directory with the tokenizer files"
            )
        self.model_file = model_file

        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        gen_config = _read_json(path / "generation_config.json")
        self._config = config

        if model_file.suffix == ".model":
            self.backend = "sentencepiece"
            self._load_sentencepiece(model_file, config)
        else:
            self.backend = "huggingface"
            self._load_tokenizers(model_file)

        # --- special tokens: tokenizer_config.json > special_tokens_map.json > generation_config.json > model file.
        # `special_tokens` (the named token strings of the config files) are the chat templates' variables.
        self.special_tokens: dict[str, str] = {}
        for name in _NAMED_SPECIAL_TOKENS:
            value = _token_str(config.get(name)) if name in config else _token_str(special_map.get(name))
            if value is not None:
                self.special_tokens[name] = value

        def resolve(name: str, gen_key: str, model_default: int | None) -> int | None:
            token = self.special_tokens.get(name)
            if token is not None and self.token_to_id(token) is not None:
                return self.token_to_id(token)
            ids = _as_id_list(gen_config.get(gen_key))
            if ids:
                return ids[0]
            return model_default

        template_bos, template_eos = self._post_processor_specials()
        model_bos = self._model_bos if self._model_bos is not None else template_bos
        model_eos = self._model_eos if self._model_eos is not None else template_eos
        self.bos_id = resolve("bos_token", "bos_token_id", model_bos)
        self.eos_id = resolve("eos_token", "eos_token_id", model_eos)
        self.pad_id = resolve("pad_token", "pad_token_id", self._model_pad)

        # --- default BOS/EOS (what transformers' `tokenizer(text)` adds): explicit config flag, else post-processor
        if "add_bos_token" in config or "add_eos_token" in config:
            add_bos, add_eos = bool(config.get("add_bos_token", False)), bool(config.get("add_eos_token", False))
        else:
            add_bos, add_eos = template_bos is not None, template_eos is not None
        self.add_bos = add_bos and self.bos_id is not None
        self.add_eos = add_eos and self.eos_id is not None

        self.stop_ids: set[int] = set(_as_id_list(gen_config.get("eos_token_id")))
        if self.eos_id is not None:
            self.stop_ids.add(self.eos_id)
        self.end_of_turn_ids: set[int] = set(self.stop_ids)
        for token in END_OF_TURN_TOKENS:
            idx = self.token_to_id(token)
            if idx is not None and idx in self._special_ids:
                self.end_of_turn_ids.add(idx)

        # --- chat template: chat_template.jinja > tokenizer_config.json "chat_template" (str or list of named ones)
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        self.chat_template: str | None = template if isinstance(template, str) and template.strip() else None

    # ------------------------------------------------------------------ loading
    def _load_tokenizers(self, model_file: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tk = HFTokenizer.from_file(str(model_file))
        except Exception as err:  # tokenizers raises a plain Exception on bad files
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise LitModelError(f"could not load {model_file} ({msg}); re-download the tokenizer files") from None
        self._tk.no_padding()
        self._tk.no_truncation()
        self._sp = None
        self._model_bos = self._model_eos = self._model_pad = None
        self._special_ids = {i for i, t in self._tk.get_added_tokens_decoder().items() if t.special}
        # ByteFallback decoders decode a run of <0xNN> tokens as one group (all U+FFFD when the run is not valid
        # UTF-8), so the streaming decoder waits for the run to end before printing it.
        self._hold_ids: frozenset[int] = frozenset()
        if self._tk.decoder is not None and b"ByteFallback" in self._tk.decoder.__getstate__():
            vocab = self._tk.get_vocab(with_added_tokens=False)
            self._hold_ids = frozenset(i for t, i in vocab.items() if _BYTE_PIECE.match(t))
        self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)

    def _load_sentencepiece(self, model_file: Path, config: dict) -> None:
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except Exception as err:
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise LitModelError(f"could not load {model_file} ({msg}); re-download the tokenizer files") from None
        self._sp = sp
        self._tk = None
        self._hold_ids = frozenset()
        n = sp.get_piece_size()
        self._pieces: list[str] = [sp.id_to_piece(i) for i in range(n)]
        self._byte_of: dict[int, int] = {i: int(self._pieces[i][3:5], 16) for i in range(n) if sp.is_byte(i)}
        self._special_ids = {i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
        self._piece_to_id = {p: i for i, p in enumerate(self._pieces)}
        # whole-token strings matched in the text before SentencePiece runs (as HF's added tokens are): control and
        # unknown pieces and the config's added tokens (user-defined pieces SentencePiece matches itself)
        self._added: dict[str, int] = {}
        for i in range(n):
            if sp.is_control(i) or sp.is_unknown(i):
                self._added[self._pieces[i]] = i
        for idx, tok in (config.get("added_tokens_decoder") or {}).items():
            content = _token_str(tok)
            if content is None:
                continue
            idx = int(idx)
            self._added[content] = idx
            if idx < n:
                self._pieces[idx] = content
            if not isinstance(tok, dict) or tok.get("special", True):
                self._special_ids.add(idx)
        # named extra special tokens (transformers 4: additional_special_tokens, 5: extra_special_tokens)
        for key in ("additional_special_tokens", "extra_special_tokens"):
            for tok in config.get(key) or []:
                content = _token_str(tok)
                idx = self._piece_to_id.get(content) if content is not None else None
                if idx is not None:
                    self._added.setdefault(content, idx)
                    self._special_ids.add(idx)
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
        self._model_bos = sp.bos_id() if sp.bos_id() >= 0 else None
        self._model_eos = sp.eos_id() if sp.eos_id() >= 0 else None
        self._model_pad = sp.pad_id() if sp.pad_id() >= 0 else None

    def _post_processor_specials(self) -> tuple[int | None, int | None]:
        """(id, id) of the special tokens the tokenizer.json post-processor puts before / after a single sequence."""
        if self._tk is None:
            return None, None
        if self._tk.post_processor is None:
            return None, None
        proc = json.loads(self._tk.post_processor.__getstate__())
        procs = proc.get("processors", []) if proc.get("type") == "Sequence" else [proc]
        for p in procs:
            if p.get("type") != "TemplateProcessing":
                continue
            single = p.get("single") or []
            specials = p.get("special_tokens") or {}

            def special_id(item: dict) -> int | None:
                if "SpecialToken" not in item:
                    return None
                name = item["SpecialToken"]["id"]
                ids = (specials.get(name) or {}).get("ids") or []
                return ids[0] if ids else self.token_to_id(name)

            first = special_id(single[0]) if single else None
            last = special_id(single[-1]) if len(single) > 1 else None
            return first, last
        return None, None

    # ------------------------------------------------------------------ vocabulary
    def token_to_id(self, token: str) -> int | None:
        if self._tk is not None:
            return self._tk.token_to_id(token)
        if token in self._added:
            return self._added[token]
        return self._piece_to_id.get(token)

    def id_to_token(self, idx: int) -> str | None:
        if self._tk is not None:
            return self._tk.id_to_token(int(idx))
        if idx in self._id_to_added:
            return self._id_to_added[idx]
        return self._pieces[idx] if 0 <= idx < len(self._pieces) else None

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_id) if self.bos_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_id) if self.eos_id is not None else None

    @property
    def special_ids(self) -> set[int]:
        """Ids that ``decode(..., skip_special_tokens=True)`` drops."""
        return set(self._special_ids)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.checkpoint_dir)!r}, backend={self.backend}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, add_bos={self.add_bos})")

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, bos: bool | None = None, eos: bool | None = False) -> list[int]:
        """Token ids of ``text``. ``bos``/``eos``: ``None`` = as the tokenizer does by default (``add_bos``/``add_eos``,
        i.e. what ``transformers``' ``tokenizer(text)["input_ids"]`` adds), ``True``/``False`` = force."""
        if self._tk is not None:
            ids = self._tk.encode(text, add_special_tokens=False).ids
        else:
            ids = self._sp_encode(text)
        return self._add_specials(ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool | None = None, eos: bool | None = False) -> list[list[int]]:
        """``[encode(t, bos, eos) for t in texts]``, in parallel threads for ``tokenizer.json`` tokenizers."""
        if self._tk is not None:
            encodings = self._tk.encode_batch(list(texts), add_special_tokens=False)
            return [self._add_specials(e.ids, bos, eos) for e in encodings]
        return [self.encode(t, bos, eos) for t in texts]

    def _add_specials(self, ids: list[int], bos: bool | None, eos: bool | None) -> list[int]:
        if self.add_bos if bos is None else bos:
            if self.bos_id is None:
                raise LitModelError(f"the tokenizer in {self.checkpoint_dir} has no BOS token; "
                                    "call encode(..., bos=False)")
            ids = [self.bos_id, *ids]
        if self.add_eos if eos is None else eos:
            if self.eos_id is None:
                raise LitModelError(f"the tokenizer in {self.checkpoint_dir} has no EOS token; "
                                    "call encode(..., eos=False)")
            ids = [*ids, self.eos_id]
        return ids

    def _sp_encode(self, text: str) -> list[int]:
        if self._split_re is None:
            return self._sp.encode(text)
        ids: list[int] = []
        pos = 0
        for m in self._split_re.finditer(text):
            if m.start() > pos:
                ids += self._sp_encode_segment(text[pos:m.start()], at_start=pos == 0)
            ids.append(self._added[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self._sp_encode_segment(text[pos:], at_start=pos == 0)
        return ids

    def _sp_encode_segment(self, text: str, at_start: bool) -> list[int]:
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

    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list, tensor or single id); special tokens are kept unless ``skip_special_tokens``."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if self._tk is not None:
            return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._sp_decode(ids, skip_special_tokens)

    def _sp_decode(self, ids: Iterable[int], skip_special_tokens: bool) -> str:
        # Same as HF's Llama decoder (Replace "▁"->" ", ByteFallback, Fuse, Strip one leading space), except that
        # invalid UTF-8 byte runs become U+FFFD per maximal invalid subsequence (so decoding is splittable).
        out = bytearray()
        pieces, byte_of, added, special = self._pieces, self._byte_of, self._id_to_added, self._special_ids
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

    def incremental_decoder(
        self, skip_special_tokens: bool = False, context_ids: Sequence[int] = ()
    ) -> "IncrementalDecoder":
        """A streaming decoder: ``.add(id)`` returns the newly printable text, ``.flush()`` the rest.

        ``context_ids``: ids already shown (e.g. the prompt) so that the first streamed token keeps its leading
        space with SentencePiece-style tokenizers; only the last few are kept."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens, context_ids=context_ids)

    # ------------------------------------------------------------------ chat
    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` (dicts with ``role``/``content``) with the checkpoint's Jinja chat template, as
        transformers does. ``tokenize=True`` returns ids; like transformers, no BOS/EOS is added on top of what the
        template writes (a template starting with ``{{ bos_token }}`` gives exactly one BOS). Without a template the
        plain ``FALLBACK_CHAT_TEMPLATE`` ("<role>: <content>\\n" per turn, then "assistant: ") is used and the ids get
        the tokenizer's default BOS. Extra ``kwargs`` are template variables (e.g. ``enable_thinking=False``)."""
        if not messages:
            raise LitModelError("apply_chat_template got an empty conversation; pass at least one message")
        template = chat_template or self.chat_template
        fallback = template is None
        if fallback:
            template = FALLBACK_CHAT_TEMPLATE
        messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        variables = {**self.special_tokens, **kwargs}
        try:
            text = _compile_chat_template(template).render(
                messages=messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except LitModelError:
            raise
        except Exception as err:
            import jinja2

            if isinstance(err, jinja2.TemplateError):
                raise LitModelError(
                    f"chat template error: {err}; fix the conversation or pass another chat_template"
                ) from None
            raise
        if not tokenize:
            return text
        return self.encode(text, bos=None if fallback else False, eos=False)


@lru_cache(maxsize=16)
def _compile_chat_template(template: str):
    """Compile like transformers' ``chat_template_utils``: sandboxed, trim/lstrip blocks, loop controls,
    a ``tojson`` that does not HTML-escape, ``raise_exception`` and ``strftime_now`` globals, and a no-op
    ``{% generation %}`` block."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant masks
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise LitModelError(
            f"the chat template does not compile ({err} at line {err.lineno}); fix chat_template"
        ) from None


class IncrementalDecoder:
    """Streaming detokenizer (the prefix/read-offset scheme of vLLM's detokenizer).

    Each ``add`` decodes only a short window of recent ids: ``decode(window)`` minus ``decode(prefix of window)``
    is the new text. Text ending in U+FFFD (an incomplete UTF-8 character) is held back until it completes, so
    emoji or CJK characters split over byte tokens are never printed broken, and because the window keeps the
    previous token(s), SentencePiece's leading spaces survive. With a ``tokenizer.json`` ByteFallback decoder a run
    of ``<0xNN>`` tokens is held until the run ends (its decoding depends on the whole run).
    ``"".join(add(i) for i in ids) + flush()`` equals ``tokenizer.decode(ids)``.
    """

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = False, context_ids: Sequence[int] = ()
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._hold = tokenizer._hold_ids
        ids = [int(i) for i in list(context_ids)[-6:]]
        text = self._decode(ids)
        if text.endswith("\ufffd"):  # context ending in a broken character cannot serve as a prefix
            ids, text = [], ""
        self._ids = ids
        self._prefix = 0  # start of the window
        self._read = len(ids)  # ids before this were printed
        self._prefix_text = text  # decode(ids[prefix:read])

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        if self._ids[-1] in self._hold:
            return ""
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        new = text[len(self._prefix_text):]
        # slide the window: the ids just printed become the prefix of the next decode
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return new

    def flush(self) -> str:
        """The text still held back (e.g. an incomplete character at the end of the stream)."""
        text = self._decode(self._ids[self._prefix:])
        new = text[len(self._prefix_text):] if len(text) > len(self._prefix_text) else ""
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return new


def copy_tokenizer_files(src_dir: str | Path, dst_dir: str | Path) -> list[Path]:
    """Copy the files of ``TOKENIZER_FILES`` that exist in ``src_dir`` into ``dst_dir`` (created if needed).

    Returns the copied destination paths (empty when ``src_dir`` has none; callers decide whether that is an
    error). Copying a directory onto itself is a no-op."""
    src, dst = Path(src_dir), Path(dst_dir)
    if not src.is_dir():
        raise LitModelError(f"tokenizer source directory {str(src)!r} does not exist; pass an existing checkpoint dir")
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            if src.resolve() != dst.resolve():
                shutil.copy2(src / name, dst / name)
            copied.append(dst / name)
    return copied


# ====================================================================== training
# Pre-tokenization regex of Llama-3 / Qwen2 (digits in groups of up to 3, whitespace runs kept for indentation).
BPE_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "<|bos|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|eos|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")
DEFAULT_SPECIAL_TOKENS = {"bpe": ["<|endoftext|>"], "sentencepiece": ["<unk>", "<s>", "</s>", "<pad>"]}


def find_text_files(paths: str | Path | Sequence[str | Path], glob: str = "**/*.txt") -> list[Path]:
    """Files given directly plus the files matching ``glob`` under each given directory (sorted, deduplicated)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(f for f in p.glob(glob) if f.is_file())
        else:
            raise LitModelError(f"{str(p)!r} does not exist; pass --data_dir with existing text files or directories")
    seen, unique = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def _read_texts(files: Sequence[Path], max_bytes: int | None, show_progress: bool) -> list[str]:
    """UTF-8 texts of ``files`` (undecodable files skipped), at most ``max_bytes`` bytes in total."""
    texts, total, skipped = [], 0, 0
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc="reading text", unit="file", file=sys.stderr, leave=False)
    for f in files:
        data = f.read_bytes()
        full = max_bytes is not None and total + len(data) >= max_bytes
        if full:
            data = data[: max_bytes - total]
            cut = data.rfind(b"\n")
            data = data[: cut + 1] if cut >= 0 else data
            text = data.decode("utf-8", errors="ignore")
        else:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                skipped += 1
                text = ""
        if text:
            texts.append(text)
            total += len(data)
        if bar is not None:
            bar.update(1)
        if full:
            break
    if bar is not None:
        bar.close()
    if show_progress:
        note = f", skipped {skipped} non-UTF-8 file(s)" if skipped else ""
        print(f"read {total / 1e6:.2f} MB from {len(texts)} file(s){note}", file=sys.stderr)
    if not texts:
        raise LitModelError(
            f"no UTF-8 text in the {len(files)} input file(s); pass --data_dir with non-empty UTF-8 text files"
        )
    return texts


def _special_roles(special_tokens: Sequence[str], bos_token: str | None, eos_token: str | None,
                   pad_token: str | None) -> tuple[str | None, str, str | None]:
    def pick(names, explicit):
        if explicit is not None:
            return explicit
        return next((t for t in special_tokens if t in names), None)

    eos = pick(_EOS_NAMES, eos_token) or special_tokens[0]
    bos = pick(_BOS_NAMES, bos_token) or eos
    pad = pick(_PAD_NAMES, pad_token)
    return bos, eos, pad


def train_tokenizer(
    files: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    kind: str = "bpe",
    vocab_size: int = 8192,
    special_tokens: Sequence[str] | None = None,
    *,
    glob: str = "**/*.txt",
    sp_model_type: str = "bpe",
    min_frequency: int = 2,
    max_bytes: int | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    add_bos_token: bool | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a tokenizer on text files and write a directory that ``Tokenizer`` (and ``transformers``) loads.

    ``kind="bpe"``: byte-level BPE (``tokenizers``; Llama-3/Qwen2 pre-tokenizer regex, no normalization, so
    ``decode(encode(x)) == x``), written as ``tokenizer.json``. ``kind="sentencepiece"``: SentencePiece ``bpe`` or
    ``unigram`` (``sp_model_type``) with byte fallback, identity normalization and whitespace kept (Llama style),
    written as ``tokenizer.model`` (bpe: Llama's "▁" dummy prefix, loaded by transformers' ``LlamaTokenizer``;
    unigram: no dummy prefix, since transformers' generic SentencePiece converter has none). Both also get
    ``tokenizer_config.json`` (bos/eos/pad tokens, ``add_bos_token``) and ``generation_config.json``.
    ``special_tokens`` get the first ids; the bos/eos/pad roles are taken from the explicit arguments, else from
    well-known names (``<s>``, ``</s>``, ``<|endoftext|>``, ``<pad>`` ...), else eos = bos = the first special token.
    ``add_bos_token`` defaults to False for BPE and True for SentencePiece.
    ``out_dir`` is written atomically; an existing non-empty ``out_dir`` needs ``overwrite=True``.
    Returns the trained ``Tokenizer``.
    """
    if kind not in ("bpe", "sentencepiece"):
        raise LitModelError(f"unknown tokenizer kind {kind!r}; choose 'bpe' or 'sentencepiece'")
    if sp_model_type not in ("bpe", "unigram"):
        raise LitModelError(f"unknown SentencePiece model type {sp_model_type!r}; choose 'bpe' or 'unigram'")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LitModelError(f"--out_dir {str(out_dir)!r} is a file; choose a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise LitModelError(f"--out_dir {str(out_dir)!r} exists and is not empty; "
                            "pass --overwrite true or choose another directory")
    special_tokens = list(dict.fromkeys(special_tokens if special_tokens else DEFAULT_SPECIAL_TOKENS[kind]))
    if any(not t for t in special_tokens):
        raise LitModelError("--special_tokens contains an empty string; remove it")
    bos, eos, pad = _special_roles(special_tokens, bos_token, eos_token, pad_token)
    for tok in (bos, eos, pad):
        if tok is not None and tok not in special_tokens:
            special_tokens.append(tok)
    if kind == "sentencepiece" and "<unk>" not in special_tokens:
        special_tokens.insert(0, "<unk>")
    n_special = len(special_tokens)
    min_vocab = 256 + n_special + (1 if kind == "sentencepiece" else 0)
    if vocab_size < min_vocab:
        what = "256 byte tokens" + (" (byte fallback) plus at least one piece" if kind == "sentencepiece" else "")
        raise LitModelError(f"--vocab_size {vocab_size} is too small: {kind} needs {what} + {n_special} special "
                            f"tokens; use --vocab_size >= {min_vocab}")
    if min_frequency < 1:
        raise LitModelError(f"--min_frequency must be >= 1, got {min_frequency}")
    if max_bytes is not None and max_bytes <= 0:
        raise LitModelError(f"--max_bytes must be positive, got {max_bytes}")
    paths = find_text_files(files, glob)
    if not paths:
        shown = ", ".join(map(str, [files] if isinstance(files, (str, Path)) else files))
        raise LitModelError(f"no files matching {glob!r} in {shown}; pass --data_dir with text files or change --glob")
    texts = _read_texts(paths, max_bytes, show_progress)
    if add_bos_token is None:
        add_bos_token = kind == "sentencepiece"

    with atomic_dir(out_dir, overwrite=True) as tmp:
        if kind == "bpe":
            template_bos = bos if add_bos_token else None
            tk = _train_bpe(texts, vocab_size, special_tokens, min_frequency, template_bos, show_progress)
            tk.save(str(tmp / "tokenizer.json"))
            trained = tk.get_vocab_size(with_added_tokens=True)
            token_id = tk.token_to_id
            tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        else:
            model = _train_sentencepiece(texts, vocab_size, special_tokens, bos, eos, pad, sp_model_type, show_progress)
            (tmp / "tokenizer.model").write_bytes(model)
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_proto=model)
            trained = sp.get_piece_size()
            token_id = sp.piece_to_id
            # transformers' LlamaTokenizer reproduces SentencePiece BPE exactly; unigram models (trained without a
            # dummy prefix) load exactly through its generic SentencePiece converter
            tokenizer_config = {"tokenizer_class": "LlamaTokenizer", "legacy": False} if sp_model_type == "bpe" else {}
            tokenizer_config["unk_token"] = "<unk>"
        tokenizer_config.update({
            "bos_token": bos, "eos_token": eos, "pad_token": pad,
            "add_bos_token": bool(add_bos_token), "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000,
        })
        extra = [t for t in special_tokens if t not in ("<unk>", bos, eos, pad)]
        if extra:
            tokenizer_config["additional_special_tokens"] = extra
        gen_config = {"bos_token_id": token_id(bos), "eos_token_id": token_id(eos)}
        if pad is not None:
            gen_config["pad_token_id"] = token_id(pad)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps(gen_config, indent=2) + "\n", encoding="utf-8")
        Tokenizer(tmp)  # fail before publishing if the directory does not load
    if trained < vocab_size:
        print(f"warning: the trained vocabulary has {trained} tokens (< --vocab_size {vocab_size}): "
              "the text has too few distinct merges; add text or lower --vocab_size", file=sys.stderr)
    if show_progress:
        print(f"wrote a {kind} tokenizer with {trained} tokens to {out_dir}", file=sys.stderr)
    return Tokenizer(out_dir)


def _train_bpe(texts: list[str], vocab_size: int, special_tokens: list[str], min_frequency: int,
               bos_for_template: str | None, show_progress: bool):
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(BPE_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )

    def chunks() -> Iterator[str]:  # ~1 MB pieces cut at line ends, so the trainer sees newlines/indentation
        for text in texts:
            start = 0
            while start < len(text):
                end = text.find("\n", start + (1 << 20))
                end = len(text) if end < 0 else end + 1
                yield text[start:end]
                start = end

    tk.train_from_iterator(chunks(), trainer=trainer)
    if bos_for_template is not None:
        bos_id = tk.token_to_id(bos_for_template)
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos_for_template}:0 $A:0", pair=f"{bos_for_template}:0 $A:0 {bos_for_template}:1 $B:1",
            special_tokens=[(bos_for_template, bos_id)],
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return tk


def _train_sentencepiece(texts: list[str], vocab_size: int, special_tokens: list[str], bos: str, eos: str,
                         pad: str | None, model_type: str, show_progress: bool) -> bytes:
    import sentencepiece as spm

    roles = {"<unk>": "unk"}
    if bos != eos:
        roles[bos] = "bos"
    roles[eos] = "eos"
    if pad is not None and pad not in roles:
        roles[pad] = "pad"
    ids = {"unk": -1, "bos": -1, "eos": -1, "pad": -1}
    pieces = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
    # the unk/bos/eos/pad tokens get the first ids (in the order given), the other special tokens follow as
    # user-defined pieces (matched as whole tokens in text)
    next_id = 0
    for tok in special_tokens:
        if tok in roles:
            ids[roles[tok]] = next_id
            pieces[roles[tok]] = tok
            next_id += 1
    user_defined = [t for t in special_tokens if t not in roles]

    def sentences() -> Iterator[str]:
        for text in texts:
            for line in text.splitlines():
                if line.strip():
                    yield line

    model = io.BytesIO()
    if show_progress:
        print(f"training a SentencePiece {model_type} model (vocab_size={vocab_size}) ...", file=sys.stderr)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=model_type == "bpe", split_digits=True,
            allow_whitespace_only_pieces=True, max_sentence_length=16384, shuffle_input_sentence=True,
            unk_id=ids["unk"], bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"],
            unk_piece=pieces["unk"], bos_piece=pieces["bos"], eos_piece=pieces["eos"], pad_piece=pieces["pad"],
            user_defined_symbols=user_defined, minloglevel=2, num_threads=min(os.cpu_count() or 1, 16),
        )
    except RuntimeError as err:
        msg = " ".join(str(err).split()).rstrip(".")
        raise LitModelError(f"SentencePiece training failed: {msg}; adjust --vocab_size or add more text") from None
    return model.getvalue()
