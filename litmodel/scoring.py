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


def logits_at(model: nn.Module, idx: torch.Tensor, flat_positions: torch.Tensor) -> torch.Tensor:
    """Logits (N, vocab) at ``flat_positions`` (indices into the flattened (B, T) of ``idx``)."""
    if not isinstance(getattr(model, "lm_head", None), nn.Module):
        logits = model(idx)
        return logits.reshape(-1, logits.size(-1)).index_select(0, flat_positions)
    with _head_only_at(model, flat_positions):
        logits = model(idx)
    return logits.reshape(-1, logits.size(-1))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def score_continuations(model: nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int,
                        batch_size: int = 1, progress: bool | str = False) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), continuation is the greedy one) for each request.

    The model reads ``(context + continuation)[-(max_length + 1):][:-1]``: like lm-eval's HF backend, a
    pair longer than the context window loses tokens on the left. ``progress``: a tqdm bar (a string is
    its description).
    """
    if batch_size < 1:
        raise LitModelError(f"--batch_size must be >= 1, got {batch_size}")
    inputs: list[tuple[int, ...]] = []
    for ctx, cont in requests:
        if len(cont) == 0 or len(ctx) == 0:
            raise ValueError("score_continuations needs a non-empty context and continuation")
        if len(cont) > max_length:
            raise LitModelError(f"a continuation of {len(cont)} tokens does not fit the context window of "
                                f"{max_length} tokens; raise --max_seq_length (up to the model's block_size)")
        inputs.append(tuple((list(ctx) + list(cont))[-(max_length + 1):][:-1]))

    # requests with the same input tokens (e.g. multiple choice with one-token answers) share one row
    rows: dict[tuple[int, ...], list[int]] = {}
    for i, inp in enumerate(inputs):
        rows.setdefault(inp, []).append(i)
    # longest first: the first batch is the largest (memory errors show up at once, ETAs are upper bounds)
    order = sorted(rows, key=lambda inp: -len(inp))
    device = _device(model)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc=progress if isinstance(progress, str) else "scoring",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        T = len(batch[0])
        idx = torch.zeros(len(batch), T, dtype=torch.long)  # right padding: causal attention never sees it
        flat, spans = [], []
        for b, inp in enumerate(batch):
            idx[b, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            first = min(len(inp) - len(requests[i][1]) for i in rows[inp])  # earliest scored position
            spans.append((len(flat), first))
            flat.extend(range(b * T + first, b * T + len(inp)))
        flat_t = torch.tensor(flat, dtype=torch.long, device=device)
        logprobs = torch.log_softmax(logits_at(model, idx.to(device), flat_t).float(), dim=-1)
        greedy = logprobs.argmax(dim=-1)
        for (offset, first), inp in zip(spans, batch):
            for i in rows[inp]:
                cont = torch.tensor(list(requests[i][1]), dtype=torch.long, device=device)
                lo = offset + len(inp) - len(cont) - first
                rows_lp = logprobs[lo:lo + len(cont)]
                lp = rows_lp.gather(-1, cont[:, None]).sum()
                results[i] = (float(lp), bool((greedy[lo:lo + len(cont)] == cont).all()))
            bar.update(len(rows[inp]))
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
