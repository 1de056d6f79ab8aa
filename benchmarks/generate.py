r"""Batch-1 decode speed of litmodel's generation paths vs transformers, against the bandwidth floor, plus
speculative decoding.

    python benchmarks/generate.py                        # decode table + speculative, 3 interleaved rounds
    python benchmarks/generate.py --variants lit-default,lit-int4 --rounds 5 --threads 1
    python benchmarks/generate.py --variants lit-fp32-compile --speculative false   # compiles (minutes)

Decode: SmolLM2-135M-sized Llama (`Config.from_name("SmolLM2-135M")`) with random weights (GPT-2 init), a
32-token prompt, 128 new tokens, greedy; transformers' LlamaForCausalLM gets the very same weights. Every round
runs every variant once (in a rotated order) and measures the read bandwidth (`t.sum()` over a 1 GiB float32
tensor) before and after, so load from other processes affects all alike; the table reports medians.

decode tokens/s = (new tokens - 1) / (time of the last token - time of the first token). CPU share = CPU seconds
of the process / wall seconds over the same span (1.0 per thread on a quiet machine); "on-CPU" divides tokens and
bytes by CPU seconds instead of wall seconds (meaningful with --threads 1: it removes the time other jobs held the
core, which a shared machine adds to the decode far more than to the short bandwidth probe). The floor is the read
bandwidth over the bytes of weights one token reads (every linear layer's weights and the norms; the embedding
table is not counted: a lookup reads one row; a tied head counts once as the head).

Variants: ``hf-fp32``/``hf-bf16`` transformers; ``lit-main-default`` the eager path generate/base.py used before
this change (column-major weights, `optimize_for_decode(compiled=False)`) in the default precision;
``lit-default`` what generate/base.py does now with no flags (default precision, `prepare_fast_decode`);
``lit-unfused`` the same without the fused one-token blocks (`prepare_fast_decode(fuse_blocks=False)`, the
default before them: one module call per attention, norm and linear);
``lit-fp32``/``lit-bf16`` the same in a given precision; ``lit-int8``/``lit-int4`` quantized (+ the
attention/norm swap); ``lit-*-compile`` `torch.compile`d (first call compiles: minutes).

Speculative: a SmolLM2-360M-shaped target (random weights), greedy, ``--speculative_k`` tokens per round, with
three drafts that agree with it often: the target's first ``--draft_layers`` blocks plus its final norm and head
(same weights, no copy), the same in int4 (a copy; `generate/base.py --draft_quantize int4`) and the target's
weights in int4 (self-speculative). tokens/s of the target alone vs with each draft, acceptance rate, and
whether the tokens are the same (with litmodel's C kernels the k+1-token verification computes each token as a
one-token step does, so they are, in bf16 too; elsewhere bf16 rounding can flip near-ties).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from litmodel import Config, build_model
from litmodel.decode_step import make_decode_step
from litmodel.fast_decode import prepare_fast_decode
from litmodel.generate import generate
from litmodel.generation_setup import prepare_model
from litmodel.precision import inference_dtype
from litmodel.quantize import optimize_for_decode
from litmodel.speculative import SpeculativeStats, speculative_generate
from litmodel.utils import tune_allocator

ALL = ["hf-fp32", "lit-main-default", "lit-default", "lit-fp32", "lit-bf16", "lit-int8", "lit-int4"]
KNOWN = ALL + ["lit-unfused", "hf-bf16", "lit-fp32-compile", "lit-bf16-compile", "lit-int8-compile", "lit-int4-compile"]


def read_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: everything but embedding tables (one row read) and KV caches."""
    skip = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding) or type(m).__name__ == "Int8Embedding":
            skip.update(id(t) for t in m.parameters(recurse=False))
            skip.update(id(t) for t in m.buffers(recurse=False))
    seen, total = set(), 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding) or type(m).__name__ in ("Int8Embedding", "KVCache"):
            continue
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t is None or id(t) in seen:
                continue
            tied_head = id(t) in skip and name.endswith("lm_head")
            if id(t) in skip and not tied_head:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def bandwidth_gbs(t: torch.Tensor, reps: int = 3) -> tuple[float, float]:
    """Read bandwidth (GB/s) of ``t.sum()``: per wall second, and per CPU second of this process."""
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        t.sum()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    nbytes = t.numel() * t.element_size()
    return nbytes / statistics.median(times) / 1e9, nbytes / max(statistics.median(cpu), 1e-9) / 1e9


