r"""Qwen3 dense vs Qwen3-MoE: pretraining step and batch-1 decode, litmodel vs transformers, one process.

    python benchmarks/families.py                      # 3 interleaved rounds, 2 layers, 1 thread: ~4 minutes here
    python benchmarks/families.py --rounds 5 --layers 28 --vocab 151936   # the full Qwen3-0.6B shape

Shapes: Qwen3-0.6B's width (1024), heads (16 q, 8 kv, head_dim 128, q/k norms) and MLP (3072), with
``--layers`` layers and a ``--vocab`` vocabulary (reduced by default so that a round fits the 2-core
CPU in seconds). The MoE model has the same attention and 8 experts of 1536 routed top-2: the same
*active* MLP parameters per token (2 x 1536 = 3072) as the dense model, 4x its MLP parameters in all.
transformers' Qwen3ForCausalLM / Qwen3MoeForCausalLM get the very same weights (converted with
`litmodel.hf_names.lit_to_hf_plan`). fp32, random weights.

step: forward + backward + AdamW step on ``--batch`` x ``--seq`` tokens (median over rounds, one
warm-up step each). decode: ``--new`` greedy tokens after a 16-token prompt, prefill included.
Every round runs every variant once, so load from other jobs on the machine hits all alike.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from litmodel import Config, build_model
from litmodel.hf_names import lit_to_hf_plan
from litmodel.generate import generate_tokens
from litmodel.utils import num_parameters, tune_allocator


def configs(layers: int, vocab: int) -> dict[str, Config]:
    dense = Config.from_name("Qwen3-0.6B").replace(name="qwen3-dense", n_layer=layers, vocab_size=vocab,
                                                  padded_vocab_size=vocab, block_size=1024)
    moe = dense.replace(name="qwen3-moe", model_type="qwen3_moe", n_expert=8, n_expert_per_token=2,
                        moe_intermediate_size=1536, norm_topk_prob=True)
    return {"dense": dense, "moe": moe}


def hf_twin(lit: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    import transformers

    hf_dict = {k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type")}
    hf_cls = transformers.Qwen3MoeForCausalLM if cfg.n_expert else transformers.Qwen3ForCausalLM
    hf_cfg = (transformers.Qwen3MoeConfig if cfg.n_expert else transformers.Qwen3Config)(**hf_dict)
    hf = hf_cls(hf_cfg)
    sd = lit.state_dict()
    state = {k: fn(*[sd[s] for s in srcs]).clone() for k, (srcs, fn) in lit_to_hf_plan(cfg).items()
             if ".experts." not in k}
    for i in range(cfg.n_layer if cfg.n_expert else 0):  # transformers 5 holds experts stacked, like litmodel
        state[f"model.layers.{i}.mlp.experts.gate_up_proj"] = sd[f"blocks.{i}.mlp.fc.weight"].clone()
        state[f"model.layers.{i}.mlp.experts.down_proj"] = sd[f"blocks.{i}.mlp.proj.weight"].clone()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    hf.tie_weights()
    return hf


def step_seconds(model, opt, batch: torch.Tensor, hf: bool) -> float:
    t0 = time.perf_counter()
    out = model(batch[:, :-1])
    logits = out.logits if hf else out
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


@torch.no_grad()
def decode_tps(model, prompt: torch.Tensor, new: int, hf: bool) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    if hf:
        ids = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        tokens = ids[0, prompt.size(1):].tolist()
    else:
        tokens = [int(t[0]) for t in generate_tokens(model, prompt, new, temperature=0.0)]
    return new / (time.perf_counter() - t0), tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new", type=int, default=16)
    # 1 thread by default: on a shared 2-core machine OpenMP teams of 2 stall behind other jobs
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()
    torch.manual_seed(0)
    models, opts = {}, {}
    for kind, cfg in configs(args.layers, args.vocab).items():
        lit = build_model(cfg)
        lit.init_weights()
        hf = hf_twin(lit, cfg)
        n = num_parameters(lit)
        print(f"{kind}: {n / 1e6:.1f}M parameters ({cfg.n_layer} layers, vocab {cfg.vocab_size})", flush=True)
        for name, m in ((f"lit-{kind}", lit), (f"hf-{kind}", hf)):
            models[name] = m
            opts[name] = torch.optim.AdamW(m.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    prompt = torch.randint(0, args.vocab, (1, 16), generator=g)
    names = list(models)
    steps = {n: [] for n in names}
    tps = {n: [] for n in names}
    for name in names:  # warm-up (allocations, one-time setup)
        step_seconds(models[name].train(), opts[name], batch, name.startswith("hf"))
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            hf = name.startswith("hf")
            steps[name].append(step_seconds(models[name].train(), opts[name], batch, hf))
            rate, _ = decode_tps(models[name].eval(), prompt, args.new, hf)
            tps[name].append(rate)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {steps[n][-1]:.2f}s {tps[n][-1]:.1f}tok/s"
                                                       for n in names), flush=True)
    # the two implementations agree on the tokens (same weights, greedy)
    for kind in ("dense", "moe"):
        a = decode_tps(models[f"lit-{kind}"].eval(), prompt, 8, False)[1]
        b = decode_tps(models[f"hf-{kind}"].eval(), prompt, 8, True)[1]
        print(f"{kind}: greedy tokens {'agree' if a == b else 'DIFFER'} ({a} vs {b})")
    med = {n: (statistics.median(steps[n]), statistics.median(tps[n])) for n in names}
    tokens = args.batch * args.seq
    print(f"\n{datetime.date.today()}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"torch {torch.__version__}, medians of {args.rounds} interleaved rounds")
    print("| model | impl | step s | train tokens/s | decode tokens/s |")
    print("|---|---|---|---|---|")
    for n in names:
        impl, kind = n.split("-")
        print(f"| {kind} | {'litmodel' if impl == 'lit' else 'transformers'} | {med[n][0]:.2f} | "
              f"{tokens / med[n][0]:.0f} | {med[n][1]:.1f} |")
    for impl in ("lit", "hf"):
        ratio = med[f"{impl}-moe"][0] / med[f"{impl}-dense"][0]
        print(f"{impl}: MoE step / dense step = {ratio:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
