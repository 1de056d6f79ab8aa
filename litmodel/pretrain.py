"""The pretraining recipe, shared by `pretrain/gpt.py` and `pretrain/llama.py`.

Read it top to bottom: `main` prepares data and tokenizer, builds the model on the Fabric
runtime, restores a run when asked, calls `fit`, then writes `out_dir/final/` as a checkpoint dir
and prints a sample. `fit` is the training loop: gradient accumulation, clipping, the warmup +
cosine schedule, periodic validation, logging and resumable checkpoints.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from litmodel import build_model
from litmodel.config import Config
from litmodel.fabric import Fabric, capture_rng_state, restore_rng_state
from litmodel.loggers import CSVLogger, TensorBoardLogger
from litmodel.training import (EvalArgs, SpeedMonitor, TrainArgs, accumulation_steps, build_optimizer,
                               cross_entropy, flops_per_token, format_eta, latest_step_dir, lr_at,
                               measure_peak_flops, memory_mb, prune_step_dirs, resolve_precision, resolve_resume,
                               save_final_checkpoint, set_lr, step_dir, validate)
from litmodel.utils import LitModelError


@dataclass
class DataArgs:
    """Where the token shards come from (``--data.*``)."""

    data_dir: Path = Path("data/stdlib")  # holds train/ and val/ token shards
    # "stdlib": the Python standard library's sources, prepared (tokenizer and shards) on first use;
    # "prepared": data_dir must already hold shards (scripts/prepare_text.py, prepare_hub.py)
    source: Literal["stdlib", "prepared"] = "stdlib"
    tokenizer_dir: Path | None = None  # default for stdlib: <data_dir>-tokenizer beside data_dir
    vocab_size: int = 4096  # vocabulary of the tokenizer trained for the stdlib corpus
    tokenizer_train_bytes: int = 8_000_000  # text the stdlib tokenizer is trained on
    val_fraction: float = 0.05
    num_workers: int | None = None  # tokenizer processes for data prep (default: up to 2)


@dataclass
class SampleArgs:
    """The short sample printed at the end (``--sample.*``)."""

    prompt: str = "def "
    max_new_tokens: int = 60
    temperature: float = 0.8
    top_k: int | None = 50


def main(fabric: Fabric, model_name: str | None, model_config: Config | None, out_dir: Path, data: DataArgs,
         train: TrainArgs, eval: EvalArgs, resume: bool | str, seed: int, compile: bool, sample: SampleArgs,
         initial_checkpoint_dir: Path | None = None) -> None:
    out_dir = Path(out_dir)
    resume_from = resolve_resume(out_dir, resume)
    fabric.seed_everything(seed)

    # 1. data and tokenizer (prepared once, on rank 0, and cached for the next run)
    tokenizer_dir = prepare_data(fabric, data)
    from litmodel.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_dir)

    # 2. the model
    if initial_checkpoint_dir is not None:  # continued pretraining: the checkpoint's architecture and weights
        from litmodel.checkpoint import load_config

        model_name, model_config = None, load_config(initial_checkpoint_dir)
    config = resolve_config(model_name, model_config, tokenizer.vocab_size)
    block_size = train.max_seq_length or config.block_size
    if block_size > config.block_size:
        raise LitModelError(f"--train.max_seq_length {block_size} exceeds the model's block_size {config.block_size}")
    accum = accumulation_steps(train, fabric.world_size)
    tokens_per_step = train.global_batch_size * block_size
    max_steps = train.max_steps or (train.max_tokens // tokens_per_step if train.max_tokens else None)
    if not max_steps:
        raise LitModelError("set --train.max_tokens or --train.max_steps (how long to train)")
    with fabric.init_module(empty_init=fabric.strategy == "fsdp"):
        model = build_model(config)
    if fabric.strategy != "fsdp":
        model.init_weights()  # FSDP initialises each rank's shards in setup instead
    fabric.print(f"model: {config.name} ({config.model_type}), {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
                 f"parameters, block_size {block_size}, vocab {config.padded_vocab_size}")
    model = fabric.setup(model)
    if initial_checkpoint_dir is not None and resume_from is None:
        from litmodel.checkpoint import MODEL_FILE, mmap_safetensors

        weights = mmap_safetensors(Path(initial_checkpoint_dir) / MODEL_FILE)
        if config.tie_embeddings:
            weights["lm_head.weight"] = weights["wte.weight"]
        fabric.load_raw(weights, model)
        fabric.print(f"initial weights from {initial_checkpoint_dir}")
    if compile:
        model = torch.compile(model)
    optimizer = fabric.setup_optimizers(build_optimizer(model, train))

    from litmodel.data import PretrainDataLoader, ValDataLoader

    train_loader = PretrainDataLoader(data.data_dir / "train", block_size, train.micro_batch_size,
                                      fabric.global_rank, fabric.world_size, seed=seed, tokenizer_dir=tokenizer_dir)
    val_loader = ValDataLoader(data.data_dir / "val", block_size, train.micro_batch_size, fabric.global_rank,
                               fabric.world_size, max_batches=eval.max_iters, tokenizer_dir=tokenizer_dir)

    # 3. resume: weights, optimizer, counters, RNG and the exact data position
    state = {"model": model, "optimizer": optimizer, "step": 0, "tokens": 0, "train_loader": {}, "rng": {}}
    if resume_from is not None:
        fabric.load(resume_from, state)
        train_loader.load_state_dict(state["train_loader"])
        restore_rng_state(state["rng"])
        fabric.print(f"resumed from {resume_from} at step {state['step']}")

    fabric.print(f"training for {max_steps} steps of {train.global_batch_size} x {block_size} tokens "
                 f"({accum} micro-batch(es) of {train.micro_batch_size} per process, {fabric.world_size} process(es), "
                 f"{fabric.precision})")
    fit(fabric, model, optimizer, train_loader, val_loader, state, train, eval, out_dir, max_steps, accum,
        tokens_per_step, block_size)

    # 4. the checkpoint dir every other script reads, and a sample from it
    save_final_checkpoint(fabric, model, config, out_dir / "final", tokenizer_dir)
    fabric.print(f"saved {out_dir / 'final'}")
    if sample.max_new_tokens > 0:  # every rank takes part: under FSDP each forward gathers the shards
        print_sample(fabric, model, tokenizer, sample)


def fit(fabric: Fabric, model, optimizer, train_loader, val_loader, state: dict, train: TrainArgs, eval: EvalArgs,
        out_dir: Path, max_steps: int, accum: int, tokens_per_step: int, block_size: int) -> None:
    config = model.config
    peak = measure_peak_flops(torch.bfloat16 if "bf16" in fabric.precision else torch.float32, fabric.device,
                              seconds=0.3)
    speed = SpeedMonitor(flops_per_token(config, block_size), peak, fabric.world_size)
    target_tokens = max_steps * tokens_per_step
    sharded = fabric.strategy == "fsdp"
    val_loss = None
    if eval.initial_validation:
        val_loss = validate(fabric, model, val_loader, eval.max_iters)
        fabric.print(f"step {state['step']}: val loss {val_loss:.4f}")
    speed.update(state["tokens"])
    model.train()
    while state["step"] < max_steps:
        lr = lr_at(state["step"], train, max_steps)
        set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=fabric.device)
        for micro_step in range(accum):
            inputs, targets = next(train_loader)
            inputs, targets = inputs.to(fabric.device), targets.to(fabric.device)
            with fabric.no_backward_sync(model, enabled=micro_step < accum - 1):
                loss = cross_entropy(model(inputs), targets)
                fabric.backward(loss / accum)
            loss_sum += loss.detach()
        grad_norm = fabric.clip_gradients(model, optimizer, max_norm=train.max_norm) if train.max_norm else None
        fabric.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["tokens"] += tokens_per_step
        speed.update(state["tokens"])
        step = state["step"]

        is_last = step == max_steps
        if step % train.log_interval == 0 or is_last:
            loss = fabric.all_reduce(loss_sum / accum, op="mean").item()
            metrics = {"step": step, "tokens": state["tokens"], "loss": loss, "lr": lr,
                       "tokens_per_sec": speed.tokens_per_sec(), "mfu": speed.mfu(),
                       "memory_mb": memory_mb(fabric.device)}
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            fabric.log_dict(metrics, step=step)
            fabric.print(f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                         f"{metrics['tokens_per_sec']:.0f} tok/s | MFU {metrics['mfu'] * 100:.1f}% | "
                         f"ETA {format_eta(speed.eta_seconds(state['tokens'], target_tokens))}")
        if (eval.interval and step % eval.interval == 0) or (is_last and eval.final_validation):
            t0 = time.perf_counter()
            val_loss = validate(fabric, model, val_loader, eval.max_iters)
            fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}, step=step)
            fabric.print(f"step {step}: val loss {val_loss:.4f}, val ppl {math.exp(min(val_loss, 50)):.2f} "
                         f"({time.perf_counter() - t0:.1f}s)")
            speed.update(state["tokens"])  # keep evaluation time out of the throughput
            speed.history = speed.history[-1:]
        if (train.save_interval and step % train.save_interval == 0) or is_last:
            state["train_loader"] = train_loader.state_dict()
            state["rng"] = capture_rng_state()
            fabric.save(step_dir(out_dir, step, sharded), state)
            if fabric.is_global_zero:
                prune_step_dirs(out_dir, keep=2)
            fabric.barrier()
        if os.environ.get("LITMODEL_KILL_AT_STEP") == str(step):  # tests: a crash at a known point
            os.kill(os.getpid(), signal.SIGKILL)
    summary = f"done: {state['step']} steps, {state['tokens']:,} tokens"
    if val_loss is not None:
        summary += f", final val loss {val_loss:.4f} (uniform baseline ln(vocab) = {math.log(config.vocab_size):.2f})"
    fabric.print(summary)


def prepare_data(fabric: Fabric, data: DataArgs) -> Path:
    """The tokenizer dir; with source=stdlib the tokenizer and shards are made on first use (rank 0)."""
    data_dir = Path(data.data_dir)
    if data.source == "prepared":
        if data.tokenizer_dir is None:
            raise LitModelError("--data.source prepared needs --data.tokenizer_dir (the tokenizer the shards were "
                                "made with)")
        if not (data_dir / "train").is_dir():
            raise LitModelError(f"no token shards in {data_dir}; prepare them with `python scripts/prepare_text.py "
                                f"--tokenizer_dir {data.tokenizer_dir} --out_dir {data_dir} --data_dir <texts>` "
                                "(or scripts/prepare_hub.py)")
        return Path(data.tokenizer_dir)
    tokenizer_dir = Path(data.tokenizer_dir or data_dir.parent / f"{data_dir.name}-tokenizer")
    if fabric.is_global_zero:
        from litmodel.data import ensure_prepared, stdlib_corpus

        if not ((tokenizer_dir / "tokenizer.json").is_file() or (tokenizer_dir / "tokenizer.model").is_file()):
            from litmodel.tokenizer import train_tokenizer

            fabric.print(f"training a {data.vocab_size}-token BPE tokenizer on the Python standard library -> "
                         f"{tokenizer_dir}")
            train_tokenizer(stdlib_corpus().files, tokenizer_dir, kind="bpe", vocab_size=data.vocab_size,
                            special_tokens=["<|endoftext|>"], max_bytes=data.tokenizer_train_bytes, overwrite=True)
        if ensure_prepared(data_dir, tokenizer_dir, stdlib_corpus, val_fraction=data.val_fraction,
                           num_workers=data.num_workers):
            fabric.print(f"prepared token shards in {data_dir}")
    fabric.barrier()
    return tokenizer_dir


def resolve_config(model_name: str | None, model_config: Config | None, vocab_size: int) -> Config:
    """The model config: a registry name or an inline config; its vocabulary fitted to the tokenizer."""
    if (model_name is None) == (model_config is None):
        raise LitModelError("give exactly one of --model_name (see `python scripts/download.py --repo_id list`) "
                            "or --model_config")
    config = Config.from_name(model_name) if model_name else model_config
    if config.vocab_size != vocab_size:
        if config.padded_vocab_size < vocab_size and model_name is not None:
            raise LitModelError(f"the tokenizer has {vocab_size} tokens but {config.name} only {config.padded_vocab_size}"
                                " embedding rows; use a matching tokenizer")
        padded = max(config.padded_vocab_size if model_name else 0, math.ceil(vocab_size / 64) * 64)
        config = config.replace(vocab_size=vocab_size, padded_vocab_size=padded)
    return config


def print_sample(fabric: Fabric, model, tokenizer, sample: SampleArgs) -> None:
    from litmodel.generate import generate

    module = getattr(model, "module", model)
    module.eval()
    ids = tokenizer.encode(sample.prompt)
    with torch.no_grad(), fabric.autocast():
        out = list(generate(module, ids, sample.max_new_tokens, temperature=sample.temperature, top_k=sample.top_k,
                            stop_tokens=[tokenizer.eos_id] if tokenizer.eos_id is not None else (), seed=0))
    module.clear_kv_cache()
    fabric.print("sample:\n" + tokenizer.decode(ids + out))


def run(model_name: str | None = None, model_config: Config | None = None, out_dir: Path = Path("out/pretrain"),
        data: DataArgs = DataArgs(), train: TrainArgs = TrainArgs(), eval: EvalArgs = EvalArgs(),
        accelerator: str = "auto", devices: int | str = 1, num_nodes: int = 1, strategy: str = "auto",
        precision: str = "auto", resume: bool | str = False, seed: int = 42, compile: bool = False,
        logger: Literal["csv", "tensorboard", "both"] = "both", sample: SampleArgs = SampleArgs(),
        initial_checkpoint_dir: Path | None = None) -> None:
    """Pretrain a model from scratch on token shards.

    Args:
        model_name: A config from the registry (e.g. pythia-160m, gpt2, TinyLlama-1.1B-Chat-v1.0).
        model_config: Or a model config written out field by field (see litmodel/config.py).
        out_dir: Where logs, resumable step-XXXXXX checkpoints and the final checkpoint dir go.
        data: The token shards and, for the stdlib default, how to make them.
        train: Batch sizes, token budget, learning-rate schedule, clipping, checkpoint interval.
        eval: Validation interval and size.
        accelerator: cpu, cuda or auto.
        devices: Processes per node (GPUs, or CPU processes).
        num_nodes: Nodes; several nodes are started by torchrun or srun (see README).
        strategy: auto, single, ddp or fsdp.
        precision: 32-true, bf16-mixed, bf16-true, 16-mixed, 16-true, or auto (bf16-mixed where the hardware runs
            bf16 fast, else 32-true).
        resume: auto (the latest step checkpoint in out_dir), a step checkpoint path, or false (refuses an out_dir
            that holds another run).
        seed: Seed for initialisation and data order.
        compile: torch.compile the model.
        logger: csv, tensorboard or both (under out_dir).
        sample: The sample printed at the end.
        initial_checkpoint_dir: Start from this checkpoint dir's architecture and weights (continued pretraining).
    """
    out_dir = Path(out_dir)
    resolve_resume(out_dir, resume)  # refuse to overwrite another run before any process starts
    loggers = []
    if logger in ("csv", "both"):
        loggers.append(CSVLogger(out_dir, name="logs"))
    if logger in ("tensorboard", "both"):
        loggers.append(TensorBoardLogger(out_dir, name="tensorboard"))
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                    precision=resolve_precision(precision, accelerator), loggers=loggers,
                    activation_checkpointing=train.activation_checkpointing)
    fabric.launch(main, model_name, model_config, out_dir, data, train, eval, resume, seed, compile, sample,
                  initial_checkpoint_dir)


def setup(family: str, default_config: Path | None, argv: list[str] | None = None, description: str = "") -> None:
    """Parse ``--config x.yaml`` and flags (``default_config`` fills what they leave out), then `run`."""
    from litmodel.cli import parse_function_args

    defaults = [str(default_config)] if default_config is not None and Path(default_config).is_file() else None
    kwargs = parse_function_args(run, argv, description, defaults, instantiate=True)
    name, config = kwargs.get("model_name"), kwargs.get("model_config")
    config = Config.from_name(name) if name else config
    if config is not None and config.family != family:
        raise LitModelError(f"{config.name} is a {config.family}-family model; use pretrain/{config.family}.py for it")
    run(**kwargs)
