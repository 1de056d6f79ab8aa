r"""Serving throughput and latency: generate/serve.py under 1, 4, 8 and 16 concurrent streaming clients.

    python benchmarks/serve.py                      # SmolLM2-135M-shaped random model, fp32, 3 rounds
    python benchmarks/serve.py --rounds 5 --max_tokens 128 --concurrency 1,8

A SmolLM2-135M-sized Llama (`Config.from_name("SmolLM2-135M")`, random weights) is saved as a checkpoint
dir with a word-level tokenizer of the same vocabulary and no end-of-sequence token (every request runs
for exactly --max_tokens tokens). The real server runs in a subprocess; each client thread sends one
streaming /v1/completions request with a random --prompt_tokens-token prompt, greedy. Every round runs
every concurrency level once (rotated order); the table reports medians over rounds:
* aggregate output tokens/s = all clients' completion tokens / wall time from the first send to the last
  [DONE];
* time to first token (TTFT): send -> first streamed chunk, p50 / p95 over all requests of all rounds;
* wall time relative to one client (the target: 8 concurrent requests in under 2x the time of one).
Before the server starts, the engine alone (no HTTP, no prefill) times one decode step with 1, 4, 8 and 16
active slots (median of --steps steps): what batching costs per step, free of the prefills that dominate
short requests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from litmodel import Config, build_model
from litmodel.batching import BatchEngine
from litmodel.checkpoint import save_checkpoint_dir
from litmodel.generation_request import Request, SamplingParams
from litmodel.generation_setup import setup_generation

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(out: Path, model_name: str) -> Path:
    cfg = Config.from_name(model_name)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(cfg.vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    (out / "tok").mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tok" / "tokenizer.json"))
    return save_checkpoint_dir(out / "ckpt", model, cfg, tokenizer_dir=out / "tok")


def step_times(ckpt: Path, precision: str, sizes: list[int], steps: int) -> dict[int, float]:
    """Median seconds of one engine decode step with n active slots (the server's model setup, in-process)."""
    gen = setup_generation(ckpt, device="cpu", precision=precision)
    out = {}
    for n in sizes:
        engine = BatchEngine(gen.model, max_batch_size=max(sizes), max_seq_length=64, decode_step=gen.decode_step)
        for i in range(n):
            engine.submit(Request([5 + i] * 4, SamplingParams(max_tokens=60, temperature=0)))
        for _ in range(n):
            engine.step()  # admits one request per step
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        out[n] = statistics.median(times)
        engine.close()
        print(f"decode step with {n:2d} active slots: {out[n] * 1000:.0f} ms", file=sys.stderr)
    del gen
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(url: str, prompt: list[int], max_tokens: int, t_start: float, out: dict) -> None:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    first = None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if first is None and data["choices"]:
                first = time.perf_counter()
            if data.get("usage"):
                out["tokens"] = data["usage"]["completion_tokens"]
    out["ttft"] = first - t_start
    out["end"] = time.perf_counter()


def run_level(url: str, clients: int, prompt_tokens: int, max_tokens: int, vocab: int, rng: random.Random) -> dict:
    prompts = [[rng.randrange(vocab) for _ in range(prompt_tokens)] for _ in range(clients)]
    outs = [{} for _ in range(clients)]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one_request, args=(url, p, max_tokens, t0, o)) for p, o in zip(prompts, outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(o["end"] for o in outs) - t0
    tokens = sum(o["tokens"] for o in outs)
    return {"clients": clients, "wall_s": wall, "tokens": tokens, "tok_s": tokens / wall,
            "ttft": [o["ttft"] for o in outs]}


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name", default="SmolLM2-135M")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt_tokens", type=int, default=32)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--max_batch_size", type=int, default=16)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, help="torch threads of the server and of the step timing (default: torch's)")
    ap.add_argument("--steps", type=int, default=5, help="decode steps timed per batch size (0: skip)")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    env = dict(os.environ)
    if args.threads:
        torch.set_num_threads(args.threads)
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ckpt = make_checkpoint(Path(tmp), args.model_name)
        print(f"saved a random {args.model_name} checkpoint in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        steps = step_times(ckpt, args.precision, [1, 4, 8, 16], args.steps) if args.steps else {}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, str(ROOT / "generate" / "serve.py"), "--checkpoint_dir", str(ckpt), "--port", str(port),
               "--precision", args.precision, "--max_batch_size", str(args.max_batch_size), "--max_seq_length",
               str(args.prompt_tokens + args.max_tokens), "--log_level", "warning", "--compile", str(args.compile)]
        server = subprocess.Popen(cmd, cwd=ROOT, env=env)
        try:
            deadline = time.time() + 900
            while True:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
            vocab = Config.from_name(args.model_name).vocab_size
            rng = random.Random(0)
            run_level(url, 2, args.prompt_tokens, 8, vocab, rng)  # warm-up
            results: dict[int, list[dict]] = {c: [] for c in levels}
            for r in range(args.rounds):
                order = levels[r % len(levels):] + levels[:r % len(levels)]
                for c in order:
                    res = run_level(url, c, args.prompt_tokens, args.max_tokens, vocab, rng)
                    results[c].append(res)
                    print(f"round {r + 1}/{args.rounds}: {c:2d} clients: {res['tok_s']:.1f} tok/s, wall "
                          f"{res['wall_s']:.1f} s, TTFT p50 {statistics.median(res['ttft']):.2f} s", file=sys.stderr)
        finally:
            server.terminate()
            server.wait(120)
    load = os.getloadavg()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"\n{datetime.date.today()} | {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, "
          f"{platform.python_version()} | load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print(f"{args.model_name}-shaped random model, {args.precision}{', compiled' if args.compile else ', eager'}, "
          f"{args.prompt_tokens}-token prompts, {args.max_tokens} new tokens each (greedy), --max_batch_size "
          f"{args.max_batch_size}, medians of {args.rounds} rounds\n")
    print("| concurrent clients | aggregate output tokens/s | wall time | vs 1 client | TTFT p50 | TTFT p95 |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(x["wall_s"] for x in results[levels[0]]) if levels[0] == 1 else None
    rows = {}
    for c in levels:
        runs = results[c]
        wall = statistics.median(x["wall_s"] for x in runs)
        ttft = [t for x in runs for t in x["ttft"]]
        rel = f"{wall / base:.2f}x" if base else "-"
        rows[c] = {"tok_s": statistics.median(x["tok_s"] for x in runs), "wall_s": wall,
                   "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95)}
        print(f"| {c} | {rows[c]['tok_s']:.1f} | {wall:.1f} s | {rel} | {rows[c]['ttft_p50']:.2f} s | "
              f"{rows[c]['ttft_p95']:.2f} s |")
    if steps:
        print("\n| active slots | decode step | output tokens/s | step time vs 1 slot |\n|---|---|---|---|")
        for n, t in steps.items():
            print(f"| {n} | {t * 1000:.0f} ms | {n / t:.1f} | {t / steps[1]:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows, "steps": steps,
                                         "raw": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
