"""Preference pairs for DPO, in TRL's common shapes.

Data files (``--data JSON --data.json_path FILE``): ``.json`` holding a list of records, or ``.jsonl``
with one record per line. A record is ``{"prompt", "chosen", "rejected"}`` where

* ``prompt`` is a string (one user message) or a list of chat messages (``{"role", "content"}``,
  not ending with an assistant message);
* ``chosen`` and ``rejected`` are strings, an assistant message, or a list holding one assistant
  message (TRL's conversational form);
* without ``prompt`` (TRL's "implicit prompt"), ``chosen`` and ``rejected`` are whole conversations
  that differ only in their last (assistant) message; the shared messages before it are the prompt.

Rendering is the SFT data code's (`litmodel.data.prompts`), so a pair's tokens are exactly what SFT and
generate/chat.py produce. ``prompt_style="chat"`` (the default when the tokenizer has a chat
template): ``prompt + [assistant answer]`` is rendered with the checkpoint's chat template; the
answer spans from the end of the prompt rendered with the generation prompt to the answer's last
end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, EOS...), which is learned too. A template that is
not prefix-stable for a record drops it (counted, warned about). ``prompt_style="alpaca"``: the
Alpaca prompt, then the answer and EOS (for base models).

Truncation. A pair whose longer sequence has more than ``max_seq_length`` input tokens loses the
start of its prompt first (the text farthest from the answer; the same cut for chosen and
rejected); only when one prompt token is left are the answers cut at the end. Truncated pairs are
counted (``stats["truncated"]``). Pairs whose chosen answer equals the rejected one (also: whose answers
differ only after the cut) carry no preference signal: they are skipped with a warning and counted
(``stats["identical"]``).

Items and batches. Item ``i`` holds ``chosen_input_ids``/``chosen_labels`` and
``rejected_input_ids``/``rejected_labels`` (LongTensors, labels already shifted: ``-100`` except on
answer tokens, as in SFT), ``index`` (the pair's position in the dataset) and, once reference
log-probs are attached (`PreferenceDataset.reference`), ``ref_logps`` (2,): (chosen, rejected).
`collate_pairs` stacks a batch of ``B`` pairs into ``2B`` rows, chosen first, padded to the longest
row, so one forward scores both answers of every pair (see `litmodel.dpo`).
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from litmodel.data.prompts import alpaca_turns, tokenize_alpaca, tokenize_chat
from litmodel.data.record_data import RecordData, RecordDataset
from litmodel.data.records import check_messages, read_records
from litmodel.losses import IGNORE_INDEX
from litmodel.utils import LitModelError

log = logging.getLogger(__name__)

Prompt = Union[str, list]

__all__ = ["JSON", "PreferenceData", "PreferenceDataset", "collate_pairs", "load_preference_records",
           "record_parts", "tokenize_answer", "truncate_pair"]


# ---- reading and validating records --------------------------------------------------------------
def load_preference_records(json_path: str | os.PathLike) -> list[dict]:
    """The validated records of a ``.json`` (list) or ``.jsonl`` file; one-line errors otherwise."""
    path = Path(json_path)
    records = read_records(path, "add records with prompt, chosen and rejected keys")
    for i, rec in enumerate(records):
        record_parts(rec, f"{path}: record {i}")
    return records


def _answer_text(value: Any, where: str, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        check_messages(value, where, key)
        if len(value) == 1 and value[0]["role"] == "assistant":
            return value[0]["content"]
    raise LitModelError(f"{where}: '{key}' must be a string, an assistant message or a list holding one assistant "
                        "message (or, without 'prompt', a whole conversation ending with the assistant's answer)")


def record_parts(rec: Any, where: str = "record") -> tuple[Prompt, str, str]:
    """(prompt: a string or a list of messages, chosen answer text, rejected answer text) of a record, or a
    one-line `LitModelError` naming the record and what is wrong."""
    if not isinstance(rec, dict):
        raise LitModelError(f"{where} is a JSON {type(rec).__name__}, not an object; each record needs prompt, "
                            "chosen and rejected keys")
    for key in ("chosen", "rejected"):
        if key not in rec:
            keys = ", ".join(sorted(map(str, rec))) or "none"
            raise LitModelError(f"{where} is missing key {key!r} (keys: {keys}); preference records need prompt, "
                                "chosen and rejected")
    if "prompt" not in rec:  # implicit prompt: two conversations sharing everything but the last message
        chosen, rejected = rec["chosen"], rec["rejected"]
        for key, conv in (("chosen", chosen), ("rejected", rejected)):
            check_messages(conv, where, key)
            if len(conv) < 2 or conv[-1]["role"] != "assistant":
                raise LitModelError(f"{where} has no 'prompt', so '{key}' must be a conversation ending with the "
                                    "assistant's answer; add a 'prompt' key")
        if chosen[:-1] != rejected[:-1]:
            raise LitModelError(f"{where}: without 'prompt', chosen and rejected must share every message but the "
                                "last; add a 'prompt' key")
        return [dict(m) for m in chosen[:-1]], chosen[-1]["content"], rejected[-1]["content"]
    prompt = rec["prompt"]
    if isinstance(prompt, list):
        check_messages(prompt, where, "prompt")
        if prompt[-1]["role"] == "assistant":
            raise LitModelError(f"{where}: 'prompt' ends with an assistant message; the answers belong in chosen "
                                "and rejected")
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    elif not isinstance(prompt, str):
        raise LitModelError(f"{where}: 'prompt' must be a string or a list of chat messages, got "
                            f"{type(prompt).__name__}")
    return prompt, _answer_text(rec["chosen"], where, "chosen"), _answer_text(rec["rejected"], where, "rejected")


# ---- tokenization --------------------------------------------------------------------------------
def _prompt_messages(prompt: Prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def tokenize_answer(tokenizer, prompt: Prompt, answer: str, prompt_style: str,
                    where: str = "record") -> Optional[tuple[list[int], int]]:
    """(ids of prompt + answer up to its end-of-turn token, number of prompt ids), rendered exactly as the SFT
    data renders the conversation; None when the chat template is not prefix-stable for it."""
    messages = _prompt_messages(prompt) + [{"role": "assistant", "content": answer}]
    if prompt_style == "chat":
        ids, learn, _ = tokenize_chat(tokenizer, messages)
        start = len(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True))
    else:
        turns = alpaca_turns({"instruction": prompt, "output": answer} if isinstance(prompt, str) else messages,
                              where)
        ids, learn = tokenize_alpaca(tokenizer, turns)
        start = len(tokenize_alpaca(tokenizer, turns[:-1] + [(turns[-1][0], None)])[0])
    answer_at = [j for j in range(start, len(ids)) if learn[j]]
    if not answer_at or start < 1:
        return None
    return ids[: answer_at[-1] + 1], start


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int],
                  max_seq_length: int) -> tuple[list[int], list[int], list[int], bool]:
    """Cut the start of the prompt, then (with one prompt token left) the ends of the answers, until both
    ``prompt + answer`` rows have at most ``max_seq_length`` input tokens (one fewer than their ids)."""
    excess = len(prompt) + max(len(chosen), len(rejected)) - 1 - max_seq_length
    if excess <= 0:
        return prompt, chosen, rejected, False
    prompt = prompt[min(excess, len(prompt) - 1):]
    room = max_seq_length + 1 - len(prompt)
    return prompt, chosen[:room], rejected[:room], True


def _row(prompt: list[int], answer: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, already-shifted labels): the labels are the answer tokens only."""
    ids = prompt + answer
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + answer
    return torch.tensor(ids[:-1], dtype=torch.long), torch.tensor(labels, dtype=torch.long)


