"""The data module over one record file, what SFT (`litmodel.data.sft.JSONData`) and DPO
(`litmodel.data.preference.PreferenceData`) share: the seeded train/validation split, the prompt style, the
tokenized datasets' common checks, the loaders and ``format_prompt`` for samples during training.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from litmodel.data.prompts import (PROMPT_STYLES, alpaca_prompt, alpaca_turns, record_to_messages,
                                   resolve_prompt_style, tokenize_alpaca)
from litmodel.tokenizer import Tokenizer
from litmodel.utils import LitModelError


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


class RecordDataset(Dataset):
    """What the SFT and preference datasets share: records tokenized in one prompt style (resolved against the
    tokenizer) for sequences of at most ``max_seq_length`` input tokens."""

    def __init__(self, tokenizer, max_seq_length: int, prompt_style: str | None) -> None:
        if max_seq_length is None or max_seq_length < 1:
            raise LitModelError(f"max_seq_length must be >= 1, got {max_seq_length}")
        self.prompt_style = resolve_prompt_style(tokenizer, prompt_style)
        self.max_seq_length = max_seq_length


class RecordData:
    """Records from one ``.json`` or ``.jsonl`` file, split into training and validation, tokenized, batched:
    what the SFT data (`litmodel.data.sft.JSONData`) and the preference pairs
    (`litmodel.data.preference.PreferenceData`) share.
    A subclass says how records are read (`_load_records`), tokenized (`_dataset`), batched (`_train_items`,
    `_collate`) and described (`describe`).

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
        self.train_dataset: RecordDataset | None = None
        self.val_dataset: RecordDataset | None = None

    def setup(self, tokenizer, max_seq_length: int) -> None:
        """Read, validate, split and tokenize the records. ``tokenizer``: a `Tokenizer` or its dir."""
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = Tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.prompt_style = resolve_prompt_style(tokenizer, self.prompt_style)
        records = self._load_records()
        train_idx, val_idx = split_indices(len(records), self.val_split_fraction, self.seed, self.json_path)
        self.train_dataset = self._dataset(records, train_idx)
        self.val_dataset = self._dataset(records, val_idx) if val_idx else None

    # what a subclass says: how records are read, tokenized and batched
    def _load_records(self) -> list[dict]:
        raise NotImplementedError

    def _dataset(self, records: list[dict], ids: list[int]) -> RecordDataset:
        raise NotImplementedError

    def _train_items(self) -> Dataset:
        """What the training loader shuffles: the training dataset (`JSONData`: packed rows when ``packed``)."""
        return self.train_dataset

    def _collate(self) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        raise NotImplementedError

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
        return DataLoader(self._train_items(), batch_size=batch_size, shuffle=True, num_workers=self.num_workers,
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
            turns = alpaca_turns(list(x), "prompt", need_answer=False)
            if turns[-1][1] is not None:
                raise LitModelError("format_prompt needs a conversation that ends with a user message")
        ids, _ = tokenize_alpaca(tok, turns)
        return ids

    def describe(self) -> str:
        raise NotImplementedError
