"""Pretraining data loaders over prepared token shards.

Windows. A split of ``T`` tokens is cut into ``N = (T - 1) // block_size`` windows of
``block_size + 1`` tokens; window ``w`` is ``tokens[w * block_size : w * block_size + block_size + 1]``
(consecutive windows share one boundary token, so inputs never overlap and every token after the
first is a target exactly once per epoch). ``input = window[:-1]``, ``target = window[1:]``.

Global order. Epoch ``e`` visits the ``N`` windows in the order
``numpy.random.default_rng([seed, e]).permutation(N)`` (``shuffle=False``: ``0..N-1``). The epochs
are concatenated into one infinite global stream; ``g`` counts windows consumed from it.

Ranks. With ``W = world_size * micro_batch_size`` windows per global micro-step, micro-step ``i``
covers stream positions ``[i*W, (i+1)*W)`` and rank ``r`` gets positions
``[i*W + r*micro_batch_size, i*W + (r+1)*micro_batch_size)``. So an optimizer step with ``A``
gradient-accumulation micro-steps uses positions ``[s*A*W, (s+1)*A*W)``: the same windows for any
``world_size``, ``micro_batch_size`` and ``A`` with the same ``A * world_size * micro_batch_size``
(e.g. 1 process with micro batch 2k, or 1 process with micro batch k and A=2, or 2 processes with
micro batch k). A micro-step may straddle two epochs.

Resume. ``state_dict()`` is ``{"seed", "epoch", "index", "windows_consumed", "num_windows",
"block_size", "shuffle"}`` where ``windows_consumed = g`` (the same on every rank),
``epoch = g // N`` and ``index = g % N``; ``load_state_dict`` continues at exactly that position.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from litmodel.data.shards import TokenShards
from litmodel.utils import LitModelError

__all__ = ["TokenShards", "PretrainDataLoader", "ValDataLoader", "num_windows"]


def num_windows(num_tokens: int, block_size: int) -> int:
    """How many ``block_size + 1``-token windows (stride ``block_size``) a split of ``num_tokens`` holds."""
    return max(0, (num_tokens - 1) // block_size)


class _WindowReader:
    def __init__(self, split_dir, block_size: int, micro_batch_size: int, rank: int, world_size: int,
                 tokenizer_dir=None):
        if block_size < 1 or micro_batch_size < 1:
            raise LitModelError(f"block_size and micro_batch_size must be >= 1, got {block_size} and "
                                f"{micro_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise LitModelError(f"rank {rank} is not in [0, world_size={world_size})")
        self.split_dir = Path(split_dir)
        self.tokens = TokenShards(split_dir, tokenizer_dir=tokenizer_dir)
        self.block_size = block_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        n = len(self.tokens)
        if n < block_size + 1:
            raise LitModelError(
                f"the corpus in {self.split_dir} is too small: {n} tokens, fewer than one sequence of "
                f"block_size + 1 = {block_size + 1} tokens; use a smaller --block_size or prepare a larger corpus"
            )
        self.num_windows = num_windows(n, block_size)

    def _batch(self, windows: list[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        bs = self.block_size
        batch = np.stack([self.tokens[int(w) * bs:int(w) * bs + bs + 1] for w in windows]).astype(np.int64)
        return torch.from_numpy(batch[:, :-1].copy()), torch.from_numpy(batch[:, 1:].copy())


class PretrainDataLoader(_WindowReader):
    """Infinite iterator of ``(input, target)`` LongTensors of shape ``(micro_batch_size, block_size)``.

    See the module docstring for the exact window order, rank partition and resume contract. The
    loader is its own iterator (no prefetch), so ``state_dict()`` always reflects the batches
    already returned. ``tokenizer_dir`` (optional) checks the data was prepared with that tokenizer.
    """

    def __init__(self, split_dir: str | os.PathLike, block_size: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 tokenizer_dir: str | os.PathLike | None = None):
        super().__init__(split_dir, block_size, micro_batch_size, rank, world_size, tokenizer_dir)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.windows_consumed = 0
        self._orders: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        return self.windows_consumed // self.num_windows

    @property
    def batches_per_epoch(self) -> float:
        """Global micro-steps per epoch (may be fractional: micro-steps straddle epochs)."""
        return self.num_windows / (self.world_size * self.micro_batch_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The window ids of ``epoch`` in visiting order."""
        order = self._orders.get(epoch)
        if order is None:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            else:
                order = np.arange(self.num_windows)
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = order
        return order

    def window_at(self, position: int) -> int:
        """The window id at ``position`` of the global stream."""
        epoch, i = divmod(position, self.num_windows)
        return int(self.epoch_order(epoch)[i])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.windows_consumed + self.rank * self.micro_batch_size
        windows = [self.window_at(start + j) for j in range(self.micro_batch_size)]
        self.windows_consumed += self.world_size * self.micro_batch_size
        return self._batch(windows)

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.windows_consumed // self.num_windows,
            "index": self.windows_consumed % self.num_windows,
            "windows_consumed": self.windows_consumed,
            "num_windows": self.num_windows,
            "block_size": self.block_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("block_size", self.block_size) != self.block_size or \
                state.get("num_windows", self.num_windows) != self.num_windows:
            raise LitModelError(
                f"the saved data-loader state is for {state.get('num_windows')} windows of block_size "
                f"{state.get('block_size')}, but {self.split_dir} with block_size {self.block_size} has "
                f"{self.num_windows}; resume with the same data dir and block_size"
            )
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        self._orders.clear()
        if "windows_consumed" in state:
            self.windows_consumed = int(state["windows_consumed"])
        else:
            self.windows_consumed = int(state["epoch"]) * self.num_windows + int(state["index"])


class ValDataLoader(_WindowReader):
    """The first ``max_batches`` micro-batches of a split, in token order, the same on every pass.

    Sequential windows ``0, 1, 2, ...`` split across ranks like ``PretrainDataLoader`` (micro-step ``i``,
    rank ``r``: windows ``i*W + r*micro_batch_size ...``). Only complete global micro-steps are used,
    so every rank yields ``len(loader)`` batches.
    """

    def __init__(self, split_dir: str | os.PathLike, block_size: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, max_batches: int | None = None,
                 tokenizer_dir: str | os.PathLike | None = None):
        super().__init__(split_dir, block_size, micro_batch_size, rank, world_size, tokenizer_dir)
        per_step = world_size * micro_batch_size
        available = self.num_windows // per_step
        if available == 0:
            raise LitModelError(
                f"the split {self.split_dir} is too small for one evaluation batch: {self.num_windows} windows of "
                f"block_size + 1 = {block_size + 1} tokens, fewer than world_size x micro_batch_size = {per_step}; "
                "use a smaller micro_batch_size/block_size or prepare with a larger --val_fraction"
            )
        self.num_batches = available if max_batches is None else max(0, min(int(max_batches), available))

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        per_step = self.world_size * self.micro_batch_size
        for i in range(self.num_batches):
            start = i * per_step + self.rank * self.micro_batch_size
            yield self._batch(range(start, start + self.micro_batch_size))
