r"""lm-eval `loglikelihood` throughput of litmodel's scorer at batch size 1 vs 16, with and without packing.

    python benchmarks/evaluate.py                          # both workloads, 4 variants, 3 interleaved rounds
    python benchmarks/evaluate.py --workloads short --rounds 5 --threads 2 --variants bs1,bs4,bs16-pack

SmolLM2-135M-sized Llama (`Config.from_name("SmolLM2-135M")`, random weights), scored with
`litmodel.scoring.score_continuations` (what `LitLM.loglikelihood` runs after tokenizing), on
multiple-choice-shaped requests: each context comes with 4 continuations of different lengths.
Variants: bsN = N rows per forward pass, one request per row (requests with identical inputs share a
row); bsN-pack = the 4 continuations of a context packed in one row after one copy of the context
(`pack=True`, the default of `LitLM`).
Workloads (token counts drawn uniformly):
  short      context 8-24 tokens, continuation 1-4 tokens (PIQA/LAMBADA-sized)
  hellaswag  context 60-120 tokens, continuation 15-35 tokens
Every round runs every (workload, batch size) once, in a rotated order, so that load from other
processes affects all variants alike; the table reports medians over rounds of requests/s and of
request tokens/s (context + continuation tokens of the requests, however many the model actually reads).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from litmodel import Config, build_model
from litmodel.scoring import score_continuations

WORKLOADS = {"short": ((8, 24), (1, 4)), "hellaswag": ((60, 120), (15, 35))}


def make_requests(kind: str, contexts: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    (clo, chi), (tlo, thi) = WORKLOADS[kind]
    g = torch.Generator().manual_seed(seed)

    def rand(lo: int, hi: int) -> list[int]:
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    out = []
    for _ in range(contexts):
        ctx = rand(clo, chi)
        out += [(ctx, rand(tlo, thi)) for _ in range(4)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="short,hellaswag")
    parser.add_argument("--variants", default="bs1,bs16,bs1-pack,bs16-pack")
    parser.add_argument("--contexts", type=int, default=8, help="contexts per workload (4 requests each)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=None, help="also write the medians here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = Config.from_name("SmolLM2-135M")
    model = build_model(cfg).eval()
    workloads = args.workloads.split(",")
    names = args.variants.split(",")
    settings = {v: (int(v.split("-")[0][2:]), v.endswith("-pack")) for v in names}
    requests = {w: make_requests(w, args.contexts, cfg.vocab_size) for w in workloads}
    variants = [(w, v) for w in workloads for v in names]
    score_continuations(model, requests[workloads[0]][:4], cfg.block_size, 4)  # warm-up
    times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for w, v in order:
            bs, pack = settings[v]
            t0 = time.perf_counter()
            score_continuations(model, requests[w], cfg.block_size, bs, pack=pack)
            times[(w, v)].append(time.perf_counter() - t0)
            print(f"round {r + 1}: {w} {v}: {len(requests[w]) / times[(w, v)][-1]:.2f} requests/s", file=sys.stderr)

    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"{datetime.date.today()}, medians of {args.rounds} rounds, {args.contexts} contexts x 4 requests")
    print("| workload | variant | requests/s | request tokens/s | speed-up vs the first variant |")
    print("|---|---|---|---|---|")
    summary = {}
    for w in workloads:
        tokens = sum(len(c) + len(t) - 1 for c, t in requests[w])  # tokens the requests ask to read
        base = None
        for v in names:
            med = statistics.median(times[(w, v)])
            rps = len(requests[w]) / med
            base = base or rps
            summary[f"{w}/{v}"] = {"requests_per_s": rps, "request_tokens_per_s": tokens / med}
            print(f"| {w} | {v} | {rps:.2f} | {tokens / med:.0f} | {rps / base:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
