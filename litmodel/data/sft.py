"""Instruction / chat datasets for supervised finetuning (full or LoRA).

Data files (``--data JSON --data.json_path FILE``): ``.json`` holding a list of records, or ``.jsonl``
with one record per line. A record is either

* Alpaca form: ``{"instruction": str, "input": str (optional), "output": str}``, or
* chat form: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``.

Prompt styles (``prompt_style``; default ``"chat"`` when the tokenizer has a chat template, else
``"alpaca"``):

* ``"chat"``: the conversation is rendered with the checkpoint's chat template. An Alpaca record
  becomes ``[{"role": "user", "content": instruction + "\\n\\n" + input}, {"role": "assistant",
  "content": output}]`` (no ``"\\n\\n" + input`` when the input is empty). The ids are exactly
  ``tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)``.
  Assistant turn ``i`` spans from the end of the rendering of ``messages[:i]`` with the generation
  prompt to the end of the rendering of ``messages[:i+1]``, cut after its last end-of-turn token
  (``<|im_end|>``, ``<|eot_id|>``, EOS...). Both renderings must be token prefixes of the full
  conversation; a turn for which that fails is not learned (counted in ``stats["unstable_turns"]``,
  warned about once), a record with no learnable turn left is dropped, and a dataset with none left
  raises a `LitModelError` suggesting ``prompt_style="alpaca"``.
* ``"alpaca"``: the classic Alpaca prompt (``### Instruction:`` / ``### Input:`` / ``### Response:``),
  for base models. The prompt is encoded (with BOS as the tokenizer's config says), then the answer
  is encoded separately and EOS appended. Chat records must alternate user / assistant (after an
  optional system message, which replaces the Alpaca preamble); every assistant answer is learned.

Labels. Items are ``{"input_ids": (T,), "labels": (T,)}`` LongTensors, already shifted:
``labels[t]`` is the target for position ``t`` (the token ``t + 1``), ``-100`` where that token is
not produced by the assistant (system/user text, template markup, the generation prompt, padding).
So ``loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)`` (`sft_loss`),
with no shift in the training loop. Sequences with more than ``max_seq_length`` input tokens are
cut (``stats["truncated"]``); examples left without any label are dropped (``stats["no_labels"]``).

Batches. ``collate_fn`` pads to the longest sequence of the batch (``pad_id``; labels ``-100``).
With ``packed=True`` the training examples are packed (best-fit decreasing) into rows of at most
``max_seq_length`` tokens (`PackedBatches`); the batch then also has ``positions`` (B, T)
restarting at 0 for every example and a block-diagonal ``mask`` (B, 1, T, T) bool, so
``model(batch["input_ids"], positions=batch["positions"], mask=batch["mask"])`` gives every example
exactly the logits it gets alone. Validation batches are never packed.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import random
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from litmodel.utils import LitModelError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PROMPT_STYLES = ("chat", "alpaca")
ROLES = ("system", "user", "assistant", "tool")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.\n\n")

__all__ = [
    "ALPACA_PREAMBLE", "ALPACA_PREAMBLE_INPUT", "IGNORE_INDEX", "JSON", "JSONData", "PackedBatches", "SFTDataset",
    "alpaca_prompt", "collate_fn", "load_records", "pack_examples", "record_to_messages", "sft_loss",
    "tokenize_record",
]


# ---- reading and validating records --------------------------------------------------------------
def load_records(json_path: str | os.PathLike) -> list[dict]:
    """The validated records of a ``.json`` (list) or ``.jsonl`` file; one-line errors otherwise."""
    path = Path(json_path)
    records = read_records(path, "add Alpaca records (instruction, input, output) or chat records (messages)")
    for i, rec in enumerate(records):
        _check_record(rec, i, path)
    return records


def read_records(json_path: str | os.PathLike, what: str) -> list:
    """The records of a ``.json`` (list) or ``.jsonl`` file, unchecked; one-line errors for a missing, unreadable
    or empty file (``what``: how to fill an empty one)."""
    path = Path(json_path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise LitModelError(f"unknown data file format {path.suffix or path.name!r} ({path}); pass a .json file "
                            "holding a list of records or a .jsonl file with one record per line")
    if not path.is_file():
        raise LitModelError(f"data file {path} does not exist; pass an existing --data.json_path")
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            records = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as err:
            raise LitModelError(f"{path} is not valid JSON ({err}); fix the file (a list of records)") from None
        if isinstance(records, dict) and not records:
            records = []
        if not isinstance(records, list):
            raise LitModelError(f"{path} holds a JSON {type(records).__name__}, not a list of records; wrap the "
                                "records in [...] or use .jsonl with one record per line")
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise LitModelError(f"{path} line {lineno} is not valid JSON ({err.msg}); "
                                    "a .jsonl file needs one JSON object per line") from None
    if not records:
        raise LitModelError(f"{path} contains no records; {what}")
    return records


def check_messages(msgs: Any, where: str, key: str = "messages") -> None:
    """A non-empty list of ``{role, content}`` string objects with known roles, else a one-line error."""
    if not isinstance(msgs, list) or not msgs:
        raise LitModelError(f"{where}: '{key}' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise LitModelError(f"{where}: {key}[{j}] is not an object; use {{\"role\": ..., \"content\": ...}}")
        for field in ("role", "content"):
            if field not in m:
                raise LitModelError(f"{where}: {key}[{j}] is missing key {field!r}")
            if not isinstance(m[field], str):
                raise LitModelError(f"{where}: {key}[{j}].{field} must be a string, got {type(m[field]).__name__}")
        if m["role"] not in ROLES:
            raise LitModelError(f"{where}: {key}[{j}] has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")


def _check_record(rec: Any, i: int, path: Path) -> None:
    where = f"{path}: record {i}"
    if not isinstance(rec, dict):
        raise LitModelError(f"{where} is a JSON {type(rec).__name__}, not an object; each record needs "
                            "instruction/output keys (Alpaca) or a messages key (chat)")
    if "messages" in rec:
        msgs = rec["messages"]
        check_messages(msgs, where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise LitModelError(f"{where} has no assistant message, so nothing to learn; add one or remove the record")
        return
    if "instruction" in rec or "output" in rec:
        for key in ("instruction", "output"):
            if key not in rec:
                raise LitModelError(f"{where} is missing key {key!r}; Alpaca records need instruction, "
                                    "output and an optional input")
        for key in ("instruction", "input", "output"):
            if key in rec and rec[key] is not None and not isinstance(rec[key], str):
                raise LitModelError(f"{where}: key {key!r} must be a string, got {type(rec[key]).__name__}")
        return
    keys = ", ".join(sorted(map(str, rec))) or "none"
    raise LitModelError(f"{where} has an unknown format (keys: {keys}); use Alpaca keys instruction/input/output "
                        "or chat key messages")


def record_to_messages(rec: dict) -> list[dict]:
    """Chat messages of a record (an Alpaca record becomes one user and one assistant message)."""
    if "messages" in rec:
        return [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
    content = rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else "")
    return [{"role": "user", "content": content}, {"role": "assistant", "content": rec["output"]}]


# ---- prompts and tokenization --------------------------------------------------------------------
def alpaca_prompt(instruction: str, input: str = "", system: str | None = None) -> str:
    """The Alpaca prompt up to and including ``### Response:\\n`` (the answer follows directly)."""
    preamble = system + "\n\n" if system else (ALPACA_PREAMBLE_INPUT if input else ALPACA_PREAMBLE)
    text = f"{preamble}### Instruction:\n{instruction}\n\n"
    if input:
        text += f"### Input:\n{input}\n\n"
    return text + "### Response:\n"


