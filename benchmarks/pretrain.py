"""Training-step throughput and MFU: forward + backward + AdamW step, one process.

    python benchmarks/pretrain.py                      # all variants (several minutes on 2 cores)
    python benchmarks/pretrain.py --models gpt-6x384 --precisions 32-true --allocators default,tuned

Each variant runs in a fresh subprocess (so allocator settings and compiled code do not leak between
variants) and reports the median step time after warm-up. MFU is what the training loop prints:
litmodel.flops.train_flops_per_token over this machine's peak for the precision's matmul dtype
(litmodel.flops.peak_flops: measured once, 5 s of large matmuls, cached in ~/.cache/litmodel).
"CPU time" columns divide by the step's CPU time / threads instead of its wall time: what the step
would reach with the cores to itself (the machine is shared).
Allocators: "default" is glibc malloc as it comes; "tuned" is what litmodel's entry points apply
(litmodel.utils.tune_allocator: glibc keeps freed large buffers instead of unmapping them);
"tcmalloc" preloads libtcmalloc_minimal when the system has it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import time


MODELS = {
    "gpt-6x384": dict(name="gpt-6x384", model_type="gpt2", block_size=256, vocab_size=50304, n_layer=6, n_head=6,
                      n_embd=384, bias=True, tie_embeddings=True, learned_pos_emb=True, gelu_approximate="tanh",
                      rotary_percentage=0.0),
    "SmolLM2-135M": "SmolLM2-135M",
}


def tcmalloc_path() -> str | None:
    hits = glob.glob("/usr/lib/*/libtcmalloc_minimal.so*") + glob.glob("/usr/lib/libtcmalloc_minimal.so*")
    return sorted(hits)[0] if hits else None


def worker(model: str, precision: str, compile: bool, batch: int, seq: int, steps: int, tuned: bool) -> dict:
    import torch

    from litmodel import build_model
    from litmodel.config import Config
    from litmodel.flops import mfu, peak_flops, train_flops_per_token
    from litmodel.training import TrainArgs, build_optimizer, cross_entropy
    from litmodel.utils import tune_allocator

    if tuned:
        tune_allocator()
    spec = MODELS[model]
    config = Config.from_name(spec, block_size=seq) if isinstance(spec, str) else Config(**{**spec, "block_size": seq})
    peak = peak_flops(torch.device("cpu"), precision)  # cached after the first variant of this dtype
    m = build_model(config)
    m.init_weights()
    if precision == "bf16-true":
        m = m.to(torch.bfloat16)
    opt = build_optimizer(m, TrainArgs(lr=1e-4))
    fwd = torch.compile(m) if compile else m
    x = torch.randint(0, config.vocab_size, (batch, seq + 1))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = fwd(x[:, :-1])
        loss = cross_entropy(logits, x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times, cpu_times = [], []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpu_times.append((time.process_time() - c) / torch.get_num_threads())  # had it had the cores to itself
    median = statistics.median(times)
    tok_s, tok_s_cpu = batch * seq / median, batch * seq / statistics.median(cpu_times)
    fpt = train_flops_per_token(m, config, seq)
    value = mfu(tok_s * fpt, peak)  # never above 1 (raises the cached peak)
    value_cpu = mfu(tok_s_cpu * fpt, peak)
    return {"tokens_per_sec": tok_s, "tokens_per_cpu_sec": tok_s_cpu, "mfu": float("nan") if value is None else value,
            "mfu_cpu": float("nan") if value_cpu is None else value_cpu, "peak_tflops": peak.flops / 1e12,
            "peak_label": peak.label, "step_s": median, "params_m": sum(p.numel() for p in m.parameters()) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt-6x384,SmolLM2-135M")
    p.add_argument("--precisions", default=None,
                   help="default: 32-true,bf16-mixed,bf16-true where bf16 is fast, else 32-true only")
    p.add_argument("--compile", default="false,true")
    p.add_argument("--allocators", default="default,tuned,tcmalloc")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return
    import torch  # here, not at the top: the per-variant workers set threads before importing it

    from litmodel.precision import native_half_matmul

    fast_bf16 = native_half_matmul(torch.bfloat16)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, oneDNN bf16 kernels: {fast_bf16}")
    if args.precisions is None:
        args.precisions = "32-true,bf16-mixed,bf16-true" if fast_bf16 else "32-true"
        if not fast_bf16:
            print("bf16 skipped: this CPU has no native bf16 matmul kernels (pass --precisions to force)")
    rows = []
    for model in args.models.split(","):
        for precision in args.precisions.split(","):
            for compile in [c == "true" for c in args.compile.split(",")]:
                for allocator in args.allocators.split(","):
                    env = dict(os.environ)
                    if allocator == "tcmalloc":
                        lib = tcmalloc_path()
                        if lib is None:
                            print("tcmalloc: not installed (apt-get install libtcmalloc-minimal4), skipped")
                            continue
                        env["LD_PRELOAD"] = lib
                    spec = dict(model=model, precision=precision, compile=compile, batch=args.batch, seq=args.seq,
                                steps=args.steps, tuned=allocator == "tuned")
                    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                         capture_output=True, text=True)
                    if out.returncode:
                        print(f"{model} {precision} compile={compile} {allocator}: FAILED\n{out.stderr[-1500:]}")
                        continue
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    rows.append((model, precision, "compile" if compile else "eager", allocator, r))
                    print(f"{model:13s} {precision:10s} {'compile' if compile else 'eager':7s} {allocator:8s} "
                          f"{r['tokens_per_sec']:8.0f} tok/s  MFU {100 * r['mfu']:5.1f}%  (CPU time: "
                          f"{r['tokens_per_cpu_sec']:.0f} tok/s, MFU {100 * r['mfu_cpu']:.1f}%)  "
                          f"{r['peak_label']}, step {r['step_s']:.2f}s", flush=True)
    print("\n| model | precision | mode | allocator | tokens/s | MFU | tokens/s (CPU time) | MFU (CPU time) "
          "| peak GFLOP/s |\n|---|---|---|---|---|---|---|---|---|")
    for model, precision, mode, allocator, r in rows:
        print(f"| {model} | {precision} | {mode} | {allocator} | {r['tokens_per_sec']:.0f} | "
              f"{100 * r['mfu']:.1f}% | {r['tokens_per_cpu_sec']:.0f} | {100 * r['mfu_cpu']:.1f}% | "
              f"{r['peak_tflops'] * 1000:.0f} |")


if __name__ == "__main__":
    main()
