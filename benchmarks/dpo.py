"""DPO step vs SFT LoRA step: tokens/s and peak memory on the same model and the same sequences.

    python benchmarks/dpo.py --pairs 2 --seq 128 --rounds 3 --threads 1   # the recorded run (~4.5 min, shared 2-core box)
    python benchmarks/dpo.py --pairs 4 --seq 512 --rounds 5

SmolLM2-135M-shaped model (random weights, no download), LoRA r=8 on query and value, 32-true (the fast path
on a CPU without native bf16). One batch is ``--pairs`` preference pairs of ``--seq`` tokens per answer row,
i.e. 2 x pairs rows; the variants train on exactly those rows:

* ``sft lora``: the SFT step on the 2 x pairs rows (forward, next-token loss on the answer tokens, backward,
  clipping, AdamW): the reference point.
* ``dpo lora``: the DPO step (`litmodel.dpo.DPOObjective`): a no-grad reference forward with the adapters
  disabled, the policy forward of the same rows, the DPO loss, backward, clipping, AdamW.
* ``dpo lora precomputed``: the DPO step with precomputed reference log-probs (no reference forward).

tokens/s counts the tokens the policy reads (2 x pairs x seq per step); per pair, a DPO step costs what an SFT
step on two sequences costs plus the reference forward. The variants run interleaved, one step each per round
(round 0 is a warm-up), medians over rounds, because the machine is shared. Memory: the step's peak resident
set minus the resident set before it (activations, gradients, optimizer state and temporaries; not weights).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from litmodel import Config, build_model
from litmodel.dpo import DPOArgs, DPOObjective, answer_logps, count_pairs
from litmodel.fabric import Fabric
from litmodel.lora import apply_lora, mark_only_lora_as_trainable
from litmodel.training import TrainArgs, build_optimizer


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def step_memory_start() -> int | None:
    """Trim freed memory, reset the peak resident set to the current one (Linux); the resident set now (kB)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        return None
    return _status_kb("VmRSS")


def pair_batch(pairs: int, seq: int, vocab: int, seed: int) -> dict:
    """2 x pairs rows (chosen first) of seq tokens sharing a prompt of seq // 4 tokens; labels on the answers."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (pairs, seq // 4), generator=g)
    rows = torch.cat([torch.cat([prompt, torch.randint(0, vocab, (pairs, seq + 1 - seq // 4), generator=g)], 1)
                      for _ in range(2)])
    labels = rows[:, 1:].clone()
    labels[:, : seq // 4 - 1] = -100
    return {"input_ids": rows[:, :-1], "labels": labels}


def sft_step_loss(model, batch) -> torch.Tensor:
    logps, n = answer_logps(model(batch["input_ids"]), batch["labels"])
    return -logps.sum() / n.sum()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="registry config (random weights)")
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per step (2x rows)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = Config.from_name(args.model)
    torch.manual_seed(0)
    model = build_model(config)
    mark_only_lora_as_trainable(apply_lora(model, targets=("query", "value"), r=8, alpha=16, dropout=0.0))
    model.train()
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    fabric.launch()
    model = fabric.setup(model)
    optimizer = fabric.setup_optimizers(build_optimizer(model, TrainArgs(lr=1e-5, weight_decay=0.0)))
    objective = DPOObjective(DPOArgs(beta=0.1), autocast=fabric.autocast)

    def dpo_loss(batch):
        loss_sum, _ = objective(model, batch)
        return loss_sum / count_pairs(batch)

    variants = {"sft lora": lambda b: sft_step_loss(model, b), "dpo lora": dpo_loss, "dpo lora precomputed": dpo_loss}
    results = {name: {"time": [], "tok": [], "mem": []} for name in variants}
    print(f"{args.model}: {args.pairs} pairs x {args.seq} tokens per row ({2 * args.pairs} rows); "
          f"threads {torch.get_num_threads()}", flush=True)
    t_start = time.perf_counter()
    for r in range(args.rounds + 1):
        batch = pair_batch(args.pairs, args.seq, config.vocab_size, seed=r)
        # the precomputed variant gets its reference log-probs before (outside) its timed step
        batch_pre = dict(batch, ref_logps=objective.reference_logps(model, batch))
        for name, loss_of in variants.items():
            b = batch_pre if name == "dpo lora precomputed" else batch
            rss0 = step_memory_start()
            t0 = time.perf_counter()
            loss = loss_of(b)
            fabric.backward(loss)
            fabric.clip_gradients(model, optimizer, max_norm=1.0)
            fabric.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            mem = (_status_kb("VmHWM") - rss0) / 1024 if rss0 is not None else float("nan")
            del loss
            if r == 0:
                continue
            tokens = b["input_ids"].numel()
            results[name]["time"].append(dt)
            results[name]["tok"].append(tokens / dt)
            results[name]["mem"].append(mem)
            print(f"  round {r} {name}: {dt:.2f}s, {tokens / dt:.1f} tok/s, +{mem:.0f} MB "
                  f"({time.perf_counter() - t_start:.0f}s)", flush=True)
    med = statistics.median
    sft = results["sft lora"]
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s; medians of {args.rounds} interleaved rounds")
    print("\n| variant | rows x T | step s | tokens/s | pairs/s | step time vs SFT | step peak +MB |")
    print("|---|---|---|---|---|---|---|")
    for name, res in results.items():
        print(f"| {name} | {2 * args.pairs} x {args.seq} | {med(res['time']):.2f} | {med(res['tok']):.1f} | "
              f"{args.pairs / med(res['time']):.2f} | {med(res['time']) / med(sft['time']):.2f}x | "
              f"{med(res['mem']):.0f} |")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