def _alpaca_turns(rec_or_messages: dict | list[dict], where: str, need_answer: bool = True) -> list[tuple[str, str | None]]:
    """(prompt text, answer) pairs of an Alpaca-style rendering; the last answer is None for a prompt only."""
    if isinstance(rec_or_messages, dict) and "messages" not in rec_or_messages:
        rec = rec_or_messages
        return [(alpaca_prompt(rec["instruction"], rec.get("input") or ""), rec.get("output"))]
    msgs = rec_or_messages["messages"] if isinstance(rec_or_messages, dict) else rec_or_messages
    system = None
    if msgs and msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    turns: list[tuple[str, str | None]] = []
    for k in range(0, len(msgs), 2):
        user, answer = msgs[k], msgs[k + 1] if k + 1 < len(msgs) else None
        if user["role"] != "user" or (answer is not None and answer["role"] != "assistant"):
            raise LitModelError(f"{where}: the alpaca prompt style needs messages alternating user, assistant "
                                "(after an optional system message); use prompt_style='chat' for other conversations")
        prompt = alpaca_prompt(user["content"], system=system) if k == 0 else \
            f"### Instruction:\n{user['content']}\n\n### Response:\n"
        turns.append((prompt, answer["content"] if answer is not None else None))
    if not turns:
        raise LitModelError(f"{where}: no user message; the alpaca prompt style needs user/assistant pairs")
    if need_answer and turns[-1][1] is None:
        turns.pop()  # a trailing user message has no answer to learn
    return turns


