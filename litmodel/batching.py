"""Continuous batching: many requests decoded together, each in its own slot of one static KV cache.

* `BatchEngine(model, tokenizer, max_batch_size, max_seq_length)`: ``submit(Request)`` queues a request;
  each ``step()`` admits at most one waiting request into a free slot (its prefill, batch 1, written into
  that slot's cache row) and then runs one decode step for every active slot together. A slot has its own
  position, sampling settings (temperature / top-k / top-p, a seeded `torch.Generator`), stop tokens, stop
  strings and token budget; a finished or cancelled request frees its slot for the next one between steps,
  so requests that arrive while others decode join them instead of waiting for the whole batch to end.
* `EngineThread`: runs an engine in a background thread (the HTTP server, `litmodel.server`).
* `generate_many(...)`: offline batched generation of a list of prompts (`generate/base.py --prompts_file`).

The requests themselves (`Request`, `SamplingParams`, `Output`, `TextStream`) are in `litmodel.generation_request`.

Why every slot's tokens equal its lone answer: a slot's keys/values sit at cache positions 0..n of its own
row, exactly where a lone `litmodel.generate.generate` puts them; its prefill is the lone prefill; in a
decode step each row writes its new key/value at its own position (`SlotKVCache`), attends through its
own mask (keys 0..position) and gets its own rotary positions. Other rows never enter its attention and
the linear layers act on each row independently, so only the floating-point blocking of a batched matmul
can differ from the batch-1 run (greedy tokens agree; tests/test_serve.py checks both model families).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from typing import Callable, Sequence

import torch
import torch.nn as nn

from litmodel.decode_step import DecodeStep, make_decode_step
from litmodel.generation_request import Output, Request, SamplingParams, TextStream
from litmodel.sampling import make_generator, sample_logits
from litmodel.utils import LitModelError


class QueueFull(LitModelError):
    """Every slot is busy and the waiting queue is full: retry later (HTTP 429)."""


# ---- the KV cache --------------------------------------------------------------------------------------
class SlotKVCache(nn.Module):
    """A static KV cache (slots, kv_heads, max_seq_length, head_size) whose rows are written at different
    positions: in a decode step row b writes its one new key/value at ``pos[b]`` (the engine's shared
    position tensor; the ``input_pos`` the model passes is ignored). With ``row`` set, a batch-1 prefill
    writes into that row only, at the ``input_pos`` slots, and attends to that row only."""

    def __init__(self, slots: int, n_kv_heads: int, max_seq_length: int, head_size: int, pos: torch.Tensor,
                 device=None, dtype=None) -> None:
        super().__init__()
        shape = (slots, n_kv_heads, max_seq_length, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("pos", pos, persistent=False)  # the same tensor in every layer
        self.row: int | None = None

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.row is not None:
            r = self.row
            self.k[r].index_copy_(1, input_pos, k[0].to(self.k.dtype))
            self.v[r].index_copy_(1, input_pos, v[0].to(self.v.dtype))
            return self.k[r:r + 1], self.v[r:r + 1]
        n = k.size(0)  # decode: the first n rows, one token each
        rows = torch.arange(n, device=k.device)
        at = self.pos[:n]
        self.k[rows, :, at] = k[:, :, 0].to(self.k.dtype)
        self.v[rows, :, at] = v[:, :, 0].to(self.v.dtype)
        return self.k[:n], self.v[:n]


# ---- the engine ------------------------------------------------------------------------------------------
def _bucket(n: int, cap: int) -> int:
    """Decode the first `_bucket(n)` rows: powers of two, so a compiled step sees few shapes."""
    b = 1
    while b < n:
        b *= 2
    return min(b, cap)


class BatchEngine:
    """Continuous batching over ``max_batch_size`` slots of a static KV cache of ``max_seq_length`` positions.

    Not thread-safe except `submit` / `cancel` (use `EngineThread` to run it in the background). The engine
    owns the model's KV cache while it lives: `close()` gives it back (``model.clear_kv_cache()``).
    """

    def __init__(self, model: nn.Module, tokenizer=None, max_batch_size: int = 8, max_seq_length: int | None = None,
                 decode_step: DecodeStep | None = None, max_queue: int | None = None) -> None:
        cfg = model.config
        if max_batch_size < 1:
            raise LitModelError(f"--max_batch_size must be >= 1, got {max_batch_size}")
        S = min(max_seq_length or cfg.block_size, cfg.block_size)
        if cfg.sliding_window is not None:
            # the decode step's causal mask is built for the last cache position; a cache no longer than the
            # window keeps the window from cutting any row's keys
            S = min(S, cfg.sliding_window)
        if S < 2:
            raise LitModelError(f"--max_seq_length must be >= 2, got {S}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_seq_length = max_batch_size, S
        self.max_queue = max_queue
        p = next(model.parameters())
        self.device = p.device
        dtype = next((q.dtype for q in model.parameters() if q.is_floating_point()), torch.float32)
        self.pos = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        model.cache_len = S
        for block in model.blocks:
            a = block.attn
            a.kv_cache = SlotKVCache(max_batch_size, a.n_kv_heads, S, a.head_size, self.pos, self.device, dtype)
        self._caches = [block.attn.kv_cache for block in model.blocks]
        self.step_fn = decode_step or make_decode_step(model)
        self._key_slots = torch.arange(S, device=self.device)
        self._last_slot = torch.tensor([S - 1], device=self.device)  # with it the model's causal mask allows all
        self.slots: list[Request | None] = [None] * max_batch_size
        self._pos = [0] * max_batch_size  # host copy: where each row's next token goes
        self._last = [0] * max_batch_size  # the token each row feeds next
        self.waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self.steps = 0
        self.stats = {"finished": 0, "cancelled": 0, "error": 0, "prompt_tokens": 0, "completion_tokens": 0,
                      "max_active": 0}

    # -- queue
    def check(self, request: Request) -> None:
        """Raise `LitModelError` (one line) if ``request`` cannot run on this engine."""
        n, p = len(request.prompt_ids), request.params
        if n == 0:
            raise LitModelError("the prompt is empty; send at least one token")
        if p.max_tokens < 1:
            raise LitModelError(f"max_tokens must be >= 1, got {p.max_tokens}")
        if n + p.max_tokens > self.max_seq_length:
            raise LitModelError(f"the prompt ({n} tokens) + max_tokens ({p.max_tokens}) exceed the context of "
                                f"{self.max_seq_length} tokens; lower max_tokens to {self.max_seq_length - n} or less, "
                                "or shorten the prompt")
        if p.temperature < 0 or not (0 < p.top_p <= 1) or (p.top_k is not None and p.top_k < 1):
            raise LitModelError("temperature must be >= 0, top_p in (0, 1] and top_k >= 1")
        if p.seed is not None and not (-2**63 <= p.seed < 2**64):
            raise LitModelError(f"seed must fit in 64 bits, got {p.seed}")
        if p.stop and self.tokenizer is None:
            raise LitModelError("stop strings need a tokenizer; pass tokenizer= to the engine")

    def submit(self, request: Request) -> Request:
        self.check(request)
        with self._lock:
            busy = len(self.waiting) + self.num_active
            if self.max_queue is not None and busy >= self.max_batch_size + self.max_queue:
                raise QueueFull(f"all {self.max_batch_size} slots are busy and {len(self.waiting)} requests wait; "
                                "retry later")
            self.waiting.append(request)
        return request

    @property
    def cache_bytes(self) -> int:
        return sum(c.k.numel() * c.k.element_size() * 2 for c in self._caches)

    @property
    def num_active(self) -> int:
        return sum(r is not None for r in self.slots)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_active > 0

    # -- one scheduler iteration
    @torch.inference_mode()
    def step(self) -> None:
        """Free cancelled slots, prefill at most one waiting request, then one decode step for all slots."""
        for r, req in enumerate(self.slots):
            if req is not None and req.cancelled:
                self._finish(r, req, "cancelled", token=None)
        self._admit()
        self._decode()
        self.steps += 1

    def _admit(self) -> None:
        if None not in self.slots:
            return
        with self._lock:
            req = None
            while self.waiting and req is None:
                req = self.waiting.popleft()
                if req.cancelled:
                    self._emit(req, None, "", "cancelled")
                    req = None
        if req is None:
            return
        r = self.slots.index(None)
        self.slots[r] = req
        self.stats["max_active"] = max(self.stats["max_active"], self.num_active)
        try:
            logits = self._prefill(r, req)
        except Exception as err:  # this request fails alone; the others keep decoding
            traceback.print_exc()
            req.error = f"{type(err).__name__}: {err}"
            req._stream = None
            self._finish(r, req, "error", None)
            return
        self._pos[r] = len(req.prompt_ids)
        self._accept(r, req, self._sample(logits, [req])[0])

    def _prefill(self, r: int, req: Request) -> torch.Tensor:
        """Write the prompt's keys/values into row ``r`` (batch 1, as a lone `generate` does); next-token logits."""
        p = req.params
        req._generator = make_generator(p.seed, self.device)
        if self.tokenizer is not None:
            req._stream = TextStream(self.tokenizer, req.prompt_ids, p.stop)
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)
        for c in self._caches:
            c.row = r
        try:
            return self.model(ids, torch.arange(ids.size(1), device=self.device))[:, -1]
        finally:
            for c in self._caches:
                c.row = None

    def _decode(self) -> None:
        active = [r for r, req in enumerate(self.slots) if req is not None]
        if not active:
            return
        n = _bucket(active[-1] + 1, self.max_batch_size)
        self.pos.copy_(torch.tensor(self._pos, dtype=torch.long))
        idx = torch.tensor(self._last[:n], dtype=torch.long, device=self.device).view(n, 1)
        pos = self.pos[:n, None]
        mask = (self._key_slots[None, :] <= pos).view(n, 1, 1, -1)
        logits = self.step_fn(idx, self._last_slot, pos, mask)
        reqs = [self.slots[r] for r in active]
        toks = self._sample(logits[active], reqs)
        for r, req, t in zip(active, reqs, toks):
            self._pos[r] += 1
            self._accept(r, req, t)

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        toks = logits.argmax(-1).tolist()
        for i, req in enumerate(reqs):
            p = req.params
            if p.temperature > 0:  # the lone `generate` draws from a (1, V) row too: same noise for a seed
                toks[i] = int(sample_logits(logits[i:i + 1], p.temperature, p.top_k, p.top_p, req._generator)[0])
        return toks

    def _accept(self, r: int, req: Request, tok: int) -> None:
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        req.completion_tokens += 1
        self._last[r] = tok
        p = req.params
        text, reason = "", None
        if tok in p.stop_ids:
            reason = "stop"
        else:
            req.output_ids.append(tok)
            if req._stream is not None:
                text, hit = req._stream.add(tok)
                if hit:
                    reason = "stop"
                    req._stream = None  # the text ends before the stop string
        if reason is None and (req.completion_tokens >= p.max_tokens or self._pos[r] >= self.max_seq_length):
            reason = "length"
        if reason is not None:
            self._finish(r, req, reason, tok, text)
        else:
            self._emit(req, tok, text, None)

    def _finish(self, r: int, req: Request, reason: str, token: int | None, text: str = "") -> None:
        if req._stream is not None:
            text += req._stream.finish()
            req._stream = None
        self.slots[r] = None
        self._pos[r] = 0
        self._emit(req, token, text, reason)

    def _emit(self, req: Request, token: int | None, text: str, reason: str | None) -> None:
        req.text += text
        if reason is not None:
            req.finish_reason = reason
            req.finished_time = time.perf_counter()
            self.stats[reason if reason in ("cancelled", "error") else "finished"] += 1
            self.stats["prompt_tokens"] += len(req.prompt_ids)
            self.stats["completion_tokens"] += req.completion_tokens
        try:
            if req.on_output is not None:
                req.on_output(Output(req, token, text, reason))
        finally:
            if reason is not None:
                req.done.set()

    def fail_all(self, message: str) -> None:
        """End every active and waiting request with finish_reason "error" (after an exception in a step)."""
        for r, req in enumerate(self.slots):
            if req is not None:
                req.error = message
                req._stream = None
                self._finish(r, req, "error", None)
        with self._lock:
            waiting, self.waiting = list(self.waiting), deque()
        for req in waiting:
            req.error = message
            self._emit(req, None, "", "error")

    @torch.inference_mode()
    def warmup(self) -> None:
        """Run the decode step once for every batch bucket (1, 2, 4, ...): a compiled step compiles each shape
        now rather than during the first requests. Only free rows are written (at position 0)."""
        if self.num_active:
            raise RuntimeError("warmup() needs an idle engine")
        n = 1
        while True:
            self.pos.zero_()
            idx = torch.zeros(n, 1, dtype=torch.long, device=self.device)
            mask = (self._key_slots[None, :] <= self.pos[:n, None]).view(n, 1, 1, -1)
            self.step_fn(idx, self._last_slot, self.pos[:n, None], mask)
            if n >= self.max_batch_size:
                break
            n = _bucket(n + 1, self.max_batch_size)

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while self.has_work():
            self.step()

    def close(self) -> None:
        """Give the model its plain KV cache back (the next `generate` call allocates one)."""
        self.model.clear_kv_cache()


