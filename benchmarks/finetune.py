"""Finetuning step throughput, MFU and memory on the SmolLM2-135M config (random weights, no download).

    python benchmarks/finetune.py --threads 1 --bf16_tokens 8    # the recorded run: ~8 minutes on a shared 2-core box
    python benchmarks/finetune.py --rounds 5                      # a quiet CPU with AVX512-BF16/AMX: all at 4 x 512
    python benchmarks/finetune.py --quantize nf4 --threads 1      # LoRA vs QLoRA memory and speed, 135M and 1B shapes

Variants (the recipe's own step: Fabric precision + activation checkpointing, forward with
positions/mask, `sft_loss`, backward, clipping, AdamW):

* LoRA r=8 on query and value, batch ``--batch`` x ``--seq`` random tokens, in 32-true, bf16-mixed and
  bf16-true, each with and without activation checkpointing. bf16 runs on a slow reference path on CPUs
  without AVX512-BF16/AMX (about 100x slower than float32 here), so on such a CPU the bf16 variants run
  at 1 x ``--bf16_tokens`` tokens instead (the table says which shape each row used).
* Full finetuning, same model and batch (32-true), for LoRA vs full tokens/s.
* Padded vs packed batches (LoRA, 32-true) on a dataset with lengths uniform in [64, 512]: useful
  (non-padding) tokens/s.

The variants run interleaved, one step each per round (round 0 is a warm-up and is not counted), and
the table reports medians over rounds, because the machine is shared. MFU is what the training loop
prints: tokens/s x `litmodel.flops.train_flops_per_token(model, config, T)` over this machine's peak for
the variant's matmul dtype (`litmodel.flops.peak_flops`: measured once, cached); "CPU time" columns
use the step's CPU time / threads instead of its wall time. The table also gives the matmul rate by
wall time measured just before each step ("matmul now"), a gauge of how busy the machine was.
Memory: the process's peak resident set during the step minus the resident set before it (glibc's
free memory is trimmed first), i.e. activations, gradients, optimizer state and temporaries, not the
weights.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from litmodel import Config, build_meta_model, build_model
from litmodel.checkpoint import load_config, load_model, save_checkpoint_dir
from litmodel.data.sft import PackedBatches, collate_fn, sft_loss
from litmodel.fabric import Fabric
from litmodel.flops import (
    matmul_dtype,
    measure_matmul_flops,
    mfu,
    peak_flops,
    train_flops_per_token,
)
from litmodel.lora import apply_lora, mark_only_lora_as_trainable
from litmodel.losses import IGNORE_INDEX
from litmodel.nf4 import load_model_nf4, nf4_model_nbytes
from litmodel.precision import native_half_matmul
from litmodel.training_args import TrainArgs, build_optimizer


# ---- memory of one step (Linux) ------------------------------------------------------------------
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        return True
    except OSError:
        return False


# ---- data ----------------------------------------------------------------------------------------
class MixedLengths:
    """An `SFTDataset` stand-in: ``n`` random examples with lengths uniform in [lo, hi], prompts (the first
    quarter) masked out of the labels."""

    def __init__(self, n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        self.max_seq_length = hi
        self.examples = []
        for _ in range(n):
            T = rng.randint(lo, hi)
            ids = torch.randint(0, vocab, (T + 1,), generator=g)
            labels = ids[1:].clone()
            labels[: T // 4] = IGNORE_INDEX
            self.examples.append((ids[:-1], labels))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.examples[i][0], "labels": self.examples[i][1]}

    def lengths(self) -> list[int]:
        return [len(x) for x, _ in self.examples]


def fixed_batches(B: int, T: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, vocab, (B, T + 1), generator=g)
        yield {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "n_tokens": torch.tensor(B * T)}


def loader_batches(dataset, B: int, seed: int = 0):
    """Shuffled batches through the recipe's collate (padding or packed rows, plus the non-padding count)."""
    collate = partial(collate_fn, pad_id=0)
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(dataset), generator=g).tolist()
        for i in range(0, len(order) - B + 1, B):
            items = [dataset[j] for j in order[i:i + B]]
            yield {**collate(items), "n_tokens": torch.tensor(sum(len(it["input_ids"]) for it in items))}