def _end_of_turn_ids(tokenizer) -> set[int]:
    ids = getattr(tokenizer, "end_of_turn_ids", None) or getattr(tokenizer, "stop_ids", None) or set()
    ids = set(ids)
    if getattr(tokenizer, "eos_id", None) is not None:
        ids.add(tokenizer.eos_id)
    return ids


def _tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool], int]:
    """(ids, learn flag per id, number of assistant turns that were not prefix-stable)."""
    def render(msgs: list[dict], gen: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True))

    full = render(messages, False)
    learn = [False] * len(full)
    eot = _end_of_turn_ids(tokenizer)
    unstable = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:  # no prompt to render before it
            unstable += 1
            continue
        before = render(messages[:i], True)
        upto = full if i == len(messages) - 1 else render(messages[: i + 1], False)
        if len(upto) <= len(before) or full[: len(before)] != before or full[: len(upto)] != upto:
            unstable += 1
            continue
        start, end = len(before), len(upto)
        last = max((j for j in range(start, end) if full[j] in eot), default=None)
        if last is not None:
            end = last + 1  # e.g. learn "...<|im_end|>" but not the "\n" the template writes after it
        learn[start:end] = [True] * (end - start)
    return full, learn, unstable


def _tokenize_alpaca(tokenizer, turns: list[tuple[str, str | None]]) -> tuple[list[int], list[bool]]:
    if tokenizer.eos_id is None:
        raise LitModelError("the tokenizer has no EOS token, which the alpaca prompt style appends after each answer; "
                            "use a tokenizer with an eos_token")
    ids: list[int] = []
    learn: list[bool] = []
    for k, (prompt, answer) in enumerate(turns):
        p = tokenizer.encode(prompt, bos=None if k == 0 else False)
        ids += p
        learn += [False] * len(p)
        if answer is not None:
            a = tokenizer.encode(answer, bos=False, eos=False) + [tokenizer.eos_id]
            ids += a
            learn += [True] * len(a)
    return ids, learn


def tokenize_record(tokenizer, rec: dict, prompt_style: str, where: str = "record") -> tuple[list[int], list[bool], int]:
    """(token ids, learn flag per token, unstable assistant turns) of one validated record."""
    if prompt_style == "chat":
        return _tokenize_chat(tokenizer, record_to_messages(rec))
    ids, learn = _tokenize_alpaca(tokenizer, _alpaca_turns(rec, where))
    return ids, learn, 0


def _resolve_prompt_style(tokenizer, prompt_style: str | None) -> str:
    has_template = bool(getattr(tokenizer, "has_chat_template", False))
    if prompt_style is None:
        return "chat" if has_template else "alpaca"
    if prompt_style not in PROMPT_STYLES:
        raise LitModelError(f"unknown prompt_style {prompt_style!r}; choose {' or '.join(PROMPT_STYLES)}")
    if prompt_style == "chat" and not has_template:
        raise LitModelError("prompt_style 'chat' needs a chat template but the tokenizer has none; "
                            "use prompt_style='alpaca' for base models")
    return prompt_style


