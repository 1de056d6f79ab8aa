"""Instruction / chat datasets for supervised finetuning (full or LoRA).

Records (``--data JSON --data.json_path FILE``) are read and checked by `litmodel.data.records` (Alpaca
``{"instruction", "input", "output"}`` or chat ``{"messages": [...]}``) and rendered by `litmodel.data.prompts`
(``prompt_style`` chat or alpaca); `litmodel.data.record_data.RecordData` splits and loads them.

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
import logging
import random
from functools import partial
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from litmodel.data.prompts import tokenize_record
from litmodel.data.record_data import RecordData, RecordDataset
from litmodel.data.records import load_records
from litmodel.losses import IGNORE_INDEX
from litmodel.utils import LitModelError

log = logging.getLogger(__name__)


__all__ = ["JSON", "JSONData", "PackedBatches", "SFTDataset", "collate_fn", "pack_examples", "sft_loss"]


class SFTDataset(RecordDataset):
    """Tokenized examples: item ``i`` is ``{"input_ids": LongTensor (T,), "labels": LongTensor (T,)}``.

    ``stats``: examples, tokens (input tokens in all), truncated, no_labels (dropped), unstable_turns,
    unstable_dropped, prompt_style, max_seq_length.
    """

    def __init__(self, records: Sequence[dict], tokenizer, max_seq_length: int, prompt_style: str | None = None,
                 source: str = "data", record_ids: Sequence[int] | None = None) -> None:
        super().__init__(tokenizer, max_seq_length, prompt_style)
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

    def _train_items(self) -> Dataset:
        return PackedBatches(self.train_dataset, self.max_seq_length, self.seed) if self.packed \
            else self.train_dataset

    def _collate(self):
        return partial(collate_fn, pad_id=self.pad_id)

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