# ---- the dataset ---------------------------------------------------------------------------------
class PreferenceDataset(RecordDataset):
    """Tokenized pairs (see the module doc). ``stats``: pairs, tokens (input tokens of both rows), truncated,
    identical (skipped), unstable (skipped: the chat template is not prefix-stable), prompt_style, max_seq_length.
    ``reference``: None, or a (len, 2) float tensor of reference log-prob sums (chosen, rejected) per pair."""

    def __init__(self, records: Sequence[dict], tokenizer, max_seq_length: int, prompt_style: str | None = None,
                 source: str = "data", record_ids: Sequence[int] | None = None) -> None:
        super().__init__(tokenizer, max_seq_length, prompt_style)
        self.pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.prompts: list[Prompt] = []
        self.reference: Optional[torch.Tensor] = None
        truncated = identical = unstable = tokens = 0
        record_ids = list(range(len(records))) if record_ids is None else list(record_ids)
        for i, rec in zip(record_ids, records):
            where = f"{source}: record {i}"
            prompt, chosen, rejected = record_parts(rec, where)
            if chosen == rejected:
                identical += 1
                continue
            c = tokenize_answer(tokenizer, prompt, chosen, self.prompt_style, where)
            r = tokenize_answer(tokenizer, prompt, rejected, self.prompt_style, where)
            if c is None or r is None or c[0][: c[1]] != r[0][: r[1]]:
                unstable += 1
                continue
            prompt_ids = c[0][: c[1]]
            prompt_ids, c_ids, r_ids, cut = truncate_pair(prompt_ids, c[0][c[1]:], r[0][r[1]:], max_seq_length)
            if c_ids == r_ids:  # the answers differ only after the cut
                identical += 1
                continue
            truncated += cut
            self.pairs.append((*_row(prompt_ids, c_ids), *_row(prompt_ids, r_ids)))
            self.prompts.append(prompt)
            tokens += 2 * len(prompt_ids) + len(c_ids) + len(r_ids) - 2
        if identical:
            log.warning("%s: %d record(s) have a chosen answer identical to the rejected one; they carry no "
                        "preference signal and are skipped", source, identical)
        if unstable:
            log.warning("%s: %d record(s) skipped: the chat template is not prefix-stable for them (the prompt "
                        "rendered alone is not a prefix of prompt + answer); use prompt_style='alpaca' or fix the "
                        "template", source, unstable)
        self.stats = dict(pairs=len(self.pairs), tokens=tokens, truncated=truncated, identical=identical,
                          unstable=unstable, prompt_style=self.prompt_style, max_seq_length=max_seq_length)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        c_x, c_y, r_x, r_y = self.pairs[i]
        item = {"chosen_input_ids": c_x, "chosen_labels": c_y, "rejected_input_ids": r_x, "rejected_labels": r_y,
                "index": torch.tensor(i)}
        if self.reference is not None:
            item["ref_logps"] = self.reference[i]
        return item

    def lengths(self) -> list[int]:
        """Input tokens of both rows of each pair."""
        return [len(c) + len(r) for c, _, r, _ in self.pairs]


