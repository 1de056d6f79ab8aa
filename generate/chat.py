r"""Chat with a litmodel checkpoint, using the checkpoint's chat template.

    python generate/chat.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    printf 'Hi!\nTell me a joke.\n' | python generate/chat.py --checkpoint_dir ... --temperature 0

Type a message and press Enter; the reply streams to stdout and stops at the model's end-of-turn token.
Commands: `!reset` starts a new conversation (keeping --system), `!exit` or Ctrl-D quits. With piped
stdin every line is one user message, so a conversation can be scripted. When the conversation outgrows
the model's context, the oldest turns are dropped (the system message is kept) and a notice is printed.
The KV cache is reused across turns for the part of the prompt that is unchanged.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch

from litmodel.cli import cli_main, parse_function_args
from litmodel.generate import CacheState, generate
from litmodel.generation_cli import Timer, check_lengths, dump_prompt_ids, fit_conversation, stream_to_stdout
from litmodel.generation_setup import setup_generation, warmup
from litmodel.sampling import check_sampling, make_generator
from litmodel.utils import LitModelError

CACHE_BUCKET = 256  # KV-cache lengths are multiples of this (few shapes to compile, cache reused across turns)


def _cache_length(needed: int, block_size: int) -> int:
    return min(block_size, -(-needed // CACHE_BUCKET) * CACHE_BUCKET)


def main(
    checkpoint_dir: Path,
    system: Optional[str] = None,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    compile: bool = False,
    quantize: Optional[Literal["int8", "int4"]] = None,
    int4_group_size: int = 64,
    device: str = "auto",
    accelerator: Optional[str] = None,
) -> list[dict]:
    """Interactive multi-turn chat.

    Args:
        checkpoint_dir: A litmodel checkpoint dir (model.safetensors, model_config.yaml, tokenizer files with a
            chat template).
        system: An optional system message, kept for the whole conversation (and across !reset).
        max_new_tokens: The most tokens of one reply (a reply also ends at the end-of-turn token).
        temperature: Sampling temperature; 0 is greedy decoding.
        top_k: Sample only among the k most likely tokens (omit or null for no limit).
        top_p: Nucleus sampling: sample among the most likely tokens whose probability adds up to top_p, in (0, 1].
        seed: Random seed for reproducible replies.
        precision: Weights and compute dtype: 32-true, bf16-true or 16-true (default: bf16-true on GPUs and
            on CPUs with bf16 instructions, else 32-true).
        compile: torch.compile the single-token decode step. One-time cost before the first reply, again for
            each new cache length (multiples of 256 tokens): about 3-6 minutes for a 135M model on a 2-core CPU
            (measured 160-380 s), 0.5-3 minutes on later runs (Inductor's cache in ~/.cache/litmodel/inductor);
            tokens are then ~1.5x faster than the default eager path on CPU. Never done unless asked.
        quantize: Weight-only quantization of the linear layers: "int8" (per channel) or "int4" (groupwise).
        int4_group_size: Input columns per int4 scale/zero group: 32, 64, 128 or 256 (smaller: more accurate).
        device: auto (cuda if available, else cpu), cpu, cuda or cuda:N.
        accelerator: Alias of --device (cpu, cuda, gpu or auto); overrides it when given.
    """
    check_sampling(temperature, top_k, top_p)
    if seed is not None:
        torch.manual_seed(seed)
    gen = setup_generation(checkpoint_dir, device=accelerator or device, precision=precision, quantize=quantize,
                           compile=compile, int4_group_size=int4_group_size)
    tok, block_size = gen.tokenizer, gen.config.block_size
    check_lengths(1, max_new_tokens, block_size)
    if not tok.has_chat_template:
        print("note: this checkpoint has no chat template; using a plain 'role: content' format", file=sys.stderr)
    stop = set(tok.end_of_turn_ids)
    generator = make_generator(seed, gen.device)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    state = CacheState()
    interactive = sys.stdin.isatty()
    compiled_lengths: set[int] = set()
    if interactive:
        print("chat: type a message; !reset starts over, !exit or Ctrl-D quits", file=sys.stderr)
    while True:
        if interactive:
            print(">> You: ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # EOF (Ctrl-D)
            break
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            continue
        if command == "!exit":
            break
        if command == "!reset":
            messages = list(start)
            print("(conversation reset)", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        try:
            messages, ids, dropped = fit_conversation(tok, messages, max_new_tokens, block_size)
        except LitModelError as err:
            print(f"notice: {err}; the message was skipped", file=sys.stderr)
            messages.pop()
            continue
        if dropped:
            print(f"notice: the conversation outgrew the model's context of {block_size} tokens; dropped the "
                  f"{dropped} oldest message(s){' (the system message is kept)' if system else ''}", file=sys.stderr)
        dump_prompt_ids(ids, messages)
        cache_len = _cache_length(len(ids) + max_new_tokens, block_size)
        if gen.compile and cache_len not in compiled_lengths:
            t0 = time.perf_counter()
            warmup(gen, cache_len)
            state = CacheState()  # the warm-up overwrote the cache
            compiled_lengths.add(cache_len)
            print(f"(compiled the decode step for a {cache_len}-token cache in {time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr)
        if interactive:
            print(">> Assistant: ", end="", file=sys.stderr, flush=True)
        timer = Timer()
        decoder = tok.incremental_decoder(skip_special_tokens=False, context_ids=ids)
        tokens = generate(gen.model, ids, max_new_tokens, temperature, top_k, top_p, stop, generator=generator,
                          decode_step=gen.decode_step, max_seq_length=cache_len, cache_state=state)
        reply = stream_to_stdout(tokens, decoder, timer, gen.device)
        messages.append({"role": "assistant", "content": tok.decode(reply)})
        print(f"({timer.report(gen.device)})", file=sys.stderr)
    return messages


def setup(argv: Optional[list[str]] = None) -> None:
    main(**parse_function_args(main, argv, __doc__))


if __name__ == "__main__":
    cli_main(setup)()