# ---- datasets ------------------------------------------------------------------------------------
class SFTDataset(Dataset):
    """Tokenized examples: item ``i`` is ``{"input_ids": LongTensor (T,), "labels": LongTensor (T,)}``.

    ``stats``: examples, tokens (input tokens in all), truncated, no_labels (dropped), unstable_turns,
    unstable_dropped, prompt_style, max_seq_length.
    """

    def __init__(self, records: Sequence[dict], tokenizer, max_seq_length: int, prompt_style: str | None = None,
                 source: str = "data", record_ids: Sequence[int] | None = None) -> None:
        if max_seq_length is None or max_seq_length < 1:
            raise LitModelError(f"max_seq_length must be >= 1, got {max_seq_length}")
        self.prompt_style = _resolve_prompt_style(tokenizer, prompt_style)
        self.max_seq_length = max_seq_length
        self.examples: list[tuple[torch.Tensor, torch.Tensor]] = []
        truncated = no_labels = unstable_turns = unstable_dropped = tokens = 0
        record_ids = list(range(len(records))) if record_ids is None else list(record_ids)
        for i, rec in zip(record_ids, records):
            ids, learn, unstable = tokenize_record(tokenizer, rec, self.prompt_style, f"{source}: record {i}")
            unstable_turns += unstable
            if unstable and not any(learn):
                unstable_dropped += 1
                continue
            input_ids = ids[:-1]
            labels = [t if ok else IGNORE_INDEX for t, ok in zip(ids[1:], learn[1:])]
            if len(input_ids) > max_seq_length:
                truncated += 1
                input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
            if all(t == IGNORE_INDEX for t in labels):
                no_labels += 1
                continue
            tokens += len(input_ids)
            self.examples.append((torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)))
        if unstable_turns:
            log.warning("%s: %d assistant turn(s) could not be located by rendering prefixes with the chat template "
                        "(the template is not prefix-stable); they are not learned (%d record(s) dropped). "
                        "Use prompt_style='alpaca' or a prefix-stable template to learn them.",
                        source, unstable_turns, unstable_dropped)
        if records and not self.examples:
            if unstable_dropped:
                raise LitModelError(f"{source}: the chat template is not prefix-stable, so no assistant turn could be "
                                    "located; use prompt_style='alpaca' or fix the template")
            raise LitModelError(f"{source}: no example has an answer token within max_seq_length={max_seq_length}; "
                                "raise max_seq_length or shorten the prompts")
        self.stats = dict(examples=len(self.examples), tokens=tokens, truncated=truncated, no_labels=no_labels,
                          unstable_turns=unstable_turns, unstable_dropped=unstable_dropped,
                          prompt_style=self.prompt_style, max_seq_length=max_seq_length)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        input_ids, labels = self.examples[i]
        return {"input_ids": input_ids, "labels": labels}

    def lengths(self) -> list[int]:
        return [len(x) for x, _ in self.examples]


def pack_examples(lengths: Sequence[int], max_seq_length: int, seed: int = 42) -> list[list[int]]:
    """Rows of example indices, each row's total length <= ``max_seq_length`` (best-fit decreasing),
    the rows in a seeded random order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row index)
    for i in order:
        n = lengths[i]
        if n > max_seq_length:
            raise ValueError(f"example {i} has {n} tokens > max_seq_length {max_seq_length}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            cap, r = free.pop(k)
        else:
            cap, r = max_seq_length, len(rows)
            rows.append([])
        rows[r].append(i)
        if cap - n > 0:
            bisect.insort(free, (cap - n, r))
    random.Random(seed).shuffle(rows)
    return rows


class PackedBatches(Dataset):
    """Examples of an `SFTDataset` packed into rows of at most ``max_seq_length`` tokens.

    Item ``i``: ``input_ids``, ``labels`` (the examples' own, concatenated), ``positions`` (restarting
    at 0 per example) and ``segment_ids`` (0, 1, ... per example); `collate_fn` turns the segment ids
    into the block-diagonal attention ``mask``.
    """

    def __init__(self, dataset: SFTDataset, max_seq_length: int | None = None, seed: int = 42) -> None:
        self.dataset = dataset
        self.max_seq_length = max_seq_length or dataset.max_seq_length
        self.rows = pack_examples(dataset.lengths(), self.max_seq_length, seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        items = [self.dataset[j] for j in self.rows[i]]
        return {
            "input_ids": torch.cat([it["input_ids"] for it in items]),
            "labels": torch.cat([it["labels"] for it in items]),
            "positions": torch.cat([torch.arange(len(it["input_ids"])) for it in items]),
            "segment_ids": torch.cat([torch.full((len(it["input_ids"]),), k) for k, it in enumerate(items)]),
        }


def collate_fn(batch: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence (right padding: ``pad_id`` inputs, ``-100`` labels).

    Packed items (with ``segment_ids``) also give ``positions`` (B, T) and ``mask`` (B, 1, T, T) bool:
    True where query and key belong to the same example (padding forms its own block).
    """
    T = max(len(it["input_ids"]) for it in batch)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.stack([F.pad(it[key], (0, T - len(it[key])), value=value) for it in batch])

    out = {"input_ids": pad("input_ids", pad_id), "labels": pad("labels", IGNORE_INDEX)}
    if "segment_ids" in batch[0]:
        seg = pad("segment_ids", -1)
        out["positions"] = pad("positions", 0)
        out["mask"] = (seg[:, :, None] == seg[:, None, :]).unsqueeze(1)
    return out


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of (B, T, V) logits against the already-shifted (B, T) labels, ignoring -100."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


