"""Text generation shared by every entry point (`generate/base.py`, `generate/chat.py`, evaluation).

* `sample_logits` / `top_k_top_p_filter` / `sampling_probs`: temperature, top-k and top-p sampling
  (temperature 0 is greedy), reproducible with a `torch.Generator`.
* `generate(model, prompt_ids, ...)`: one sequence, yields token ids as they are produced.
* `generate_batch(model, prompts, ...)`: prompts of different lengths, left-padded, with the
  attention mask and position ids that make every row behave exactly as if it were alone.
* `generate_many(model, prompts, params, ...)`: continuous batching (`litmodel.batching`).
* `make_decode_step(model, compile=...)`: the single-token decode step, optionally `torch.compile`d
  with static shapes (the KV cache is static: prompt + new tokens, allocated once).
* `setup_generation(...)`: what both CLIs share: device, precision, checkpoint and tokenizer loading,
  int8 quantization and compilation, plus the user-input checks (`check_lengths`, `check_sampling`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from litmodel.utils import LitModelError

PRECISIONS = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}
QUANTIZE_MODES = ("int8", "int4")


# ---- sampling --------------------------------------------------------------------------------------
def top_k_top_p_filter(logits: torch.Tensor, top_k: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    """``logits`` (..., V) with every token outside the top-k / top-p (nucleus) set set to -inf.

    top-k keeps the ``top_k`` largest logits (ties with the k-th value are kept too). top-p then keeps
    the smallest set of most likely tokens whose probability adds up to at least ``top_p`` (a token is
    dropped when the more likely tokens before it already reach ``top_p``; the most likely token is
    always kept). Apply temperature first: top-p works on the distribution that is sampled from.
    """
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float = 1.0) -> torch.Tensor:
    """The distribution `sample_logits` draws from: softmax(filter(logits / temperature)) in float32."""
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)).float()
    logits = top_k_top_p_filter(logits.float() / temperature, top_k, top_p)
    return torch.softmax(logits, dim=-1)


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (...,) from ``logits`` (..., V); ``temperature == 0`` is greedy (argmax).

    Draws with the exponential race (argmax of p / Exp(1) noise, as gpt-fast does), which samples
    exactly from p without a host sync; ``generator`` makes it reproducible.
    """
    if temperature <= 0:
        # in float32: a bf16 argmax is not vectorized on CPU (~190 us for 49k logits, ~45 us upcast + fp32)
        return logits.float().argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.argmax(probs / noise, dim=-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(seed)
    return g


# ---- the decode step ---------------------------------------------------------------------------------
DecodeStep = Callable[..., torch.Tensor]


def _decode_one_token(model: nn.Module, idx: torch.Tensor, input_pos: torch.Tensor, positions: torch.Tensor | None,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """Logits (B, V) of the next token after ``idx`` (B, 1) written at cache slot ``input_pos`` (1,)."""
    return model(idx, input_pos, positions=positions, mask=mask)[:, -1]


def make_decode_step(model: nn.Module, compile: bool = False, mode: str | None = None,
                     cuda_graph: bool | None = None) -> DecodeStep:
    """The single-token decode step ``step(idx, input_pos, positions, mask) -> logits (B, V)``.

    With ``compile=True`` it is `torch.compile`d with static shapes and ``fullgraph=True`` (gpt-fast style):
    the KV cache has a fixed length and the step always sees (B, 1) tokens, so it compiles once per cache
    shape (Inductor's on-disk cache makes later runs faster, see `enable_compile_cache`). ``mode`` defaults
    to "reduce-overhead" (CUDA graphs) on CUDA and the default mode on CPU. Without compiling, on CUDA
    (``cuda_graph`` None or True) the eager step is captured once per shape into a CUDA graph
    (`CUDAGraphStep`).
    """

    def step(idx, input_pos, positions=None, mask=None):
        return _decode_one_token(model, idx, input_pos, positions, mask)

    device = next(model.parameters(), torch.empty(0)).device
    if not compile:
        if device.type == "cuda" and cuda_graph is not False:
            return CUDAGraphStep(model)
        return step
    enable_compile_cache()
    if mode is None:
        mode = "reduce-overhead" if device.type == "cuda" else None
    options = None
    if device.type == "cpu" and mode is None:
        # store a pointwise result that several kernels read (the normalized activation feeding the row
        # blocks of a matrix-vector product) instead of recomputing it for every weight row: ~15% faster
        options = {"realize_reads_threshold": 1}
    return torch.compile(step, mode=mode, fullgraph=True, dynamic=False, options=options)


def enable_compile_cache(cache_dir: str | Path | None = None) -> Path:
    """Keep Inductor's compiled kernels and FX graphs on disk (default ``~/.cache/litmodel/inductor``, or
    $TORCHINDUCTOR_CACHE_DIR when set), so that a later run with the same model shape skips most of the
    compile work."""
    path = Path(cache_dir or os.environ.get("TORCHINDUCTOR_CACHE_DIR")
                or Path.home() / ".cache" / "litmodel" / "inductor")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    return path


class CUDAGraphStep:
    """The eager decode step captured into a CUDA graph, once per (batch, cache, mask) shape, then replayed:
    one launch per token instead of hundreds (what makes batch-1 decoding bandwidth-bound on a GPU).

    Inputs are copied into static buffers before each replay; the KV cache is static, so the captured
    kernels write it in place. NOT TESTED in this repository's CI (no GPU): if capturing fails, it warns
    once and runs the eager step instead.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.graphs: dict = {}
        self.failed = False

    def _eager(self, idx, input_pos, positions=None, mask=None):
        return _decode_one_token(self.model, idx, input_pos, positions, mask)

    def __call__(self, idx, input_pos, positions=None, mask=None):
        if self.failed:
            return self._eager(idx, input_pos, positions, mask)
        cache = self.model.blocks[0].attn.kv_cache if len(self.model.blocks) else None
        key = (tuple(idx.shape), None if positions is None else tuple(positions.shape),
               None if mask is None else tuple(mask.shape), None if cache is None else cache.k.data_ptr())
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(idx, input_pos, positions, mask)
            except Exception as err:  # pragma: no cover - CUDA only
                import warnings

                warnings.warn(f"CUDA graph capture of the decode step failed ({err}); decoding eagerly")
                self.failed = True
                return self._eager(idx, input_pos, positions, mask)
            self.graphs[key] = entry
        graph, static, out = entry
        for name, value in (("idx", idx), ("input_pos", input_pos), ("positions", positions), ("mask", mask)):
            if value is not None:
                static[name].copy_(value)
        graph.replay()
        return out.clone()

    def _capture(self, idx, input_pos, positions, mask):  # pragma: no cover - CUDA only
        static = {"idx": idx.clone(), "input_pos": input_pos.clone(),
                  "positions": None if positions is None else positions.clone(),
                  "mask": None if mask is None else mask.clone()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (rewrites the same cache slot)
            for _ in range(2):
                self._eager(**static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._eager(**static)
        return graph, static, out


# ---- generation ----------------------------------------------------------------------------------------
@dataclass
class CacheState:
    """The token ids whose keys/values sit in the model's KV cache at slots 0..len(ids)-1 (batch 1).

    Pass the same object to successive `generate` calls (a chat) and a prompt that starts with the same
    ids only prefills its new suffix. Anything else (a different cache shape) re-prefills from scratch.
    """

    ids: list[int] = field(default_factory=list)
    cache_len: int = 0


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _ensure_kv_cache(model: nn.Module, batch_size: int, length: int) -> bool:
    """Allocate the static KV cache unless one of exactly this shape exists; True if (re)allocated."""
    blocks = model.blocks
    cache = blocks[0].attn.kv_cache if len(blocks) else None
    if cache is not None and cache.k.size(0) == batch_size and model.cache_len == length:
        return False
    model.set_kv_cache(batch_size, length, device=_model_device(model), dtype=_model_dtype(model))
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
    device = _model_device(model)
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
    reallocated = _ensure_kv_cache(model, B, S)
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
        generator = make_generator(seed, _model_device(model))
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
        generator = make_generator(seed, _model_device(model))
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


def generate_many(model: nn.Module, prompts: Sequence[Sequence[int]], params, **kwargs) -> list:
    """Continuous batching (each prompt with its own sampling settings, prompts joining as others finish):
    `litmodel.batching.generate_many`, the engine behind `generate/serve.py` and `--prompts_file`."""
    from litmodel.batching import generate_many as _generate_many  # litmodel.batching imports this module

    return _generate_many(model, prompts, params, **kwargs)


# ---- input checks ---------------------------------------------------------------------------------------
def check_sampling(temperature: float, top_k: int | None, top_p: float) -> None:
    if temperature < 0:
        raise LitModelError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not (0 < top_p <= 1):
        raise LitModelError(f"--top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise LitModelError(f"--top_k must be >= 1 (or omitted), got {top_k}")


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


# ---- loading: device, precision, quantization, compile ------------------------------------------------
def resolve_device(device: str | None = "auto") -> torch.device:
    device = (device or "auto").lower()
    if device in ("auto", "gpu"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LitModelError(f"--device {device} requested but CUDA is not available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise LitModelError(f"unknown --device {device!r}; use auto, cpu or cuda[:N]") from None


def resolve_precision(precision: str | None, device: torch.device) -> torch.dtype:
    if precision is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        from litmodel.quantize import _native_half_matmul

        # bf16 halves the bytes read per token, but CPUs without bf16 instructions (AVX2) compute it ~10x slower
        return torch.bfloat16 if _native_half_matmul(torch.bfloat16) else torch.float32
    if precision not in PRECISIONS:
        raise LitModelError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def precision_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in PRECISIONS.items()}[dtype]


@dataclass
class Generation:
    """What `setup_generation` loads: the model and tokenizer plus the decode step to use."""

    model: nn.Module
    tokenizer: object
    config: object
    device: torch.device
    dtype: torch.dtype
    decode_step: DecodeStep
    compile: bool = False
    quantize: str | None = None
    load_seconds: float = 0.0


def load_tokenizer(checkpoint_dir: str | Path):
    from litmodel.tokenizer import Tokenizer

    d = Path(checkpoint_dir)
    if not ((d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file()):
        raise LitModelError(f"{d} has no tokenizer (tokenizer.json or tokenizer.model); copy the tokenizer files "
                            f"of the base model into it or re-download with `python scripts/download.py`")
    return Tokenizer(d)


def setup_generation(checkpoint_dir: str | Path, device: str | None = "auto", precision: str | None = None,
                     quantize: str | None = None, compile: bool = False, fast_decode: bool = True,
                     int4_group_size: int = 64) -> Generation:
    """Load a checkpoint dir for generation (shared by `generate/base.py` and `generate/chat.py`).

    Extra files in the dir (a merged LoRA's ``lora.safetensors`` / ``lora_config.yaml``) are ignored.
    ``fast_decode``: prepare the model for batch-1 decoding: eager on CPU, the module swap of
    `litmodel.fast_decode.prepare_fast_decode` (oneDNN-packed weights, a cheaper one-token attention);
    with ``compile``, `litmodel.quantize.optimize_for_decode` (fused matrix-vector kernels). On CUDA the
    decode step is a CUDA graph (see `make_decode_step`).
    """
    from litmodel.checkpoint import check_checkpoint_dir, load_config, load_model

    t0 = time.perf_counter()
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise LitModelError(f"unknown --quantize {quantize!r}; choose one of {', '.join(QUANTIZE_MODES)} (or omit it)")
    d = check_checkpoint_dir(checkpoint_dir)
    tokenizer = load_tokenizer(d)
    config = load_config(d)
    model = load_model(d, device=dev, dtype=dtype, config=config)
    model = prepare_model(model, quantize, compile, fast_decode, int4_group_size)
    step = make_decode_step(model, compile=compile)
    return Generation(model, tokenizer, config, dev, dtype, step, compile, quantize, time.perf_counter() - t0)


def prepare_model(model: nn.Module, quantize: str | None = None, compile: bool = False, fast_decode: bool = True,
                  int4_group_size: int = 64) -> nn.Module:
    """Quantize (``int8``/``int4``) and/or swap in the fast decode modules; returns the model to use."""
    if quantize == "int8":
        from litmodel.quantize import quantize_int8

        quantize_int8(model)
    elif quantize == "int4":
        from litmodel.int4 import quantize_int4

        quantize_int4(model, int4_group_size)
    if not fast_decode or _model_device(model).type != "cpu":
        return model
    if compile:
        if quantize is None:
            from litmodel.quantize import optimize_for_decode

            optimize_for_decode(model, compiled=True)
        return model
    from litmodel.fast_decode import prepare_fast_decode

    return prepare_fast_decode(model, pack_linears=quantize is None)


def warmup(gen: Generation, max_seq_length: int, prompt_len: int = 2) -> None:
    """Compile the decode step for a cache of ``max_seq_length`` slots before timing anything."""
    list(generate(gen.model, [0] * prompt_len, 3, temperature=0, decode_step=gen.decode_step,
                  max_seq_length=max_seq_length))


# ---- reporting -------------------------------------------------------------------------------------------
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
        import resource

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


def dump_prompt_ids(ids: Sequence[int], messages: Sequence[dict] | None = None) -> None:
    """Append the ids sent to the model (and the chat messages they render) as a JSON line to the file
    named by the LITMODEL_DUMP_PROMPT_IDS environment variable (tests, debugging); no-op without it."""
    path = os.environ.get("LITMODEL_DUMP_PROMPT_IDS")
    if path:
        import json

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