# ---- variants ------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    precision: str
    ac: bool
    method: str  # lora | full
    data: str  # fixed | padded | packed
    B: int
    T: int
    fabric: Fabric = None
    model: object = None
    optimizer: object = None
    batches: object = None
    times: list = field(default_factory=list)
    tokens: list = field(default_factory=list)  # processed (B x T incl. padding)
    useful: list = field(default_factory=list)  # non-padding
    cpu_tokens: list = field(default_factory=list)  # per CPU-second of this process / threads
    cpu_useful: list = field(default_factory=list)
    now: list = field(default_factory=list)  # matmul FLOP/s measured just before the step
    mfu: list = field(default_factory=list)
    mfu_cpu: list = field(default_factory=list)  # tokens per CPU second (had it had the cores to itself)
    mem: list = field(default_factory=list)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.precision == "32-true" else torch.bfloat16


def make_models(config: Config, variants: list[Variant]) -> None:
    """One model per (method, parameter dtype, activation checkpointing); bf16-mixed shares the float32 one."""
    torch.manual_seed(0)
    base = build_model(config)
    cache: dict = {}
    for v in variants:
        key = (v.method, v.precision == "bf16-true", v.ac)
        v.fabric = Fabric(accelerator="cpu", devices=1, precision=v.precision, activation_checkpointing=v.ac)
        v.fabric.launch()
        if key not in cache:
            m = copy.deepcopy(base)
            if v.method == "lora":
                apply_lora(m, targets=("query", "value"), r=8, alpha=16, dropout=0.0)
                mark_only_lora_as_trainable(m)
            if v.precision == "bf16-true":
                m = m.to(torch.bfloat16)
            m.train()
            cache[key] = m
        # the same module may be set up by two Fabrics (32-true and bf16-mixed differ only in autocast);
        # activation checkpointing wraps blocks in place once
        v.model = v.fabric.setup(cache[key])
        v.optimizer = v.fabric.setup_optimizers(build_optimizer(v.model, TrainArgs(lr=1e-4, weight_decay=0.0)))
    del base


def run_step(v: Variant) -> tuple[float, float, int, int, int, float]:
    batch = next(v.batches)
    _trim()
    rss0 = _status_kb("VmRSS")
    have_peak = _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    logits = v.model(batch["input_ids"], positions=batch.get("positions"), mask=batch.get("mask"))
    loss = sft_loss(logits, batch["labels"])
    v.fabric.backward(loss)
    v.fabric.clip_gradients(v.model, v.optimizer, max_norm=1.0)
    v.fabric.step(v.optimizer)
    v.optimizer.zero_grad(set_to_none=True)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_mb = (_status_kb("VmHWM") - rss0) / 1024 if have_peak else float("nan")
    del logits, loss
    B, T = batch["input_ids"].shape
    return dt, cpu, B * T, int(batch["n_tokens"]), T, peak_mb


# ---- LoRA vs QLoRA (--quantize nf4): whole-process peak memory and tokens/s, one process per run ----------------
QLORA_DOC = """
LoRA vs QLoRA (``--quantize nf4``): for each ``--qlora_models`` shape a random checkpoint is written once in
bf16 (as Hub checkpoints are) under ``--work_dir``; then each run is a fresh process that loads it the way
the recipe does (LoRA: ``load_model`` to float32; QLoRA: ``load_model_nf4``, quantizing tensor by tensor),
applies LoRA r=8 to query and value, and runs ``--qlora_steps`` + 1 optimizer steps (the first is a
warm-up) of ``--batch`` x ``--qlora_seq`` random tokens in 32-true. Peak memory is the process's peak
resident set (VmHWM), weights included: that is what QLoRA is for. LoRA and QLoRA processes alternate,
``--rounds`` times each; medians are reported.
"""


def write_random_checkpoint(name: str, work_dir: Path) -> Path:
    """A checkpoint dir of the registry config ``name`` with random bf16 weights (std 0.02), written once."""
    out = work_dir / name
    if (out / "model.safetensors").is_file():
        return out
    config = Config.from_name(name)
    meta = build_meta_model(config)
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, p in meta.state_dict().items():
        if k == "lm_head.weight" and config.tie_embeddings:
            continue
        t = torch.ones(p.shape) if "norm" in k else torch.randn(p.shape, generator=g) * 0.02
        state[k] = t.to(torch.bfloat16)
    save_checkpoint_dir(out, state, config)
    return out


