"""Batched scoring of token sequences: the log-probabilities behind lm-eval's `loglikelihood`
requests (`litmodel.evaluation`) and the sliding-window perplexity of a text file.

* `score_continuations(model, requests, max_length, batch_size)`: for each (context ids, continuation
  ids) the summed log-probability of the continuation and whether greedy decoding reproduces it, with
  exactly the truncation of lm-eval's Hugging Face backend. Longest first, right-padded, one forward per
  batch; requests with the same input run once; the output head runs only at the scored positions.
* `sliding_windows` / `perplexity`: the standard sliding-window perplexity (as in Hugging Face's
  perplexity guide): windows of at most ``max_seq_length`` tokens start every ``stride`` tokens, and each
  token is scored exactly once, in the first window that holds it with context before it, so it sees up
  to ``max_seq_length - 1`` tokens of context.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn as nn
from tqdm import tqdm

from litmodel.utils import LitModelError


@contextlib.contextmanager
def _head_only_at(model: nn.Module, flat_positions: torch.Tensor) -> Iterator[None]:
    """While active, the model's output head sees only the hidden states at ``flat_positions`` of the
    flattened (B * T) batch, so ``model(idx)`` returns logits (1, N, vocab) for those N positions.

    The head is the largest matmul for short continuations and its (B, T, vocab) output by far the
    largest tensor (16 x 2048 x 128k float32 is 16 GB); scoring needs a few positions per row.
    """

    def select(module, args):
        x = args[0]
        return (x.reshape(-1, x.size(-1)).index_select(0, flat_positions).unsqueeze(0), *args[1:])

    handle = model.lm_head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def logits_at(model: nn.Module, idx: torch.Tensor, flat_positions: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits (N, vocab) at ``flat_positions`` (indices into the flattened (B, T) of ``idx``); ``kwargs`` go to
    the model's forward (``positions``, ``mask``)."""
    if not isinstance(getattr(model, "lm_head", None), nn.Module):
        logits = model(idx, **kwargs)
        return logits.reshape(-1, logits.size(-1)).index_select(0, flat_positions)
    with _head_only_at(model, flat_positions):
        logits = model(idx, **kwargs)
    return logits.reshape(-1, logits.size(-1))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class _Row:
    """One row of a batch: ``tokens`` with their rotary/learned ``positions`` and ``segments`` (0: the shared
    context, k > 0: the k-th continuation packed after it, which sees the context and itself only), and for
    each request it answers, the row positions whose logits predict its continuation tokens."""

    tokens: list[int]
    positions: list[int]
    segments: list[int]
    reads: list[tuple[int, list[int]]]


def _can_pack(model: nn.Module) -> bool:
    # a sliding window is applied by slot distance, which packing stretches: keep such models on plain rows
    config = getattr(model, "config", None)
    return not any("sliding_window" in k and v for k, v in vars(config).items()) if config is not None else False


def _plan_rows(requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int, pack: bool) -> list[_Row]:
    """The rows to run: requests with the same input share a row; with ``pack``, the continuations of a
    context (e.g. the choices of a multiple-choice question) are packed after one copy of it."""
    plain: dict[tuple[int, ...], _Row] = {}
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if pack and len(ctx) + len(cont) - 1 <= max_length:
            groups.setdefault(tuple(ctx), []).append(i)
            continue
        inp = tuple((list(ctx) + list(cont))[-(max_length + 1):][:-1])
        row = plain.setdefault(inp, _Row(list(inp), list(range(len(inp))), [0] * len(inp), []))
        row.reads.append((i, list(range(len(inp) - len(cont), len(inp)))))
    rows = list(plain.values())
    for ctx, members in groups.items():
        n = len(ctx)
        if len(members) == 1:  # nothing to share: a plain row
            (i,) = members
            inp = list(ctx) + list(requests[i][1][:-1])
            rows.append(_Row(inp, list(range(len(inp))), [0] * len(inp), [(i, list(range(n - 1, len(inp))))]))
            continue
        row, seen = None, {}
        for i in members:
            seg = tuple(requests[i][1][:-1])
            if row is None or (seg not in seen and len(row.tokens) + len(seg) > max_length):
                row, seen = _Row(list(ctx), list(range(n)), [0] * n, []), {}
                rows.append(row)
            if seg not in seen:
                seen[seg] = len(row.tokens)
                row.tokens += seg
                row.positions += range(n, n + len(seg))
                row.segments += [len(seen)] * len(seg)
            a = seen[seg]
            row.reads.append((i, [n - 1, *range(a, a + len(seg))]))
    return rows


def _row_mask(rows: list[_Row], T: int, device) -> torch.Tensor:
    """(B, 1, T, T) boolean: key k is visible to query q if k <= q and k is in the shared context or in q's own
    segment. Padding (segment -1) sees the context, so no attention row is empty; no real query sees it."""
    seg = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        seg[b, :len(row.segments)] = torch.tensor(row.segments)
    seg = seg.to(device)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    return (causal & same).unsqueeze(1)