class EngineThread:
    """Runs a `BatchEngine` in a daemon thread: `submit` from any thread; outputs arrive through each request's
    ``on_output`` (called in the engine's thread); `stop` finishes (or, after a timeout, cancels) the work."""

    def __init__(self, engine: BatchEngine) -> None:
        self.engine = engine
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="litmodel-engine", daemon=True)

    def start(self) -> "EngineThread":
        self._thread.start()
        return self

    def submit(self, request: Request) -> Request:
        if self._stopping:
            raise QueueFull("the server is shutting down")
        self.engine.submit(request)
        with self._cv:
            self._cv.notify()
        return request

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self.engine.has_work() and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self.engine.has_work():
                    return
            try:
                self.engine.step()
            except Exception as err:  # keep serving: end the requests of the failed step with an error
                traceback.print_exc()
                self.engine.fail_all(f"{type(err).__name__}: {err}")

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop taking requests, let the submitted ones finish for up to ``timeout`` seconds, then cancel the
        rest. True if everything finished in time."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)
        clean = not self._thread.is_alive()
        if not clean:
            for req in list(self.engine.slots) + list(self.engine.waiting):
                if req is not None:
                    req.cancel()
            self._thread.join(10)
        return clean


@torch.inference_mode()
def generate_many(model: nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                  max_batch_size: int = 8, max_seq_length: int | None = None, tokenizer=None,
                  decode_step: DecodeStep | None = None,
                  on_output: Callable[[int, Output], None] | None = None) -> list[Request]:
    """Generate for every prompt with continuous batching; returns the finished `Request` s in prompt order
    (``.output_ids``, ``.text`` when a tokenizer is given, ``.finish_reason``). ``params``: one for all or one
    per prompt. ``on_output(i, output)`` sees every step of prompt ``i`` as it happens."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    if max_seq_length is None:
        max_seq_length = max((len(p) + q.max_tokens for p, q in zip(prompts, params)), default=2)
    engine = BatchEngine(model, tokenizer, max_batch_size=min(max_batch_size, max(len(prompts), 1)),
                         max_seq_length=max_seq_length, decode_step=decode_step)
    try:
        reqs = []
        for i, (p, q) in enumerate(zip(prompts, params)):
            cb = (lambda out, i=i: on_output(i, out)) if on_output is not None else None
            reqs.append(engine.submit(Request(list(p), q, cb)))
        engine.run()
    finally:
        engine.close()
    return reqs
