"""The token loop: generation with a static KV cache, for one prompt or a left-padded batch.

* `generate(model, prompt_ids, ...)`: one sequence, yields token ids as they are produced; a `CacheState`
  reuses the cache for a prompt that extends the previous one (a chat).
* `generate_batch(model, prompts, ...)`: prompts of different lengths, left-padded, with the
  attention mask and position ids that make every row behave exactly as if it were alone.
* `generate_tokens(...)`: the loop under both (prefill, then one decode step per token).

Around it: sampling in `litmodel.sampling`, the decode step in `litmodel.decode_step`, loading a
checkpoint for inference in `litmodel.generation_setup`, continuous batching in `litmodel.batching`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from litmodel.decode_step import DecodeStep, make_decode_step
from litmodel.sampling import make_generator, sample_logits
from litmodel.utils import LitModelError


# ---- generation ----------------------------------------------------------------------------------------
@dataclass
class CacheState:
    """The token ids whose keys/values sit in the model's KV cache at slots 0..len(ids)-1 (batch 1).

    Pass the same object to successive `generate` calls (a chat) and a prompt that starts with the same
    ids only prefills its new suffix. Anything else (a different cache shape) re-prefills from scratch.
    """

    ids: list[int] = field(default_factory=list)
    cache_len: int = 0


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (quantized layers hold integer ones too)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def ensure_kv_cache(model: nn.Module, batch_size: int, length: int) -> bool:
    """Allocate the static KV cache unless one of exactly this shape exists; True if (re)allocated."""
    blocks = model.blocks
    cache = blocks[0].attn.kv_cache if len(blocks) else None
    if cache is not None and cache.k.size(0) == batch_size and model.cache_len == length:
        return False
    model.set_kv_cache(batch_size, length, device=model_device(model), dtype=model_dtype(model))
    return True


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) left-padded with ``pad_id``, pad lengths (B,))."""
    if not len(prompts) or any(len(p) == 0 for p in prompts):
        raise LitModelError("every prompt needs at least one token; drop empty prompts")
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
    pads = torch.tensor([T - len(p) for p in prompts], dtype=torch.long)
    return idx.to(device), pads.to(device)


def padding_mask(pads: torch.Tensor, T: int, S: int, q_slots: torch.Tensor) -> torch.Tensor:
    """Boolean mask (B, 1, T, S): key slot k is visible to row b if it is not padding (k >= pads[b]).

    A padded query slot may attend to itself, so no row of the attention is fully masked (which would
    give NaN); those rows' outputs are never used. The model ANDs this with its causal mask.
    """
    k = torch.arange(S, device=pads.device)
    visible = k[None, None, :] >= pads[:, None, None]  # (B, 1, S)
    self_slot = k[None, None, :] == q_slots.to(pads.device)[None, :, None]  # (1, T, S)
    return (visible | self_slot).unsqueeze(1)