def qlora_worker(method: str, checkpoint_dir: Path, B: int, T: int, steps: int) -> None:
    """One run in this process; prints a JSON line with its figures."""
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    if method.startswith("qlora"):
        model = load_model_nf4(checkpoint_dir, dtype=torch.float32)
    else:
        model = load_model(checkpoint_dir, dtype=torch.float32)
    apply_lora(model, targets=("query", "value"), r=8, alpha=16, dropout=0.0)
    mark_only_lora_as_trainable(model)
    model.train()
    load_s, load_peak = time.perf_counter() - t0, _status_kb("VmHWM")
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true", activation_checkpointing=method.endswith("-ac"))
    fabric.launch()
    model = fabric.setup(model)
    optimizer = fabric.setup_optimizers(build_optimizer(model, TrainArgs(lr=1e-4, weight_decay=0.0)))
    config = load_config(checkpoint_dir)
    batches = fixed_batches(B, T, config.vocab_size)
    times = []
    for i in range(steps + 1):
        batch = next(batches)
        t = time.perf_counter()
        loss = sft_loss(model(batch["input_ids"]), batch["labels"])
        fabric.backward(loss)
        fabric.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first step is a warm-up (optimizer state, allocator)
            times.append(time.perf_counter() - t)
        del loss
    print(json.dumps({"method": method, "rss_start_mb": rss0 / 1024, "load_s": load_s, "load_peak_mb": load_peak / 1024,
                      "peak_mb": _status_kb("VmHWM") / 1024, "step_s": times, "tokens": B * T,
                      "weights_mb": nf4_model_nbytes(model.module) / 2**20}), flush=True)


