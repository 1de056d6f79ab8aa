r"""Batch-1 decode speed of litmodel's generation vs transformers' `generate`, and the bandwidth floor.

    python benchmarks/generate.py                       # all variants, 3 interleaved rounds
    python benchmarks/generate.py --variants lit-bf16-compile,hf-bf16 --rounds 5 --threads 2

SmolLM2-135M-sized Llama (`Config.from_name("SmolLM2-135M")`) with random weights (GPT-2 init), a
32-token prompt, 128 new tokens, greedy. transformers' LlamaForCausalLM gets the very same weights.
Every round runs every variant once (in a rotated order) and measures the memory read bandwidth
(`t.sum()` over a 1 GiB float32 tensor) in between, so that load from other processes on the machine
affects all variants alike; the table reports medians over rounds.

decode tokens/s = (new tokens - 1) / (time of the last token - time of the first token): prefill and
the first token are excluded. The floor is the bandwidth over the bytes of weights each token reads.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from litmodel import Config, build_model
from litmodel.generate import generate, make_decode_step, model_bytes
from litmodel.quantize import optimize_for_decode, quantize_int8

ALL = ["hf-fp32", "hf-bf16", "lit-fp32", "lit-fp32-compile", "lit-bf16", "lit-bf16-compile", "lit-int8",
       "lit-int8-compile"]


def bandwidth_gbs(t: torch.Tensor, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        t.sum()
        times.append(time.perf_counter() - t0)
    return t.numel() * t.element_size() / statistics.median(times) / 1e9


def hf_model(lit, cfg: Config):
    import transformers
    from litmodel.convert import lit_to_hf_plan

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
        self.times, self.tokens, self.calls = [], [], 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())
            self.tokens.append(int(value.reshape(-1)[0]))

    def end(self):
        pass


def run_hf(hf, prompt, new):
    s = Stamps()
    with torch.inference_mode():
        hf.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=s)
    return s.tokens, (len(s.times) - 1) / (s.times[-1] - s.times[0])


def run_lit(model, step, prompt, new):
    times, toks = [], []
    for t in generate(model, prompt, new, temperature=0, decode_step=step, max_seq_length=len(prompt) + new):
        times.append(time.perf_counter())
        toks.append(t)
    return toks, (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    cfg = Config.from_name("SmolLM2-135M")
    torch.manual_seed(0)
    base = build_model(cfg)
    base.init_weights()
    base.eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,)).tolist()

    runners, nbytes, compile_s = {}, {}, {}
    for v in variants:
        dtype = torch.bfloat16 if "bf16" in v or "int8" in v else torch.float32
        t0 = time.perf_counter()
        if v.startswith("hf-"):
            m = hf_model(base, cfg).to(dtype)
            nbytes[v] = model_bytes(m)
            runners[v] = (lambda m: lambda: run_hf(m, prompt, args.new))(m)
        else:
            m = copy.deepcopy(base).to(dtype)
            compiled = v.endswith("-compile")
            if "int8" in v:
                quantize_int8(m)
            else:
                optimize_for_decode(m, compiled=compiled)
            step = make_decode_step(m, compile=compiled)
            nbytes[v] = model_bytes(m)
            runners[v] = (lambda m, step: lambda: run_lit(m, step, prompt, args.new))(m, step)
        runners[v]()  # warm-up (compiles the decode step)
        compile_s[v] = time.perf_counter() - t0
        print(f"ready {v} ({nbytes[v] / 1e6:.0f} MB of weights, setup + warm-up {compile_s[v]:.1f} s)",
              file=sys.stderr, flush=True)

    big = torch.ones(256 * 1024 * 1024)  # 1 GiB
    speeds = {v: [] for v in variants}
    bws, tokens = [], {}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        bws.append(bandwidth_gbs(big))
        for v in order:
            toks, tps = runners[v]()
            speeds[v].append(tps)
            tokens[v] = toks
        bws.append(bandwidth_gbs(big))
        print(f"round {r + 1}: " + ", ".join(f"{v} {speeds[v][-1]:.1f}" for v in variants)
              + f"; bandwidth {bws[-2]:.1f}/{bws[-1]:.1f} GB/s", file=sys.stderr, flush=True)
    bw = statistics.median(bws)

    rows = []
    print(f"\n{datetime.date.today()}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median read bandwidth {bw:.1f} GB/s (min {min(bws):.1f}, max {max(bws):.1f})\n")
    print("| variant | decode tok/s (median) | min-max | weights MB | floor tok/s | % of floor | vs transformers |")
    print("|---|---|---|---|---|---|---|")
    for v in variants:
        med = statistics.median(speeds[v])
        floor = bw * 1e9 / nbytes[v]
        prec = "fp32" if "fp32" in v else "bf16"
        hf_key = f"hf-{prec}"
        vs = f"{med / statistics.median(speeds[hf_key]):.2f}x" if hf_key in speeds and not v.startswith("hf") else ""
        rows.append(dict(variant=v, tok_s=med, all=speeds[v], weights_mb=nbytes[v] / 1e6, floor=floor,
                         pct_floor=100 * med / floor, setup_s=compile_s[v]))
        print(f"| {v} | {med:.1f} | {min(speeds[v]):.1f}-{max(speeds[v]):.1f} | {nbytes[v] / 1e6:.0f} | {floor:.0f} | "
              f"{100 * med / floor:.0f}% | {vs} |")
    if args.json:
        args.json.write_text(json.dumps(dict(bandwidth=bws, rows=rows, threads=torch.get_num_threads(),
                                             torch=torch.__version__, date=str(datetime.date.today()),
                                             env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "LD_PRELOAD")}),
                                        indent=1))


if __name__ == "__main__":
    main()