def hf_model(lit, cfg: Config):
    import transformers
    from litmodel.hf_names import lit_to_hf_plan

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_config().items() if k != "architectures"})
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = lit.state_dict()
    state = {k: fn(*[sd[s] for s in srcs]) for k, (srcs, fn) in lit_to_hf_plan(cfg).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    hf.tie_weights()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


class Stamps:
    """A transformers streamer that records when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times, self.cpu, self.tokens, self.calls = [], [], [], 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())
            self.tokens.append(int(value.reshape(-1)[0]))

    def end(self):
        pass


def run_hf(hf, prompt, new):
    s = Stamps()
    with torch.inference_mode():
        hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=s)
    CPU_SHARE.append((s.cpu[-1] - s.cpu[0]) / (s.times[-1] - s.times[0]))
    return s.tokens, (len(s.times) - 1) / (s.times[-1] - s.times[0])


CPU_SHARE: list[float] = []  # CPU seconds / wall seconds of the last decode: < threads when other jobs preempt it


def timed(stream):
    times, cpu, toks = [], [], []
    for t in stream:
        times.append(time.perf_counter())
        cpu.append(time.process_time())
        toks.append(t)
    CPU_SHARE.append((cpu[-1] - cpu[0]) / (times[-1] - times[0]))
    return toks, (len(times) - 1) / (times[-1] - times[0])


def build_variant(v: str, base: nn.Module, cfg: Config, default_dtype: torch.dtype):
    """(model, decode step, label) of a lit variant."""
    if v in ("lit-default", "lit-main-default", "lit-unfused"):
        dtype = default_dtype
    else:
        dtype = torch.float32 if "fp32" in v else torch.bfloat16
    m = copy.deepcopy(base).to(dtype)
    compiled = v.endswith("-compile")
    quantize = "int8" if "int8" in v else "int4" if "int4" in v else None
    if v == "lit-main-default":
        optimize_for_decode(m, compiled=False)
    elif v == "lit-unfused":
        m = prepare_fast_decode(m, fuse_blocks=False)
    else:
        m = prepare_model(m, quantize=quantize, compile=compiled)
    return m, make_decode_step(m, compile=compiled), dtype


def decode_table(args, cfg, base, prompt, default_dtype):
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in KNOWN]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {','.join(KNOWN)}")
    runners, nbytes, setup_s, dtypes = {}, {}, {}, {}
    for v in variants:
        t0 = time.perf_counter()
        if v.startswith("hf-"):
            dtypes[v] = torch.float32 if v == "hf-fp32" else torch.bfloat16
            m = hf_model(base, cfg).to(dtypes[v])
            runners[v] = (lambda m: lambda: run_hf(m, prompt, args.new))(m)
        else:
            m, step, dtypes[v] = build_variant(v, base, cfg, default_dtype)
            runners[v] = (lambda m, step: lambda: timed(generate(m, prompt, args.new, temperature=0, decode_step=step,
                                                                 max_seq_length=len(prompt) + args.new)))(m, step)
        nbytes[v] = read_bytes(m)
        runners[v]()  # warm-up (compiles the decode step for -compile variants)
        setup_s[v] = time.perf_counter() - t0
        print(f"ready {v} ({nbytes[v] / 1e6:.0f} MB read per token, setup + warm-up {setup_s[v]:.1f} s)",
              file=sys.stderr, flush=True)
    big = torch.ones(256 * 1024 * 1024)  # 1 GiB
    speeds = {v: [] for v in variants}
    shares = {v: [] for v in variants}
    bws, bws_cpu, tokens = [], [], {}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for b, c in [bandwidth_gbs(big)]:
            bws.append(b)
            bws_cpu.append(c)
        for v in order:
            toks, tps = runners[v]()
            speeds[v].append(tps)
            shares[v].append(CPU_SHARE[-1])
            tokens[v] = toks
        for b, c in [bandwidth_gbs(big)]:
            bws.append(b)
            bws_cpu.append(c)
        print(f"round {r + 1}: " + ", ".join(f"{v} {speeds[v][-1]:.1f}" for v in variants)
              + f"; bandwidth {bws[-2]:.1f}/{bws[-1]:.1f} GB/s", file=sys.stderr, flush=True)
    del big
    bw, bw_cpu = statistics.median(bws), statistics.median(bws_cpu)
    ref_key = "lit-fp32" if "lit-fp32" in tokens else None
    default = statistics.median(speeds["lit-default"]) if "lit-default" in speeds else None
    print(f"\n{datetime.date.today()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median read bandwidth {bw:.1f} GB/s (min {min(bws):.1f}, max {max(bws):.1f}), "
          f"{bw_cpu:.1f} GB/s per CPU second; default precision here: {default_dtype}\n")
    print("| variant | dtype | decode tok/s (median) | min-max | MB read/token | floor tok/s | % of floor | "
          "vs lit-default | greedy tokens = lit-fp32 | CPU share | % of floor on-CPU | setup + warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for v in variants:
        med = statistics.median(speeds[v])
        floor = bw * 1e9 / nbytes[v]
        same = f"{sum(a == b for a, b in zip(tokens[v], tokens[ref_key]))}/{len(tokens[v])}" if ref_key else ""
        vs = f"{med / default:.2f}x" if default else ""
        # tokens per CPU second over the floor per CPU second: what a quiet machine would show (1 thread only)
        on_cpu = 100 * statistics.median(t / c for t, c in zip(speeds[v], shares[v])) / (bw_cpu * 1e9 / nbytes[v])
        rows.append(dict(variant=v, dtype=str(dtypes[v]), tok_s=med, all=speeds[v], mb=nbytes[v] / 1e6, floor=floor,
                         pct_floor=100 * med / floor, setup_s=setup_s[v], cpu_share=shares[v]))
        print(f"| {v} | {str(dtypes[v]).replace('torch.', '')} | {med:.1f} | {min(speeds[v]):.1f}-{max(speeds[v]):.1f} | "
              f"{nbytes[v] / 1e6:.0f} | {floor:.0f} | {100 * med / floor:.0f}% | {vs} | {same} | "
              f"{statistics.median(shares[v]):.2f} | {on_cpu:.0f}% | {setup_s[v]:.0f} |")
    return dict(bandwidth=bws, bandwidth_cpu=bws_cpu, rows=rows)


def truncated_draft(target: nn.Module, n_layers: int) -> nn.Module:
    """The target's first ``n_layers`` blocks + final norm + head as a model of its own: the weights are
    shared (no copy), the KV caches are not (shallow copies of the model, blocks and attention modules)."""

    def shallow(module: nn.Module) -> nn.Module:
        new = copy.copy(module)
        new._modules = dict(module._modules)
        return new

    draft = shallow(target)
    blocks = []
    for block in list(target.blocks)[:n_layers]:
        b = shallow(block)
        b._modules["attn"] = shallow(block.attn)
        blocks.append(b)
    draft._modules["blocks"] = nn.ModuleList(blocks)
    draft.config = copy.copy(target.config)
    draft.config.n_layer = n_layers
    return draft


def speculative_table(args, default_dtype):
    cfg = Config.from_name("SmolLM2-360M")
    torch.manual_seed(0)
    target = build_model(cfg)
    target.init_weights()
    target = target.eval().to(default_dtype)
    drafts = {}
    if "int4" in args.drafts:  # self-speculative: the target's own weights in int4 (made before packing)
        drafts["int4 copy of the target"] = prepare_model(copy.deepcopy(target), quantize="int4")
    if "truncated-int4" in args.drafts:  # the truncated draft below, its weights in int4 (--draft_quantize int4)
        drafts[f"first {args.draft_layers} blocks + head, int4"] = prepare_model(
            copy.deepcopy(truncated_draft(target, args.draft_layers)), quantize="int4")
    target = prepare_model(target)
    if "truncated" in args.drafts:
        drafts[f"first {args.draft_layers} blocks + head"] = truncated_draft(target, args.draft_layers)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,)).tolist()
    step = make_decode_step(target)
    timed(generate(target, prompt, 8, temperature=0, decode_step=step))  # warm-up
    plain, spec, rates, same = [], {d: [] for d in drafts}, {d: [] for d in drafts}, {d: True for d in drafts}
    for r in range(args.rounds):
        toks_p, tps_p = timed(generate(target, prompt, args.spec_new, temperature=0, decode_step=step))
        plain.append(tps_p)
        for name, draft in drafts.items():
            stats = SpeculativeStats()
            toks_s, tps_s = timed(speculative_generate(target, draft, prompt, args.spec_new, k=args.speculative_k,
                                                       temperature=0, stats=stats))
            same[name] &= toks_p == toks_s
            spec[name].append(tps_s)
            rates[name].append(stats.acceptance_rate)
        print(f"speculative round {r + 1}: target alone {tps_p:.1f} tok/s; " + "; ".join(
            f"{n}: {spec[n][-1]:.1f} tok/s, acceptance {rates[n][-1]:.0%}" for n in drafts), file=sys.stderr, flush=True)
    p = statistics.median(plain)
    print(f"\nSpeculative decoding: SmolLM2-360M-shaped target ({read_bytes(target) / 1e6:.0f} MB read/token, "
          f"{default_dtype}), k={args.speculative_k}, greedy, {args.spec_new} new tokens; target alone {p:.1f} tok/s\n")
    print("| draft | MB read/token | with draft tok/s | speed-up | acceptance rate | greedy tokens = target alone |")
    print("|---|---|---|---|---|---|")
    for name, draft in drafts.items():
        s = statistics.median(spec[name])
        print(f"| {name} | {read_bytes(draft) / 1e6:.0f} | {s:.1f} | {s / p:.2f}x | {statistics.median(rates[name]):.0%} | "
              f"{same[name]} |")
    return dict(plain=plain, spec=spec, rates=rates, same=same)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(ALL), help=f"comma-separated subset of {','.join(KNOWN)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--speculative", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--speculative_k", type=int, default=4)
    p.add_argument("--draft_layers", type=int, default=4)
    p.add_argument("--drafts", default="truncated,truncated-int4,int4", help="speculative drafts: truncated (the "
                   "target's first --draft_layers blocks + head), truncated-int4 (the same in int4), int4 (the target "
                   "quantized to int4)")
    p.add_argument("--spec_new", type=int, default=64, help="new tokens per speculative run")
    p.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = p.parse_args()
    tune_allocator()
    torch.set_num_threads(args.threads)
    default_dtype = inference_dtype(None, torch.device("cpu"))
    cfg = Config.from_name("SmolLM2-135M")
    torch.manual_seed(0)
    base = build_model(cfg)
    base.init_weights()
    base.eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,)).tolist()
    out = {}
    if args.variants:
        out["decode"] = decode_table(args, cfg, base, prompt, default_dtype)
    del base
    if args.speculative:
        out["speculative"] = speculative_table(args, default_dtype)
    if args.json:
        args.json.write_text(json.dumps(dict(out, threads=torch.get_num_threads(), torch=torch.__version__,
                                             date=str(datetime.date.today())), indent=1))


if __name__ == "__main__":
    main()