def collate_pairs(items: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids``/``labels`` (2B, T): the chosen rows of the B pairs, then their rejected rows, right-padded
    (``pad_id`` inputs, ``-100`` labels); ``index`` (B,); ``ref_logps`` (2B,) when the items carry it;
    ``n_tokens``: the non-padding input tokens."""
    inputs = [it["chosen_input_ids"] for it in items] + [it["rejected_input_ids"] for it in items]
    labels = [it["chosen_labels"] for it in items] + [it["rejected_labels"] for it in items]
    T = max(len(x) for x in inputs)
    out = {"input_ids": torch.stack([F.pad(x, (0, T - len(x)), value=pad_id) for x in inputs]),
           "labels": torch.stack([F.pad(y, (0, T - len(y)), value=IGNORE_INDEX) for y in labels]),
           "index": torch.stack([it["index"] for it in items]),
           "n_tokens": torch.tensor(sum(len(x) for x in inputs))}
    if "ref_logps" in items[0]:
        refs = torch.stack([it["ref_logps"] for it in items])  # (B, 2)
        out["ref_logps"] = torch.cat([refs[:, 0], refs[:, 1]])
    return out


# ---- the data module -----------------------------------------------------------------------------
class PreferenceData(RecordData):
    """Preference pairs from one ``.json`` or ``.jsonl`` file (see the module doc): the record data module SFT uses
    too (`litmodel.data.record_data.RecordData`: split, prompt style, loaders, `format_prompt`) with pair records,
    pair datasets and pair batches; never packed.

    ``val_split_fraction`` of the records (at least one when > 0 and there are >= 2 records) go to
    validation, chosen by a ``seed``-ed shuffle (the same split every run).
    """

    def __init__(self, json_path: str | Path, val_split_fraction: float = 0.05, prompt_style: str | None = None,
                 seed: int = 42, num_workers: int = 0) -> None:
        super().__init__(json_path, val_split_fraction, prompt_style, packed=False, seed=seed, num_workers=num_workers)

    def setup(self, tokenizer, max_seq_length: int) -> None:
        """Read, validate, split and tokenize the records. ``tokenizer``: a `Tokenizer` or its dir."""
        super().setup(tokenizer, max_seq_length)
        if not len(self.train_dataset):
            s = self.train_dataset.stats
            raise LitModelError(f"{self.json_path}: no usable training pair ({s['identical']} with chosen identical to "
                                f"rejected, {s['unstable']} the chat template cannot split); add pairs whose answers "
                                "differ")

    def _load_records(self) -> list[dict]:
        return load_preference_records(self.json_path)

    def _dataset(self, records: list[dict], ids: list[int]) -> PreferenceDataset:
        return PreferenceDataset([records[i] for i in ids], self.tokenizer, self.max_seq_length, self.prompt_style,
                                 source=str(self.json_path), record_ids=ids)

    def _collate(self):
        return partial(collate_pairs, pad_id=self.pad_id)

    def describe(self) -> str:
        """One line for the training log: sizes, prompt style, truncated and skipped pairs."""
        tr, va = self.stats["train"], self.stats["val"]
        parts = [f"{self.json_path}: {tr['pairs']} train / {va['pairs'] if va else 0} val preference pairs",
                 f"prompt_style={self.prompt_style}"]
        for key in ("truncated", "identical", "unstable"):
            total = tr[key] + (va[key] if va else 0)
            if total:
                parts.append(f"{key}={total} (max_seq_length={self.max_seq_length}, prompts cut first)"
                             if key == "truncated" else f"{key}={total} (skipped)")
        return ", ".join(parts)


class JSON(PreferenceData):
    """Preference pairs from a .json (a list of records) or .jsonl file (``--data JSON``).

    The same as `PreferenceData`; a subclass so that the short name resolves on the command line.
    """

    def __init__(self, json_path: Union[str, Path], val_split_fraction: float = 0.05,
                 prompt_style: Optional[str] = None, seed: int = 42, num_workers: int = 0) -> None:
        """
        Args:
            json_path: The data file: .json holding a list of records, or .jsonl with one record per line; a record
                is {"prompt": str or chat messages, "chosen": str or assistant message, "rejected": ...}.
            val_split_fraction: Fraction of the records held out for validation (at least one record).
            prompt_style: chat (the checkpoint's chat template) or alpaca (### Instruction / ### Response, for
                base models); default: chat when the tokenizer has a chat template, else alpaca.
            seed: Seed of the validation split (the same split every run).
            num_workers: DataLoader worker processes.
        """
        super().__init__(json_path, val_split_fraction, prompt_style, seed, num_workers)
