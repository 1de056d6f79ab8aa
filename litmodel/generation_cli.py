"""What the generation command lines share besides loading: the length checks and the chat history
that fits the context, the prompt from stdin, the streaming of tokens to stdout, and the report of time to
first token, tokens/s, peak memory and weight bytes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from litmodel.utils import LitModelError


def check_lengths(prompt_len: int, max_new_tokens: int, block_size: int) -> None:
    """One-line errors for a prompt or a generation that does not fit the model's context."""
    if max_new_tokens < 1:
        raise LitModelError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_new_tokens >= block_size:
        raise LitModelError(f"--max_new_tokens {max_new_tokens} does not fit the model's context of {block_size} "
                            f"tokens (the prompt needs at least one); use --max_new_tokens < {block_size}")
    if prompt_len > block_size:
        raise LitModelError(f"the prompt has {prompt_len} tokens, more than the model's context of {block_size} "
                            "tokens; shorten the prompt")
    if prompt_len + max_new_tokens > block_size:
        raise LitModelError(f"the prompt ({prompt_len} tokens) + --max_new_tokens {max_new_tokens} exceed the "
                            f"model's context of {block_size} tokens; use --max_new_tokens "
                            f"{block_size - prompt_len} or less, or shorten the prompt")


def fit_conversation(tokenizer, messages: list[dict], max_new_tokens: int, block_size: int
                     ) -> tuple[list[dict], list[int], int]:
    """Render ``messages`` with the chat template, dropping the oldest turns (never the system message,
    never the last message) until the prompt + ``max_new_tokens`` fit the context.

    Returns (kept messages, prompt ids, number of messages dropped). Raises `LitModelError` when even
    the system message plus the last message do not fit.
    """
    messages = list(messages)
    dropped = 0
    while True:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if len(ids) + max_new_tokens <= block_size:
            return messages, ids, dropped
        first = 1 if messages and messages[0].get("role") == "system" else 0
        if len(messages) - first <= 1:
            raise LitModelError(f"the message needs {len(ids)} prompt tokens, which with --max_new_tokens "
                                f"{max_new_tokens} exceed the model's context of {block_size} tokens; send a "
                                "shorter message or lower --max_new_tokens")
        # drop the oldest user turn and the assistant reply to it, so the history still starts with a user
        del messages[first]
        dropped += 1
        while len(messages) - first > 1 and messages[first].get("role") != "user":
            del messages[first]
            dropped += 1


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated by torch on CUDA, else the process' peak resident set (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource  # deferred: Unix only, its absence is handled here

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # pragma: no cover
        return 0


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights (parameters and persistent buffers; a tied tensor counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if "kv_cache" not in n]:
        key = ("mkldnn", id(t)) if t.is_mkldnn else (t.untyped_storage().data_ptr(), t.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


@dataclass
class Timer:
    """Time to first token and decode speed of one generation."""

    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    n: int = 0

    def tick(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        self.n += 1

    def tokens_per_second(self) -> float:
        """Decode speed after the first token (nan before the second)."""
        decode = time.perf_counter() - self.first if self.first is not None else 0.0
        return (self.n - 1) / decode if self.n > 1 and decode > 0 else float("nan")

    def report(self, device: torch.device) -> str:
        end = time.perf_counter()
        total = end - self.start
        ttft = (self.first - self.start) if self.first is not None else float("nan")
        decode = end - self.first if self.first is not None else 0.0
        tps = (self.n - 1) / decode if self.n > 1 and decode > 0 else float("nan")
        mem = peak_memory_bytes(device) / 1e9
        kind = "GPU memory allocated" if device.type == "cuda" else "RSS"
        return (f"{self.n} tokens in {total:.2f} s: time to first token {ttft:.3f} s, "
                f"{tps:.1f} tokens/s after it; peak memory {mem:.2f} GB ({kind})")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stream_to_stdout(tokens: Iterable[int], decoder, timer: Timer, device: torch.device) -> list[int]:
    """Write the text of each token to stdout as soon as it is produced (``decoder``: the tokenizer's
    `incremental_decoder`), then the rest and a newline; returns the token ids. ``timer`` ticks at every
    token; the device is synced first so that the timer's end is the real end."""
    ids = []
    for t in tokens:
        timer.tick()
        ids.append(t)
        sys.stdout.write(decoder.add(t))
        sys.stdout.flush()
    sync(device)
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    return ids


def dump_prompt_ids(ids: Sequence[int], messages: Sequence[dict] | None = None) -> None:
    """Append the ids sent to the model (and the chat messages they render) as a JSON line to the file
    named by the LITMODEL_DUMP_PROMPT_IDS environment variable (tests, debugging); no-op without it."""
    path = os.environ.get("LITMODEL_DUMP_PROMPT_IDS")
    if path:
        record = {"ids": [int(i) for i in ids]}
        if messages is not None:
            record["messages"] = [dict(m) for m in messages]
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_stdin_prompt() -> str:
    if sys.stdin is None or sys.stdin.closed:
        raise LitModelError("no --prompt given and stdin is closed; pass --prompt 'text' or pipe the prompt")
    if sys.stdin.isatty():
        print("reading the prompt from stdin (end with Ctrl-D) ...", file=sys.stderr)
    text = sys.stdin.read()
    return text[:-1] if text.endswith("\n") else text  # `echo` adds a newline