# ---- splitting ----------------------------------------------------------------------------------
def split_indices(n: int, val_split_fraction: float, seed: int, source: str | os.PathLike) -> tuple[list[int], list[int]]:
    """(train, validation) record indices: ``val_split_fraction`` of ``n`` (at least one when > 0 and n >= 2),
    chosen by a ``seed``-ed shuffle (the same split every run), each list sorted."""
    n_val = int(round(n * val_split_fraction))
    if val_split_fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1
    if n_val >= n:
        raise LitModelError(f"{source}: {n} record(s) leave nothing for training with "
                            f"val_split_fraction={val_split_fraction}; add records or lower it")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[n_val:]), sorted(order[:n_val])


# ---- the data module -----------------------------------------------------------------------------
class RecordData:
    """Records from one ``.json`` or ``.jsonl`` file, split into training and validation, tokenized, batched:
    what the SFT data (`JSONData`) and the preference pairs (`litmodel.data.preference.PreferenceData`) share.
    A subclass says how records are read (`_load_records`), tokenized (`_dataset`), batched (`_collate`) and
    described (`describe`).

    ``val_split_fraction`` of the records (at least one when > 0 and there are >= 2 records) go to
    validation, chosen by a ``seed``-ed shuffle (the same split every run).
    """

    def __init__(self, json_path: str | Path, val_split_fraction: float = 0.05, prompt_style: str | None = None,
                 packed: bool = False, seed: int = 42, num_workers: int = 0) -> None:
        if not 0.0 <= val_split_fraction < 1.0:
            raise LitModelError(f"val_split_fraction must be in [0, 1), got {val_split_fraction}")
        if prompt_style is not None and prompt_style not in PROMPT_STYLES:
            raise LitModelError(f"unknown prompt_style {prompt_style!r}; choose {' or '.join(PROMPT_STYLES)}")
        self.json_path = Path(json_path)
        self.val_split_fraction = val_split_fraction
        self.prompt_style = prompt_style
        self.packed = packed
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer = None
        self.max_seq_length: int | None = None
        self.train_dataset: SFTDataset | None = None
        self.val_dataset: SFTDataset | None = None

    def setup(self, tokenizer, max_seq_length: int) -> None:
        """Read, validate, split and tokenize the records. ``tokenizer``: a `Tokenizer` or its dir."""
        if isinstance(tokenizer, (str, os.PathLike)):
            from litmodel.tokenizer import Tokenizer

            tokenizer = Tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.prompt_style = _resolve_prompt_style(tokenizer, self.prompt_style)
        records = self._load_records()
        train_idx, val_idx = split_indices(len(records), self.val_split_fraction, self.seed, self.json_path)
        self.train_dataset = self._dataset(records, train_idx)
        self.val_dataset = self._dataset(records, val_idx) if val_idx else None

    # what a subclass says: how records are read, tokenized and batched
    def _load_records(self) -> list[dict]:
        raise NotImplementedError

    def _dataset(self, records: list[dict], ids: list[int]) -> Dataset:
        raise NotImplementedError

    def _collate(self):
        return partial(collate_fn, pad_id=self.pad_id)

    @property
    def pad_id(self) -> int:
        tok = self._tok()
        for value in (getattr(tok, "pad_id", None), getattr(tok, "eos_id", None)):
            if value is not None:
                return value
        return 0

    @property
    def stats(self) -> dict[str, dict]:
        """``{"train": {...}, "val": {...}}`` dataset stats (truncated counts etc.) for the caller to log."""
        self._tok()
        return {"train": self.train_dataset.stats, "val": self.val_dataset.stats if self.val_dataset else None}

    def _tok(self):
        if self.tokenizer is None or self.train_dataset is None:
            raise RuntimeError(f"call {type(self).__name__}.setup(tokenizer, max_seq_length) first")
        return self.tokenizer

    def train_dataloader(self, batch_size: int) -> DataLoader:
        self._tok()
        dataset = PackedBatches(self.train_dataset, self.max_seq_length, self.seed) if self.packed \
            else self.train_dataset
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed), collate_fn=self._collate())

    def val_dataloader(self, batch_size: int) -> DataLoader | None:
        """Padded (never packed) validation batches in file order; None when there is no val split."""
        self._tok()
        if self.val_dataset is None:
            return None
        return DataLoader(self.val_dataset, batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=self._collate())

    def format_prompt(self, instruction_or_messages: str | dict | list[dict]) -> list[int]:
        """Prompt ids (ending with the generation prompt / ``### Response:``) for sampling during training.

        A string is a user instruction; a dict an Alpaca record (``instruction``, optional ``input``)
        or a chat record; a list a conversation (ending with a user message)."""
        tok = self._tok()
        x = instruction_or_messages
        if isinstance(x, dict) and "messages" in x:
            x = x["messages"]
        if self.prompt_style == "chat":
            if isinstance(x, str):
                messages = [{"role": "user", "content": x}]
            elif isinstance(x, dict):
                messages = record_to_messages({**x, "output": ""})[:1]
            else:
                messages = list(x)
            return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        if isinstance(x, str):
            turns = [(alpaca_prompt(x), None)]
        elif isinstance(x, dict):
            turns = [(alpaca_prompt(x["instruction"], x.get("input") or ""), None)]
        else:
            turns = _alpaca_turns(list(x), "prompt", need_answer=False)
            if turns[-1][1] is not None:
                raise LitModelError("format_prompt needs a conversation that ends with a user message")
        ids, _ = _tokenize_alpaca(tok, turns)
        return ids

    def describe(self) -> str:
        raise NotImplementedError


