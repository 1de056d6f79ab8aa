r"""Generate text from a prompt with a litmodel checkpoint, streaming it to stdout.

    python generate/base.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M --prompt "Once upon a time"
    echo "Once upon a time" | python generate/base.py --checkpoint_dir ... --temperature 0
    python generate/base.py --checkpoint_dir ... --prompt "..." --precision bf16-true --compile true --quantize int8
    python generate/base.py --checkpoint_dir ... --prompts_file prompts.txt --max_batch_size 8 > out.jsonl
    python generate/base.py --checkpoint_dir ... --prompt "..." --quantize int4 --int4_group_size 64
    python generate/base.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-360M --prompt "..." \
        --draft_checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M --speculative_k 4

The generated text (not the prompt) goes to stdout as it is produced; time to first token, tokens/s and
peak memory go to stderr. A checkpoint dir of a merged LoRA finetune works as is (its lora.* files are
ignored).

With --prompts_file (one prompt per line, or JSON lines with a "prompt" field) every prompt is generated
with continuous batching (`litmodel.batching`, as the server does: up to --max_batch_size at a time, each
with exactly the tokens it would get alone) and one JSON line per prompt goes to stdout, in file order:
{"prompt", "completion", "finish_reason", "prompt_tokens", "completion_tokens"}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch

from litmodel.batching import BatchEngine
from litmodel.cli import cli_main, parse_function_args
from litmodel.generate import generate
from litmodel.generation_cli import (Timer, check_lengths, dump_prompt_ids, model_bytes, read_stdin_prompt,
                                     stream_to_stdout)
from litmodel.generation_request import Request, SamplingParams
from litmodel.generation_setup import setup_generation, warmup
from litmodel.precision import precision_name
from litmodel.sampling import check_sampling, make_generator
from litmodel.speculative import SpeculativeStats, check_draft, speculative_generate
from litmodel.utils import LitModelError

SAME_TOKENIZER_PROBE = "Hello, world! 123 The quick brown fox; ünïcödé."


def main(
    checkpoint_dir: Path,
    prompt: Optional[str] = None,
    num_samples: int = 1,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 50,
    top_p: float = 1.0,
    seed: Optional[int] = None,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    compile: bool = False,
    quantize: Optional[Literal["int8", "int4"]] = None,
    int4_group_size: int = 64,
    draft_checkpoint_dir: Optional[Path] = None,
    speculative_k: int = 4,
    draft_quantize: Optional[Literal["none", "int8", "int4"]] = None,
    device: str = "auto",
    accelerator: Optional[str] = None,
    prompts_file: Optional[Path] = None,
    max_batch_size: int = 8,
) -> list[list[int]]:
    """Generate text from a prompt.

    Args:
        checkpoint_dir: A litmodel checkpoint dir (model.safetensors, model_config.yaml, tokenizer files).
        prompt: The prompt text; omitted or "-": read it from stdin.
        num_samples: How many continuations of the prompt to generate, one after the other.
        max_new_tokens: The most tokens to generate per sample (generation also stops at the EOS token).
        temperature: Sampling temperature; 0 is greedy decoding (always the most likely token).
        top_k: Sample only among the k most likely tokens (omit or null for no limit).
        top_p: Nucleus sampling: sample among the most likely tokens whose probability adds up to top_p, in (0, 1].
        seed: Random seed for reproducible sampling (the same seed gives the same text).
        precision: Weights and compute dtype: 32-true, bf16-true or 16-true (default: bf16-true on GPUs and
            on CPUs with bf16 instructions, else 32-true).
        compile: torch.compile the single-token decode step. One-time cost before the first token: about 3-6
            minutes for a 135M model on a 2-core CPU (measured 160-380 s), 0.5-3 minutes on later runs with the
            same shapes (Inductor's cache in ~/.cache/litmodel/inductor); tokens are then ~1.5x faster than the
            default eager path on CPU. Never done unless asked.
        quantize: Weight-only quantization of the linear layers: "int8" (per channel, about half bf16's memory)
            or "int4" (groupwise, about a quarter; computed in bf16).
        int4_group_size: Input columns per int4 scale/zero group: 32, 64, 128 or 256 (smaller: more accurate).
        draft_checkpoint_dir: Speculative decoding: a small model with the same tokenizer (e.g. SmolLM2-135M
            for SmolLM2-360M) that proposes --speculative_k tokens per round; the output keeps the target's
            distribution (greedy: the target's tokens; on CPU with litmodel's C kernels exactly so in bf16 too,
            elsewhere bf16 rounding can flip near-ties). Prints the acceptance rate and the speed-up.
        speculative_k: Draft tokens proposed per round (>= 1) with --draft_checkpoint_dir.
        draft_quantize: The draft's weight quantization: none, int8 or int4 (default: --quantize's). An int4
            draft reads ~1/3.6 of its bf16 bytes per token: cheaper rounds, at some cost in acceptance.
        device: auto (cuda if available, else cpu), cpu, cuda or cuda:N.
        accelerator: Alias of --device (cpu, cuda, gpu or auto); overrides it when given.
        prompts_file: Generate for every prompt of this file (one per line, or JSON lines {"prompt": ...}),
            batched; prints one JSON line per prompt. With --seed, prompt i samples with seed + i.
        max_batch_size: With --prompts_file: how many prompts are decoded together.
    """
    check_sampling(temperature, top_k, top_p)
    if speculative_k < 1:
        raise LitModelError(f"--speculative_k must be >= 1 (draft tokens per round), got {speculative_k}")
    if num_samples < 1:
        raise LitModelError(f"--num_samples must be >= 1, got {num_samples}")
    if prompts_file is not None and (prompt is not None or num_samples != 1):
        raise LitModelError("--prompts_file replaces --prompt and --num_samples; repeat a line to sample it again")
    if max_new_tokens < 1:
        raise LitModelError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    if seed is not None:
        torch.manual_seed(seed)
    gen = setup_generation(checkpoint_dir, device=accelerator or device, precision=precision, quantize=quantize,
                           compile=compile, int4_group_size=int4_group_size)
    tok, config = gen.tokenizer, gen.config
    if prompts_file is not None:
        return generate_file(gen, prompts_file, max_batch_size, max_new_tokens, temperature, top_k, top_p, seed)
    draft = None
    if draft_checkpoint_dir is not None:
        draft_quantize = quantize if draft_quantize is None else None if draft_quantize == "none" else draft_quantize
        draft = setup_generation(draft_checkpoint_dir, device=accelerator or device, precision=precision,
                                 quantize=draft_quantize, int4_group_size=int4_group_size)
        check_draft(config, draft.config, speculative_k)
        if draft.tokenizer.encode(SAME_TOKENIZER_PROBE) != tok.encode(SAME_TOKENIZER_PROBE):
            raise LitModelError(f"{draft_checkpoint_dir} tokenizes text differently from {checkpoint_dir}; the draft "
                                "model needs the target's tokenizer")
    if prompt is None or prompt == "-":
        prompt = read_stdin_prompt()
    ids = tok.encode(prompt)
    if not ids:
        raise LitModelError("the prompt is empty and the tokenizer adds no BOS token; pass a non-empty --prompt")
    check_lengths(len(ids), max_new_tokens, config.block_size)
    dump_prompt_ids(ids)
    print(f"loaded {checkpoint_dir} in {gen.load_seconds:.1f} s ({precision_name(gen.dtype)}"
          f"{', ' + quantize if quantize else ''}, {model_bytes(gen.model) / 1e6:.1f} MB of weights, {gen.device})",
          file=sys.stderr)
    if draft is not None:
        print(f"draft {draft_checkpoint_dir}: {model_bytes(draft.model) / 1e6:.1f} MB of weights, "
              f"{speculative_k} tokens per round", file=sys.stderr)
    max_seq_length = len(ids) + max_new_tokens
    if compile:
        t0 = time.perf_counter()
        warmup(gen, max_seq_length)
        print(f"compiled the decode step in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    generator = make_generator(seed, gen.device)
    outputs = []
    for i in range(num_samples):
        timer = Timer()
        decoder = tok.incremental_decoder(context_ids=ids)
        stats = SpeculativeStats()
        if draft is not None:
            stream = speculative_generate(gen.model, draft.model, ids, max_new_tokens, k=speculative_k,
                                          temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=tok.stop_ids,
                                          generator=generator, stats=stats)
        else:
            stream = generate(gen.model, ids, max_new_tokens, temperature, top_k, top_p, tok.stop_ids,
                              generator=generator, decode_step=gen.decode_step, max_seq_length=max_seq_length)
        outputs.append(stream_to_stdout(stream, decoder, timer, gen.device))
        label = f"sample {i + 1}/{num_samples}: " if num_samples > 1 else ""
        print(label + timer.report(gen.device), file=sys.stderr)
        if draft is not None:
            plain = Timer()  # the target alone, for the speed-up (a short greedy run)
            for _ in generate(gen.model, ids, min(max_new_tokens, 16), 0, decode_step=gen.decode_step):
                plain.tick()
            speedup = timer.tokens_per_second() / plain.tokens_per_second()
            print(f"speculative decoding: {stats.accepted}/{stats.proposed} draft tokens accepted "
                  f"({100 * stats.acceptance_rate:.0f}%), {stats.tokens_per_round:.2f} tokens per target pass, "
                  f"{speedup:.2f}x the target alone ({plain.tokens_per_second():.1f} tokens/s)", file=sys.stderr)
    return outputs


def read_prompts(path: Path) -> list[str]:
    """The prompts of a text file (one per non-empty line) or a JSONL file (a "prompt" string per line)."""
    path = Path(path)
    if not path.is_file():
        raise LitModelError(f"--prompts_file {path} does not exist")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines or not all(ln.lstrip().startswith("{") for ln in lines):
        if not lines:
            raise LitModelError(f"--prompts_file {path} has no prompts")
        return lines
    prompts = []
    for i, ln in enumerate(lines, 1):
        try:
            value = json.loads(ln).get("prompt")
        except (json.JSONDecodeError, AttributeError):
            value = None
        if not isinstance(value, str):
            raise LitModelError(f"line {i} of {path} is not a JSON object with a \"prompt\" string; use one prompt "
                                "per line or JSON lines like {\"prompt\": \"...\"}")
        prompts.append(value)
    return prompts


def generate_file(gen, prompts_file: Path, max_batch_size: int, max_new_tokens: int, temperature: float,
                  top_k: Optional[int], top_p: float, seed: Optional[int]) -> list[list[int]]:
    """Batched generation for every prompt of a file; JSON lines to stdout in file order, progress to stderr."""
    tok, block_size = gen.tokenizer, gen.config.block_size
    texts = read_prompts(prompts_file)
    ids = [tok.encode(t) for t in texts]
    for i, p in enumerate(ids):
        if not p:
            raise LitModelError(f"prompt {i + 1} of {prompts_file} is empty and the tokenizer adds no BOS token")
        check_lengths(len(p), max_new_tokens, block_size)
    length = max(len(p) for p in ids) + max_new_tokens
    engine = BatchEngine(gen.model, tok, max_batch_size=min(max_batch_size, len(ids)), max_seq_length=length,
                         decode_step=gen.decode_step)
    if gen.compile:
        t0 = time.perf_counter()
        engine.warmup()
        print(f"compiled the decode step in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    reqs = [engine.submit(Request(p, SamplingParams(max_new_tokens, temperature, top_k, top_p,
                                                     None if seed is None else seed + i, stop_ids=tok.stop_ids)))
            for i, p in enumerate(ids)]
    t0, printed, last_report = time.perf_counter(), 0, 0.0
    while engine.has_work():
        engine.step()
        while printed < len(reqs) and reqs[printed].done.is_set():  # in file order, as soon as possible
            r = reqs[printed]
            print(json.dumps({"prompt": texts[printed], "completion": r.text, "finish_reason": r.finish_reason,
                              "prompt_tokens": len(r.prompt_ids), "completion_tokens": r.completion_tokens},
                             ensure_ascii=False), flush=True)
            printed += 1
        now = time.perf_counter()
        if now - last_report > 5 or not engine.has_work():
            last_report, done, n = now, engine.stats["finished"], sum(r.completion_tokens for r in reqs)
            print(f"{done}/{len(reqs)} prompts, {n} tokens in {now - t0:.1f} s ({n / (now - t0):.1f} tokens/s)",
                  file=sys.stderr)
    engine.close()
    return [r.output_ids for r in reqs]


def setup(argv: Optional[list[str]] = None) -> None:
    main(**parse_function_args(main, argv, __doc__))


if __name__ == "__main__":
    cli_main(setup)()
