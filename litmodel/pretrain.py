"""The pretraining recipe, shared by `pretrain/gpt.py` and `pretrain/llama.py`.

Read it top to bottom: `main` prepares data and tokenizer, builds the model on the Fabric
runtime, calls the training loop (`litmodel.training.fit`: accumulation, clipping, the warmup +
cosine schedule, validation, logging, resumable checkpoints, resume), then writes `out_dir/final/`
as a checkpoint dir, prints a sample and draws ``out_dir/loss.png``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from litmodel import build_model
from litmodel.config import Config
from litmodel.fabric import Fabric
from litmodel.loggers import CSVLogger, TensorBoardLogger
from litmodel.plot import write_loss_plot
from litmodel.flops import train_flops_per_token
from litmodel.precision import resolve_precision
from litmodel.training import (EvalArgs, TrainArgs, accumulation_steps, build_optimizer, fit, language_model_loss,
                               resolve_resume, save_final_checkpoint)
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
    evaluators = []
    if eval.tasks:  # lm-eval tasks at each validation; names are checked now, before any training
        from litmodel.evaluation import harness_evaluator  # deferred: lm-eval is an optional extra, slow to import

        evaluators.append(harness_evaluator(eval.tasks, tokenizer, eval.limit, eval.include_path,
                                            max_length=train.max_seq_length, batch_size=train.micro_batch_size))

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
        from litmodel.checkpoint import MODEL_FILE
        from litmodel.safetensors_io import mmap_safetensors

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

    fabric.print(f"training for {max_steps} steps of {train.global_batch_size} x {block_size} tokens "
                 f"({accum} micro-batch(es) of {train.micro_batch_size} per process, {fabric.world_size} process(es), "
                 f"{fabric.precision})")
    # 3. the loop (litmodel/training.py): next-token loss per target token; resumes weights, optimizer,
    #    counters, RNG and the exact data position from resume_from
    fit(fabric, model, optimizer, train_loader, train=train, eval=eval, out_dir=out_dir, max_steps=max_steps,
        val_loader=val_loader, evaluators=evaluators, resume_from=resume_from,
        loss_fn=language_model_loss(train.router_aux_loss_coef),
        flops_per_token=train_flops_per_token(model, config, block_size))
    fabric.print(f"(a uniform guess scores ln(vocab) = {math.log(config.vocab_size):.2f})")

    # 4. the checkpoint dir every other script reads, a sample from it, the loss curve
    save_final_checkpoint(fabric, model, config, out_dir / "final", tokenizer_dir)
    fabric.print(f"saved {out_dir / 'final'}")
    if sample.max_new_tokens > 0:  # every rank takes part: under FSDP each forward gathers the shards
        print_sample(fabric, model, tokenizer, sample)
    write_loss_plot(fabric, out_dir)


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
            from litmodel.tokenizer_training import train_tokenizer

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
        eval: Validation interval and size; lm-eval tasks run at each validation (--eval.tasks, --eval.limit).
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
    if eval.tasks:
        from litmodel.evaluation import check_tasks  # deferred: lm-eval is an optional extra, slow to import

        check_tasks(eval.tasks, eval.limit, eval.include_path)
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