@torch.inference_mode()
def score_continuations(model: nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int,
                        batch_size: int = 1, progress: bool | str = False, pack: bool = True
                        ) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), continuation is the greedy one) for each request.

    The model reads ``(context + continuation)[-(max_length + 1):][:-1]``: like lm-eval's HF backend, a
    pair longer than the context window loses tokens on the left. Rows (see `_plan_rows`) run longest
    first, right-padded, ``batch_size`` per forward pass. ``pack``: the continuations of one context share
    a row after a single copy of it, each seeing only the context and itself (same result, less compute:
    multiple choice reads the question once instead of once per choice). ``progress``: a tqdm bar (a
    string is its description).
    """
    if batch_size < 1:
        raise LitModelError(f"--batch_size must be >= 1, got {batch_size}")
    for ctx, cont in requests:
        if len(cont) == 0 or len(ctx) == 0:
            raise ValueError("score_continuations needs a non-empty context and continuation")
        if len(cont) > max_length:
            raise LitModelError(f"a continuation of {len(cont)} tokens does not fit the context window of "
                                f"{max_length} tokens; raise --max_seq_length (up to the model's block_size)")
    # longest first: the first batch is the largest (memory errors show up at once, ETAs are upper bounds)
    rows = sorted(_plan_rows(requests, max_length, pack and _can_pack(model)), key=lambda r: -len(r.tokens))
    device = _device(model)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc=progress if isinstance(progress, str) else "scoring",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        T = len(batch[0].tokens)
        idx = torch.zeros(len(batch), T, dtype=torch.long)  # right padding: no real token attends to it
        flat, where = [], []
        for b, row in enumerate(batch):
            idx[b, :len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
            needed = sorted({p for _, ps in row.reads for p in ps})  # the output head runs only here
            where.append({p: len(flat) + j for j, p in enumerate(needed)})
            flat += [b * T + p for p in needed]
        kwargs = {}
        if any(max(row.segments) > 0 for row in batch):
            positions = torch.zeros(len(batch), T, dtype=torch.long)
            for b, row in enumerate(batch):
                positions[b, :len(row.positions)] = torch.tensor(row.positions)
            kwargs = dict(positions=positions.to(device), mask=_row_mask(batch, T, device))
        flat_t = torch.tensor(flat, dtype=torch.long, device=device)
        logprobs = torch.log_softmax(logits_at(model, idx.to(device), flat_t, **kwargs).float(), dim=-1)
        greedy = logprobs.argmax(dim=-1)
        for row, at in zip(batch, where):
            for i, ps in row.reads:
                cont = torch.tensor(list(requests[i][1]), dtype=torch.long, device=device)
                sel = torch.tensor([at[p] for p in ps], dtype=torch.long, device=device)
                lp = logprobs[sel].gather(-1, cont[:, None]).sum()
                results[i] = (float(lp), bool((greedy[sel] == cont).all()))
            bar.update(len(row.reads))
    bar.close()
    return results  # type: ignore[return-value]


# ---- perplexity -----------------------------------------------------------------------------------------
def sliding_windows(n_tokens: int, max_seq_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first scored token, end) of each window over ``n_tokens`` token ids.

    Windows ``[begin, end)`` of at most ``max_seq_length`` tokens start every ``stride`` tokens; each
    scores the tokens after the previous window's end (token 0 has no context and is never scored), so
    every other token is scored once with up to ``max_seq_length - 1`` tokens of context.
    """
    if max_seq_length < 2:
        raise LitModelError(f"--max_seq_length must be >= 2, got {max_seq_length}")
    if not 1 <= stride < max_seq_length:
        raise LitModelError(f"--stride must be between 1 and --max_seq_length - 1 = {max_seq_length - 1} (a window's "
                            f"first token has no context inside it), got {stride}")
    windows, prev_end = [], 1
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + max_seq_length, n_tokens)
        if end > prev_end:
            windows.append((begin, prev_end, end))
            prev_end = end
        if end == n_tokens:
            break
    return windows


@dataclass
class Perplexity:
    """Summed negative log-likelihood (nats) of ``tokens`` scored tokens of a text of ``bytes`` UTF-8 bytes."""

    nll: float
    tokens: int
    bytes: int
    windows: int
    seconds: float = 0.0

    @property
    def perplexity(self) -> float:
        """Token-level perplexity: exp(mean NLL per token)."""
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        """Bits per UTF-8 byte: total NLL / (ln 2 * bytes); comparable across tokenizers."""
        return self.nll / (math.log(2) * self.bytes)

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte, "nll_nats": self.nll,
                "tokens": self.tokens, "bytes": self.bytes, "windows": self.windows, "seconds": self.seconds}


def perplexity(model: nn.Module, ids: Sequence[int], max_seq_length: int, stride: int, batch_size: int = 1,
               n_bytes: int | None = None, progress: bool | str = False) -> Perplexity:
    """Sliding-window perplexity of the token ids ``ids`` (see `sliding_windows`; ``ids[0]`` is context
    only: prepend a BOS/EOS token to score the first token of a text). ``n_bytes``: the text's UTF-8
    length, for bits per byte."""
    if len(ids) < 2:
        raise LitModelError("the text has fewer than 2 tokens; nothing to score")
    windows = sliding_windows(len(ids), max_seq_length, stride)
    requests = [(ids[begin:first], ids[first:end]) for begin, first, end in windows]
    t0 = time.perf_counter()
    scores = score_continuations(model, requests, max_seq_length, batch_size, progress=progress)
    nll = -math.fsum(lp for lp, _ in scores)
    return Perplexity(nll=nll, tokens=len(ids) - 1, bytes=n_bytes or 0, windows=len(windows),
                      seconds=time.perf_counter() - t0)