def _positions(pads: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return (slots[None, :] - pads[:, None]).clamp(min=0)


@torch.inference_mode()
def generate_tokens(model: nn.Module, prompts: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int, *,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                    stop_tokens: Sequence[int] = (), generator: torch.Generator | None = None,
                    pad_id: int = 0, use_kv_cache: bool = True, max_seq_length: int | None = None,
                    decode_step: DecodeStep | None = None, cache_state: CacheState | None = None,
                    ) -> Iterator[torch.Tensor]:
    """The core loop: yields the next tokens (B,) of every row, step by step.

    ``prompts``: a (B, T) tensor or a list of id lists of different lengths (left-padded here).
    A row that produced a stop token is finished: it yields ``pad_id`` from then on; the loop ends when
    every row is finished or after ``max_new_tokens`` steps. ``use_kv_cache=False`` recomputes the whole
    sequence every step (slow; the reference the cache is tested against). ``max_seq_length``: the KV
    cache length (default: prompt + max_new_tokens). ``cache_state`` (batch 1 only): see `CacheState`.
    """
    device = model_device(model)
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        prompts = prompts.tolist()
    idx, pads = left_pad(prompts, pad_id, device)
    B, T0 = idx.shape
    padded = bool(pads.any())
    if max_new_tokens <= 0:
        return
    stop = torch.tensor(sorted(set(int(t) for t in stop_tokens)), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        tok = sample_logits(logits, temperature, top_k, top_p, generator)
        return torch.where(finished, torch.full_like(tok, pad_id), tok)

    if not use_kv_cache:
        seq = idx
        for step in range(max_new_tokens):
            T = seq.size(1)
            slots = torch.arange(T, device=device)
            kw = {}
            if padded:
                kw = dict(positions=_positions(pads, slots), mask=padding_mask(pads, T, T, slots))
            tok = pick(model(seq, **kw)[:, -1])
            yield tok
            if stop.numel():
                finished |= torch.isin(tok, stop)
            if bool(finished.all()):
                return
            seq = torch.cat([seq, tok[:, None]], dim=1)
        return

    S = max_seq_length or T0 + max_new_tokens
    if S < T0 + max_new_tokens - 1:
        raise LitModelError(f"KV cache of {S} slots cannot hold {T0} prompt + {max_new_tokens} new tokens; "
                            "raise max_seq_length")
    step_fn = decode_step or make_decode_step(model)
    reallocated = ensure_kv_cache(model, B, S)
    start = 0
    if cache_state is not None:
        if B != 1:
            raise ValueError("cache_state works with a single sequence only")
        if not reallocated and cache_state.cache_len == S:
            prompt = prompts[0]
            common = 0
            for a, b in zip(cache_state.ids, prompt):
                if a != b:
                    break
                common += 1
            start = min(common, T0 - 1)  # the last prompt token is always run: its logits are needed
        cache_state.ids = list(prompts[0][:start])
        cache_state.cache_len = S

    # prefill
    slots = torch.arange(start, T0, device=device)
    kw = {}
    decode_mask = None
    if padded:
        kw = dict(positions=_positions(pads, slots), mask=padding_mask(pads, T0 - start, S, slots))
        decode_mask = padding_mask(pads, 1, S, torch.tensor([-1], device=device))  # no self exception needed
    logits = model(idx[:, start:], slots, **kw)[:, -1]
    if cache_state is not None:
        cache_state.ids = list(prompts[0])
    input_pos = torch.tensor([T0], dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        tok = pick(logits)
        yield tok
        if stop.numel():
            finished |= torch.isin(tok, stop)
        if step == max_new_tokens - 1 or bool(finished.all()):
            return
        positions = (input_pos - pads)[:, None] if padded else None
        logits = step_fn(tok.view(B, 1), input_pos, positions, decode_mask)
        if cache_state is not None:
            cache_state.ids.append(int(tok[0]))
        input_pos = input_pos + 1


def generate(model: nn.Module, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
             stop_tokens: Sequence[int] = (), *, seed: int | None = None, generator: torch.Generator | None = None,
             include_stop: bool = False, **kwargs) -> Iterator[int]:
    """Generate for one prompt, yielding each new token id as soon as it is produced.

    Stops after ``max_new_tokens`` or at the first token in ``stop_tokens`` (yielded only when
    ``include_stop``). ``temperature=0`` is greedy. ``seed`` (or a ``generator``) makes sampling
    reproducible. Other keyword arguments go to `generate_tokens` (``use_kv_cache``, ``decode_step``,
    ``max_seq_length``, ``cache_state``).
    """
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.reshape(-1).tolist()
    if generator is None and seed is not None:
        generator = make_generator(seed, model_device(model))
    stop = set(int(t) for t in stop_tokens)
    for tok in generate_tokens(model, [list(prompt_ids)], max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, stop_tokens=stop, generator=generator, **kwargs):
        t = int(tok[0])
        if t in stop:
            if include_stop:
                yield t
            return
        yield t


def generate_batch(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                   stop_tokens: Sequence[int] = (), *, seed: int | None = None,
                   generator: torch.Generator | None = None, include_stop: bool = False,
                   **kwargs) -> list[list[int]]:
    """New token ids for every prompt (left-padded batch); each list ends before its first stop token
    (or with it, when ``include_stop``)."""
    if generator is None and seed is not None:
        generator = make_generator(seed, model_device(model))
    stop = set(int(t) for t in stop_tokens)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for toks in generate_tokens(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                stop_tokens=stop, generator=generator, **kwargs):
        for i, t in enumerate(toks.tolist()):
            if done[i]:
                continue
            if t in stop:
                done[i] = True
                if not include_stop:
                    continue
            out[i].append(t)
    return out
