"""Training a tokenizer on text files: byte-level BPE (``tokenizer.json``) or SentencePiece (``tokenizer.model``).

``train_tokenizer`` finds and reads the text files, trains, and writes a directory that ``litmodel.tokenizer.Tokenizer``
and ``transformers.AutoTokenizer`` load (it is also the command line of ``scripts/train_tokenizer.py``).
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Literal, Sequence

import sentencepiece as spm
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer
from tqdm import tqdm

from litmodel.tokenizer import Tokenizer
from litmodel.atomic import atomic_dir
from litmodel.utils import LitModelError

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
    data_dir: Sequence[str | Path] | str | Path,
    out_dir: str | Path,
    kind: Literal["bpe", "sentencepiece"] = "bpe",
    vocab_size: int = 8192,
    special_tokens: Sequence[str] | None = None,
    *,
    glob: str = "**/*.txt",
    sp_model_type: Literal["bpe", "unigram"] = "bpe",
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
    ``out_dir`` is written atomically. Returns the trained ``Tokenizer``.

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
        show_progress: Print progress and a summary to stderr.
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
    paths = find_text_files(data_dir, glob)
    if not paths:
        shown = ", ".join(map(str, [data_dir] if isinstance(data_dir, (str, Path)) else data_dir))
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
               bos_for_template: str | None, show_progress: bool) -> HFTokenizer:
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
