"""Sweep the default pretraining recipe (configs/pretrain/default.yaml) at a fixed FLOP budget.

    python benchmarks/sweep_default.py                      # the full budget: the default's 0.5M tokens
    python benchmarks/sweep_default.py --budget 0.25 --parallel 3 --threads 1

Every variant trains `pretrain/gpt.py` (32-true, the default's data and 4096-token vocabulary) for the
same number of training FLOPs (`litmodel.flops.train_flops_per_token` x tokens) as the default recipe
spends on its 0.5M tokens, times ``--budget``; warmup keeps the default's fraction of the steps. The final
validation loss does not depend on how busy the machine is (seeded, deterministic), so variants are
compared on it; tokens/s and wall seconds are printed as context only (noisy on a shared machine). The
vocabulary is not swept: loss per token is not comparable across tokenizers.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from litmodel import Config, build_model
from litmodel.flops import train_flops_per_token

ROOT = Path(__file__).resolve().parents[1]

DEFAULT = ROOT / "configs" / "pretrain" / "default.yaml"
DEFAULT_TOKENS, DEFAULT_WARMUP_FRACTION = 500_000, 20 / 122

# name -> (model_config overrides, train overrides)
VARIANTS = {
    "default (4x256, batch 16, lr 3e-3)": ({}, {}),
    "batch 8, lr 3e-3": ({}, {"global_batch_size": 8, "micro_batch_size": 8}),
    "batch 8, lr 6e-3": ({}, {"global_batch_size": 8, "micro_batch_size": 8, "lr": 6e-3}),
    "batch 16, lr 6e-3": ({}, {"lr": 6e-3}),
    "4x192, batch 8, lr 6e-3": ({"n_embd": 192}, {"global_batch_size": 8, "micro_batch_size": 8, "lr": 6e-3}),
    "6x192, batch 8, lr 6e-3": ({"n_embd": 192, "n_layer": 6},
                                {"global_batch_size": 8, "micro_batch_size": 8, "lr": 6e-3}),
}


def default_config() -> Config:
    import yaml

    return Config(**yaml.safe_load(DEFAULT.read_text())["model_config"])


def flops_per_token(config: Config) -> float:
    with torch.device("meta"):
        model = build_model(config)
    return train_flops_per_token(model, config, config.block_size)


def run(name: str, model_over: dict, train_over: dict, budget_flops: float, out_root: Path, threads: int) -> dict:
    config = default_config().replace(**model_over)
    batch = train_over.get("global_batch_size", 16)
    tokens_per_step = batch * config.block_size
    steps = int(budget_flops / flops_per_token(config) // tokens_per_step)
    out = out_root / name.split(" (")[0].replace(" ", "_").replace(",", "")
    args = ["--config", DEFAULT, "--precision", "32-true", "--out_dir", out, "--logger", "csv",
            "--train.max_steps", steps, "--train.max_tokens", "null",
            "--train.warmup_steps", max(1, round(steps * DEFAULT_WARMUP_FRACTION)), "--train.save_interval", "null",
            "--eval.interval", 0, "--sample.max_new_tokens", 0]
    args += [x for k, v in model_over.items() for x in (f"--model_config.{k}", v)]
    args += [x for k, v in train_over.items() for x in (f"--train.{k}", v)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "pretrain" / "gpt.py"), *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return {"name": name, "error": r.stderr.strip().splitlines()[-1]}
    with open(out / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val = [float(x["val_loss"]) for x in rows if x.get("val_loss")][-1]
    rates = sorted(float(x["tokens_per_sec"]) for x in rows if x.get("tokens_per_sec") not in (None, "", "nan"))
    return {"name": name, "params": sum(p.numel() for p in build_model(config).parameters()) / 1e6,
            "steps": steps, "tokens": steps * tokens_per_step, "val_loss": val,
            "tok_s": rates[len(rates) // 2] if rates else float("nan"), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=1.0, help="fraction of the default's FLOPs (0.5M tokens)")
    parser.add_argument("--parallel", type=int, default=1, help="variants run at once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--out_dir", type=Path, default=ROOT / "out" / "sweep_default")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    a = parser.parse_args()
    budget = a.budget * DEFAULT_TOKENS * flops_per_token(default_config())
    print(f"budget: {budget / 1e12:.2f} TFLOP of training ({a.budget:g} x the default's 0.5M tokens), 32-true, "
          f"{a.threads} thread(s) per run, {a.parallel} run(s) at once", flush=True)
    variants = {k: v for k, v in VARIANTS.items() if not a.only or k in a.only}
    with ThreadPoolExecutor(a.parallel) as pool:
        results = list(pool.map(lambda kv: run(kv[0], *kv[1], budget, a.out_dir, a.threads), variants.items()))
    print("\n| variant | params | steps | tokens | final val loss | tokens/s (median) | wall s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error']} |")
            continue
        print(f"| {r['name']} | {r['params']:.2f}M | {r['steps']} | {r['tokens']:,} | {r['val_loss']:.3f} | "
              f"{r['tok_s']:.0f} | {r['wall']:.0f} |")


if __name__ == "__main__":
    main()
