"""One generation request of the continuous-batching engine (`litmodel.batching`): how it is sampled
(`SamplingParams`), what it has produced so far (`Request`), what each engine step hands to its caller
(`Output`), and its text as it grows, cut at stop strings (`TextStream`).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import torch


@dataclass
class SamplingParams:
    """How one request is decoded. ``temperature`` 0 is greedy; ``seed`` makes sampling reproducible (the
    same seed gives the same tokens as `litmodel.generate.generate` with that seed); ``stop_ids`` end the
    request without being part of its text; ``stop`` strings end it and cut the text before them."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_ids: Collection[int] = ()


@dataclass
class Output:
    """What one step produced for one request (sent to ``Request.on_output`` from the engine's thread)."""

    request: "Request"
    token: int | None  # None when the request ended without a new token (cancelled, error)
    text: str  # new text, safe to show (never a broken character, never the start of a stop string)
    finish_reason: str | None  # "stop", "length", "cancelled", "error" or None while it goes on


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    on_output: Callable[[Output], None] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    # filled in by the engine
    output_ids: list[int] = field(default_factory=list)  # generated tokens, without a final stop token
    completion_tokens: int = 0  # generated tokens, a final stop token included
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finished_time: float | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    _stream: "TextStream | None" = None
    _generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Ask the engine to drop this request (a disconnected client); its slot is freed before the next step."""
        self.cancelled = True


class TextStream:
    """Incremental text of one request with stop strings: `litmodel.tokenizer.IncrementalDecoder` (never
    splits a multi-byte character) plus a hold-back of any tail that could be the start of a stop string."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self._decoder = tokenizer.incremental_decoder(context_ids=prompt_ids)
        self._stop = [s for s in stop if s]
        self._held = ""

    def add(self, token_id: int) -> tuple[str, bool]:
        """(text to emit, whether a stop string was reached)."""
        return self._push(self._decoder.add(token_id), final=False)

    def finish(self) -> str:
        return self._push(self._decoder.flush(), final=True)[0]

    def _push(self, new: str, final: bool) -> tuple[str, bool]:
        buf = self._held + new
        # a match never starts in text already emitted: its start would have been held back
        hits = [i for i in (buf.find(s) for s in self._stop) if i >= 0]
        if hits:
            self._held = ""
            return buf[:min(hits)], True
        keep = 0
        if not final:
            for s in self._stop:
                for k in range(min(len(s) - 1, len(buf)), keep, -1):
                    if buf.endswith(s[:k]):
                        keep = k
                        break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False
