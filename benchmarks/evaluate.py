r"""lm-eval `loglikelihood` throughput of litmodel's scorer at batch size 1 vs 16.

    python benchmarks/evaluate.py                          # both workloads, 3 interleaved rounds
    python benchmarks/evaluate.py --workloads short --rounds 5 --threads 2 --batch_sizes 1,4,16

SmolLM2-135M-sized Llama (`Config.from_name("SmolLM2-135M")`, random weights), scored with
`litmodel.scoring.score_continuations` (what `LitLM.loglikelihood` runs after tokenizing), on
multiple-choice-shaped requests: each context comes with 4 continuations of different lengths.
Workloads (token counts drawn uniformly):
  short      context 8-24 tokens, continuation 1-4 tokens (PIQA/LAMBADA-sized)
  hellaswag  context 60-120 tokens, continuation 15-35 tokens
Every round runs every (workload, batch size) once, in a rotated order, so that load from other
processes affects all variants alike; the table reports medians over rounds of requests/s and of
scored tokens/s (context + continuation tokens the model read).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    parser.add_argument("--batch_sizes", default="1,16")
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
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    requests = {w: make_requests(w, args.contexts, cfg.vocab_size) for w in workloads}
    variants = [(w, b) for w in workloads for b in sizes]
    score_continuations(model, requests[workloads[0]][:4], cfg.block_size, 4)  # warm-up
    times: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for w, b in order:
            t0 = time.perf_counter()
            score_continuations(model, requests[w], cfg.block_size, b)
            times[(w, b)].append(time.perf_counter() - t0)
            print(f"round {r + 1}: {w} bs={b}: {len(requests[w]) / times[(w, b)][-1]:.2f} requests/s", file=sys.stderr)

    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"{datetime.date.today()}, medians of {args.rounds} rounds, {args.contexts} contexts x 4 requests")
    print("| workload | batch size | requests/s | tokens/s | speed-up vs bs=1 |")
    print("|---|---|---|---|---|")
    summary = {}
    for w in workloads:
        tokens = sum(len(c) + len(t) - 1 for c, t in requests[w])
        base = None
        for b in sizes:
            med = statistics.median(times[(w, b)])
            rps = len(requests[w]) / med
            base = base or rps
            summary[f"{w}/bs{b}"] = {"requests_per_s": rps, "tokens_per_s": tokens / med}
            print(f"| {w} | {b} | {rps:.2f} | {tokens / med:.0f} | {rps / base:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
