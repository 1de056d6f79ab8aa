"""One ``Tokenizer`` over a checkpoint's tokenizer files: load, encode, decode (also streaming), chat templates.

Reads ``tokenizer.json`` (HF ``tokenizers``) or ``tokenizer.model`` (``sentencepiece``; ``tokenizer.json`` wins when
both exist, as in transformers' fast tokenizer), and the special tokens / defaults from ``tokenizer_config.json``,
``special_tokens_map.json`` and ``generation_config.json``. Encoding, decoding and chat-template rendering give the
same results as ``transformers.AutoTokenizer`` on the same directory (see ``tests/test_tokenizer.py``).
This module also owns the list of tokenizer files (``TOKENIZER_FILES``), ``copy_tokenizer_files`` and
``load_tokenizer``. Chat templates: ``litmodel.chat_template``; the SentencePiece backend:
``litmodel.tokenizer_sentencepiece``; training a tokenizer: ``litmodel.tokenizer_training``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer


from litmodel.chat_template import (
    END_OF_TURN_TOKENS,
    FALLBACK_CHAT_TEMPLATE,
    read_chat_template,
    render_chat_template,
)
from litmodel.tokenizer_sentencepiece import SentencePieceModel, token_str
from litmodel.utils import LitModelError

# The files that hold the tokenizer itself (vocabulary, merges); `Tokenizer` reads the first one present.
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model")
# Everything a checkpoint dir carries for its tokenizer: what conversion, download and finetuning copy.
TOKENIZER_FILES = (
    *TOKENIZER_MODEL_FILES,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
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
            for name in TOKENIZER_MODEL_FILES:
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
            value = token_str(config.get(name)) if name in config else token_str(special_map.get(name))
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

        self.chat_template: str | None = read_chat_template(path, config)

    # ------------------------------------------------------------------ loading
    def _load_tokenizers(self, model_file: Path) -> None:
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
        self._sp = SentencePieceModel(model_file, config)
        self._tk = None
        self._hold_ids = frozenset()
        self._special_ids = self._sp.special_ids
        self._model_bos, self._model_eos, self._model_pad = self._sp.bos_id, self._sp.eos_id, self._sp.pad_id
        self.vocab_size = self._sp.vocab_size

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
        return self._sp.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        if self._tk is not None:
            return self._tk.id_to_token(int(idx))
        return self._sp.id_to_token(idx)

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
            ids = self._sp.encode(text)
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

    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list, tensor or single id); special tokens are kept unless ``skip_special_tokens``."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if self._tk is not None:
            return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._sp.decode(ids, skip_special_tokens)

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
        text = render_chat_template(FALLBACK_CHAT_TEMPLATE if fallback else template, messages,
                                    {**self.special_tokens, **kwargs}, add_generation_prompt, tools, documents)
        if not tokenize:
            return text
        return self.encode(text, bos=None if fallback else False, eos=False)


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
                shutil.copy2(src / name, dst / name)  # follows links (the HF cache's snapshot files are links)
            copied.append(dst / name)
    return copied


def load_tokenizer(directory: str | Path, fix: str | None = None) -> Tokenizer:
    """``Tokenizer(directory)``, after checking that the directory holds a tokenizer (a one-line error naming the
    directory and ``fix``, by default: copy the base model's tokenizer files or re-download)."""
    directory = Path(directory)
    if not any((directory / name).is_file() for name in TOKENIZER_MODEL_FILES):
        raise missing_tokenizer_error(directory, fix)
    return Tokenizer(directory)


def missing_tokenizer_error(directory: Path, fix: str | None = None) -> LitModelError:
    """The error for a directory without ``tokenizer.json``/``tokenizer.model``, ending in ``fix``."""
    fix = fix or ("copy the tokenizer files of the base model into it or re-download with "
                  "`python scripts/download.py`")
    if not directory.exists():
        return LitModelError(f"tokenizer dir {directory} does not exist; {fix}")
    return LitModelError(f"{directory} has no tokenizer (tokenizer.json or tokenizer.model); {fix}")