class JSONData(RecordData):
    """Instruction / chat finetuning data from one ``.json`` or ``.jsonl`` file (see the module doc).

    ``val_split_fraction`` of the records (at least one when > 0 and there are >= 2 records) go to
    validation, chosen by a ``seed``-ed shuffle (the same split every run).
    """

    def _load_records(self) -> list[dict]:
        return load_records(self.json_path)

    def _dataset(self, records: list[dict], ids: list[int]) -> SFTDataset:
        return SFTDataset([records[i] for i in ids], self.tokenizer, self.max_seq_length, self.prompt_style,
                          source=str(self.json_path), record_ids=ids)

    def describe(self) -> str:
        """One line for the training log: sizes, prompt style, truncations, dropped examples."""
        s = self.stats
        tr, va = s["train"], s["val"]
        parts = [f"{self.json_path}: {tr['examples']} train / {va['examples'] if va else 0} val examples",
                 f"prompt_style={self.prompt_style}", f"packed={self.packed}"]
        for key in ("truncated", "no_labels", "unstable_dropped"):
            total = tr[key] + (va[key] if va else 0)
            if total:
                parts.append(f"{key}={total} (max_seq_length={self.max_seq_length})" if key == "truncated"
                             else f"{key}={total}")
        return ", ".join(parts)


class JSON(JSONData):
    """Instruction/chat data from a .json (a list of records) or .jsonl file (``--data JSON``).

    The same as `JSONData`; a subclass so that the short name resolves on the command line.
    """

    def __init__(self, json_path: Union[str, Path], val_split_fraction: float = 0.05,
                 prompt_style: Optional[str] = None, packed: bool = False, seed: int = 42,
                 num_workers: int = 0) -> None:
        """
        Args:
            json_path: The data file: .json holding a list of records, or .jsonl with one record per line; a
                record is {"instruction", "input" (optional), "output"} or {"messages": [{"role", "content"}...]}.
            val_split_fraction: Fraction of the records held out for validation (at least one record).
            prompt_style: chat (the checkpoint's chat template) or alpaca (### Instruction / ### Response, for
                base models); default: chat when the tokenizer has a chat template, else alpaca.
            packed: Pack training examples into rows of max_seq_length tokens (no padding; each example still
                attends only to itself).
            seed: Seed of the validation split (the same split every run) and of the packing order.
            num_workers: DataLoader worker processes.
        """
        super().__init__(json_path, val_split_fraction, prompt_style, packed, seed, num_workers)