def qlora_main(args) -> None:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    med = statistics.median
    t_start = time.perf_counter()
    rows = []
    for name in args.qlora_models.split(","):
        t0 = time.perf_counter()
        ckpt = write_random_checkpoint(name, work)
        print(f"{name}: checkpoint {ckpt} ({(ckpt / 'model.safetensors').stat().st_size / 2**20:.0f} MiB bf16, "
              f"{time.perf_counter() - t0:.0f}s)", flush=True)
        methods = args.qlora_methods.split(",")
        results: dict[str, list[dict]] = {m: [] for m in methods}
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or torch.get_num_threads())}
        for r in range(args.rounds):
            for method in methods:
                cmd = [sys.executable, __file__, "--_worker", method, "--_checkpoint", str(ckpt), "--batch",
                       str(args.batch), "--qlora_seq", str(args.qlora_seq), "--qlora_steps", str(args.qlora_steps),
                       *(["--threads", str(args.threads)] if args.threads else [])]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    raise SystemExit(f"{method} run failed:\n{out.stderr[-3000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results[method].append(res)
                print(f"  round {r + 1} {method}: load {res['load_s']:.1f}s, peak {res['peak_mb']:.0f} MB "
                      f"(after load {res['load_peak_mb']:.0f}, start {res['rss_start_mb']:.0f}), steps "
                      f"{', '.join(f'{s:.1f}' for s in res['step_s'])} s ({time.perf_counter() - t_start:.0f}s)",
                      flush=True)
        summary = {}
        for method, rs in results.items():
            steps = [s for x in rs for s in x["step_s"]]
            summary[method] = dict(peak=med([x["peak_mb"] for x in rs]), load_peak=med([x["load_peak_mb"] for x in rs]),
                                   start=med([x["rss_start_mb"] for x in rs]), load_s=med([x["load_s"] for x in rs]),
                                   weights=rs[0]["weights_mb"], tps=rs[0]["tokens"] / med(steps), step=med(steps))
        rows.append((name, summary))
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s; batch {args.batch} x {args.qlora_seq}, medians of "
          f"{args.rounds} round(s) x {args.qlora_steps} timed steps; threads {args.threads or torch.get_num_threads()}")
    print("\n| model shape | method | parameters in memory MB | load s | peak RSS MB (whole process) | step s | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for name, s in rows:
        for method, x in s.items():
            label = {"lora": "LoRA", "qlora": "QLoRA (nf4)", "lora-ac": "LoRA + act. ckpt",
                     "qlora-ac": "QLoRA (nf4) + act. ckpt"}[method]
            print(f"| {name} | {label} | {x['weights']:.0f} | {x['load_s']:.1f} | "
                  f"{x['peak']:.0f} | {x['step']:.2f} | {x['tps']:.1f} |")
    for name, s in rows:
        for q in [m for m in s if m.startswith("qlora") and "lora" in s]:
            a, b = s["lora"], s[q]
            print(f"{name}: {q} peak memory {b['peak'] / a['peak'] * 100:.0f}% of LoRA's (above the "
                  f"~{a['start']:.0f} MB the interpreter + torch take before loading: "
                  f"{(b['peak'] - b['start']) / (a['peak'] - a['start']) * 100:.0f}%), tokens/s "
                  f"{b['tps'] / a['tps'] * 100:.0f}% of LoRA's")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__ + QLORA_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="registry config (random weights)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (fixed-length variants)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds (after one warm-up round)")
    p.add_argument("--bf16_tokens", type=int, default=None,
                   help="bf16 variants run at 1 x this many tokens (default: full batch where bf16 is fast, else 8)")
    p.add_argument("--only", default=None, help="comma-separated variant names to run")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all cores). On a shared machine use 1: two OpenMP threads that "
                        "compete with another job for the cores stall each other at every barrier (5x swings)")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="compare LoRA with QLoRA instead (see below)")
    p.add_argument("--qlora_models", default="SmolLM2-135M-Instruct,Llama-3.2-1B", help="registry configs for --quantize")
    p.add_argument("--qlora_seq", type=int, default=256, help="tokens per sequence for --quantize")
    p.add_argument("--qlora_steps", type=int, default=2, help="timed steps per process for --quantize")
    p.add_argument("--qlora_methods", default="lora,qlora,qlora-ac",
                   help="runs for --quantize: lora, qlora, and -ac (activation checkpointing) variants")
    p.add_argument("--work_dir", default="/tmp/litmodel-bench", help="where --quantize writes its random checkpoints")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_checkpoint", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._worker:
        return qlora_worker(args._worker, Path(args._checkpoint), args.batch, args.qlora_seq, args.qlora_steps)
    if args.quantize:
        if "--batch" not in sys.argv:
            args.batch = 1
        if "--rounds" not in sys.argv:
            args.rounds = 1
        return qlora_main(args)

    torch.manual_seed(0)
    config = Config.from_name(args.model)
    fast_bf16 = native_half_matmul(torch.bfloat16)
    bf16_B, bf16_T = (args.batch, args.seq) if fast_bf16 and args.bf16_tokens is None else (1, args.bf16_tokens or 8)
    B, T = args.batch, args.seq
    variants = [
        Variant("lora 32-true", "32-true", False, "lora", "fixed", B, T),
        Variant("lora 32-true +AC", "32-true", True, "lora", "fixed", B, T),
        Variant("full 32-true", "32-true", False, "full", "fixed", B, T),
        Variant("lora padded (64-512)", "32-true", False, "lora", "padded", B, T),
        Variant("lora packed (64-512)", "32-true", False, "lora", "packed", B, T),
        Variant("lora bf16-mixed", "bf16-mixed", False, "lora", "fixed", bf16_B, bf16_T),
        Variant("lora bf16-mixed +AC", "bf16-mixed", True, "lora", "fixed", bf16_B, bf16_T),
        Variant("lora bf16-true", "bf16-true", False, "lora", "fixed", bf16_B, bf16_T),
        Variant("lora bf16-true +AC", "bf16-true", True, "lora", "fixed", bf16_B, bf16_T),
    ]
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")}
        variants = [v for v in variants if v.name in wanted]
    print(f"{args.model}: batch {B} x {T}; bf16 variants {bf16_B} x {bf16_T} "
          f"(fast bf16: {fast_bf16}); threads {torch.get_num_threads()}", flush=True)
    t_start = time.perf_counter()
    # the denominator the training loop uses: measured once per machine and dtype (5 s), then cached
    peaks = {prec: peak_flops(torch.device("cpu"), prec) for prec in dict.fromkeys(v.precision for v in variants)}
    for prec, pk in peaks.items():
        print(f"peak for {prec}: {pk.flops / 1e9:.2f} GFLOP/s ({pk.label})", flush=True)
    make_models(config, variants)
    mixed = MixedLengths(64, 64, T, config.vocab_size)
    packed = PackedBatches(mixed, T, seed=0)
    for v in variants:
        v.batches = {"fixed": lambda v=v: fixed_batches(v.B, v.T, config.vocab_size),
                     "padded": lambda v=v: loader_batches(mixed, v.B),
                     "packed": lambda v=v: loader_batches(packed, v.B)}[v.data]()
    for r in range(args.rounds + 1):
        for v in variants:
            if r == 0:  # warm-up (optimizer state, kernels, allocator) at a small shape; not counted
                saved, v.batches = v.batches, fixed_batches(1, 8 if v.dtype == torch.bfloat16 else 64,
                                                            config.vocab_size)
                run_step(v)
                v.batches = saved
                continue
            # how busy the machine is right now (the matmul rate of this dtype), then the step
            now = measure_matmul_flops(matmul_dtype(v.precision), "cpu", seconds=0.5, rounds=1, wall_only=True)
            dt, cpu, tokens, useful, seq, mem = run_step(v)
            cpu_dt = cpu / torch.get_num_threads()  # the step's time had it had the cores to itself
            fpt = train_flops_per_token(v.model, config, seq)
            v.times.append(dt)
            v.tokens.append(tokens / dt)
            v.useful.append(useful / dt)
            v.cpu_tokens.append(tokens / cpu_dt)
            v.cpu_useful.append(useful / cpu_dt)
            v.now.append(now)
            v.mfu.append(mfu(tokens / dt * fpt, peaks[v.precision]))
            v.mfu_cpu.append(mfu(tokens / cpu_dt * fpt, peaks[v.precision]))
            v.mem.append(mem)
            print(f"  round {r} {v.name}: {dt:.2f}s (cpu {cpu:.1f}s), {tokens / dt:.1f} tok/s, "
                  f"{useful / dt:.1f} useful tok/s, "
                  f"MFU {v.mfu[-1] * 100:.1f}% (CPU time: {v.mfu_cpu[-1] * 100:.1f}%) {peaks[v.precision].label}, "
                  f"matmul now {now / 1e9:.1f} GFLOP/s, "
                  f"+{mem:.0f} MB "
                  f"({time.perf_counter() - t_start:.0f}s)", flush=True)
        if r == 0:
            print(f"  warm-up done ({time.perf_counter() - t_start:.0f}s)", flush=True)
    med = statistics.median
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s; medians of {args.rounds} interleaved rounds")
    print("\n| variant | B x T | step s | tokens/s | useful tokens/s | tokens/s (CPU time) | useful tokens/s (CPU time) "
          "| MFU | MFU (CPU time) | peak GFLOP/s (cached) | matmul now GFLOP/s (wall) | step peak +MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        print(f"| {v.name} | {v.B} x {v.T if v.data == 'fixed' else '≤' + str(v.T)} | {med(v.times):.2f} | "
              f"{med(v.tokens):.1f} | {med(v.useful):.1f} | {med(v.cpu_tokens):.1f} | {med(v.cpu_useful):.1f} | "
              f"{med(v.mfu) * 100:.1f}% | {med(v.mfu_cpu) * 100:.1f}% | {peaks[v.precision].flops / 1e9:.2f} | "
              f"{med(v.now) / 1e9:.2f} | "
              f"{med(v.mem):.0f} |")
    by = {v.name: v for v in variants}

    def ratio(a: str, b: str, key: str) -> str:
        x, y = getattr(by[a], key), getattr(by[b], key)
        per_round = ", ".join(f"{p / q:.2f}" for p, q in zip(x, y))
        return f"{med(x) / med(y):.2f}x (per round: {per_round})"

    if "lora 32-true" in by and "full 32-true" in by:
        print(f"\nLoRA / full tokens/s: wall {ratio('lora 32-true', 'full 32-true', 'tokens')}; "
              f"CPU time {ratio('lora 32-true', 'full 32-true', 'cpu_tokens')}")
    if "lora packed (64-512)" in by and "lora padded (64-512)" in by:
        lengths = mixed.lengths()
        print(f"packed / padded useful tokens/s: wall {ratio('lora packed (64-512)', 'lora padded (64-512)', 'useful')}; "
              f"CPU time {ratio('lora packed (64-512)', 'lora padded (64-512)', 'cpu_useful')} "
              f"(mean example {sum(lengths) / len(lengths):.0f} tokens, {len(packed)} packed rows for {len(lengths)} "
              f"examples)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
