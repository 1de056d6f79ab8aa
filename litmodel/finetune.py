"""The finetuning recipe (LoRA and full), shared by `finetune/lora.py` and `finetune/full.py`.

Read it top to bottom: `finetune_lora` / `finetune_full` are the command-line entry points (their
arguments are the flags); they check the inputs before any process starts or any file is written,
then `fabric.launch(main, ...)`. `main` loads the checkpoint dir and the data, applies LoRA (or keeps
every weight trainable), calls the training loop (`litmodel.training.fit`: loss per answer token over
the global batch, accumulation, clipping, warmup + cosine schedule, validation with a greedy sample
answer, logging, resumable checkpoints, resume), then writes ``out_dir/final/`` and ``loss.png``.
The steps of `main` are functions (`prepare_run`, `setup_data`, `build_finetune_model`, `make_loaders`,
`resume_hooks`, `write_final`) that the DPO recipe (`litmodel/finetune_dpo.py`) calls too.

Outputs (``out_dir``):

* ``final/``: a checkpoint dir. LoRA: ``lora.safetensors`` + ``lora_config.yaml`` (which also names
  ``base_checkpoint_dir``) and, unless ``--merge false``, the merged ``model.safetensors`` +
  ``model_config.yaml`` + tokenizer files, so generate/*.py and scripts/convert_lit_checkpoint.py
  use it as is. Full: ``model.safetensors`` + ``model_config.yaml`` + tokenizer files.
* ``step-XXXXXX.pt`` (or a ``step-XXXXXX/`` DCP dir for full finetuning under FSDP): resumable state.
  LoRA saves only the trainable (LoRA) weights, gathered, plus the optimizer state, counters, RNG
  and data position, so it is small and resumes on any number of processes.
* ``logs/metrics.csv`` (and/or ``tensorboard/``), ``samples.txt`` (the sample answers).
"""

from __future__ import annotations

import dataclasses

import contextlib
import math
import shutil
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal, Optional, Union

import torch
import torch.nn as nn

from litmodel.checkpoint import (CONFIG_FILE, MODEL_FILE, check_checkpoint_dir, load_config, load_model,
                                 model_state_for_saving)
from litmodel.data.sft import IGNORE_INDEX, JSON, JSONData
from litmodel.fabric import Fabric
from litmodel.flops import train_flops_per_token
from litmodel.nf4 import load_model_nf4, nf4_model_nbytes, round_trip_nf4_
from litmodel.lora import (LORA_CONFIG_FILE, LORA_WEIGHTS_FILE, LoRAConfig, apply_lora, load_lora,
                           mark_only_lora_as_trainable, merge_lora)
from litmodel.plot import write_loss_plot
from litmodel.precision import param_dtype, resolve_precision
from litmodel.quantize import TRAINING_QUANTIZE_MODES
from litmodel.safetensors_io import SAFETENSORS_DTYPES, read_safetensors_header, save_safetensors
from litmodel.sharded_checkpoint import fill_from_checkpoint
from litmodel.training import (EvalArgs, TrainArgs, accumulation_steps, build_optimizer, fit, language_model_loss,
                               resolve_resume, save_final_checkpoint)
from litmodel.atomic import atomic_dir
from litmodel.utils import LitModelError



# ---- argument groups -----------------------------------------------------------------------------
@dataclass
class FinetuneTrainArgs(TrainArgs):
    """Optimisation hyperparameters (``--train.*``).

    Args:
        global_batch_size: Sequences per optimizer step, over all processes (accumulation fills the gap).
        micro_batch_size: Sequences per forward/backward on one process.
        max_tokens: Pretraining only; finetuning runs epochs (leave unset).
        max_steps: Stop after this many optimizer steps (the LR schedule still spans the epochs when they are set,
            so a run stopped here continues unchanged with --resume auto); alone, it sets the schedule length.
        epochs: Passes over the training data; sets the length of the LR schedule.
        max_seq_length: Longer examples are truncated (the count is reported); default: the model's block_size.
        lr: Peak learning rate (AdamW).
        min_lr: The cosine schedule decays to this at the end of the schedule.
        warmup_steps: Linear warmup steps.
        weight_decay: AdamW weight decay on matrices (not norms, biases, embeddings).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        max_norm: Clip the global gradient norm to this; null disables clipping.
        activation_checkpointing: Recompute each transformer block in the backward pass (less memory, ~30% more
            compute).
        log_interval: Optimizer steps between log lines.
        save_interval: Optimizer steps between resumable checkpoints (the last step is always saved).
    """


@dataclass
class FinetuneEvalArgs(EvalArgs):
    """Validation (``--eval.*``): loss on the validation split and a greedy sample answer.

    Args:
        interval: Optimizer steps between validations.
        max_iters: Validation batches per validation.
        initial_validation: Also validate before the first step.
        final_validation: Validate after the last step.
        sample_prompt: Prompt of the sample answer printed at each validation (formatted like the training data);
            default: the first validation record's prompt, shown with its expected answer.
        max_new_tokens: Length limit of the sample answer; 0 disables sampling.
        tasks: lm-evaluation-harness tasks run at each validation, e.g. arc_easy,piqa (needs the [eval] extra);
            their metrics are logged next to the validation loss.
        limit: Examples per task in those runs (a fraction if below 1; null: all of them).
        include_path: A directory of your own task YAML files for --eval.tasks.
    """

    interval: int = 50
    max_iters: int = 50
    sample_prompt: Optional[str] = None
    max_new_tokens: int = 64


@dataclass
class LoRAArgs:
    """LoRA hyperparameters (``--lora.*``).

    Args:
        r: Rank of the low-rank update B @ A.
        alpha: The update is scaled by alpha / r.
        dropout: Dropout on the input of the LoRA branch.
        targets: Comma-separated layers to adapt: query, key, value (slices of the fused qkv), projection
            (attention output), mlp (both MLP matrices), head (output head).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: str = "query,value"

    def to_config(self) -> LoRAConfig:
        return LoRAConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets)


def lora_train_defaults() -> FinetuneTrainArgs:
    return FinetuneTrainArgs(global_batch_size=16, micro_batch_size=1, epochs=1, lr=3e-4, min_lr=0.0, warmup_steps=10,
                     weight_decay=0.0, save_interval=200)


def full_train_defaults() -> FinetuneTrainArgs:
    return FinetuneTrainArgs(global_batch_size=16, micro_batch_size=1, epochs=1, lr=2e-5, min_lr=0.0, warmup_steps=10,
                     weight_decay=0.02, save_interval=200)


@dataclass
class RunSpec:
    """Everything `main` needs, in one picklable object (sent to spawned workers)."""

    method: Literal["lora", "full"]
    checkpoint_dir: Path
    data: JSONData
    out_dir: Path
    train: TrainArgs
    eval: FinetuneEvalArgs
    resume: Union[bool, str]
    seed: int
    lora: Optional[LoRAConfig] = None
    merge: bool = True
    quantize: Optional[str] = None
    hparams: dict = field(default_factory=dict)


# ---- entry points (their arguments are the command-line flags) ------------------------------------
_COMMON_DOC = """
        checkpoint_dir: The model to finetune: a checkpoint dir (checkpoints/<org>/<name>) written by
            scripts/download.py, scripts/convert_hf_checkpoint.py or pretraining.
        data: The instruction/chat data: --data JSON --data.json_path FILE (.json list or .jsonl), with
            --data.val_split_fraction, --data.prompt_style chat|alpaca (default: chat when the tokenizer has a chat
            template), --data.packed (pack examples into full rows), --data.seed (validation split).
        out_dir: Where logs, resumable step-XXXXXX checkpoints and the final checkpoint dir (out_dir/final) go.
        precision: 32-true, bf16-mixed, bf16-true, 16-mixed, 16-true, or auto (bf16-mixed where the hardware runs
            bf16 fast, else 32-true).
        devices: Processes per node (GPUs, or CPU processes).
        num_nodes: Nodes; several nodes are started by torchrun or srun.
        strategy: auto (single or ddp), single, ddp or fsdp.
        accelerator: cpu, cuda or auto.
        resume: auto (the latest step checkpoint in out_dir), a step checkpoint path, or false (refuses an out_dir
            that already holds a run).
        seed: Seed for initialisation, dropout and data order.
        logger: csv, tensorboard or both (under out_dir).
        train: Batch sizes, epochs / max_steps (max_steps stops early; the LR schedule spans the epochs when they are
            set, so a run stopped by max_steps continues unchanged with --resume auto), learning rate, warmup,
            clipping, activation checkpointing, checkpoint interval. max_seq_length (default: the model's
            block_size) truncates longer examples.
        eval: Validation interval and size, and the greedy sample answer printed at each validation."""


def finetune_lora(checkpoint_dir: Path, data: Optional[JSONData] = None, out_dir: Path = Path("out/finetune/lora"),
                  precision: str = "auto", devices: Union[int, str] = 1, num_nodes: int = 1, strategy: str = "auto",
                  accelerator: str = "auto", resume: Union[bool, str] = False, seed: int = 42,
                  logger: Literal["csv", "tensorboard", "both"] = "csv",
                  train: FinetuneTrainArgs = lora_train_defaults(), eval: FinetuneEvalArgs = FinetuneEvalArgs(),
                  lora: LoRAArgs = LoRAArgs(), merge: bool = True,
                  quantize: Optional[str] = None) -> Path:
    _run("lora", **{k: v for k, v in locals().items()})
    return Path(out_dir) / "final"


finetune_lora.__doc__ = """Finetune a model with LoRA: the base weights stay frozen, low-rank updates are learned.

    Args:""" + _COMMON_DOC + """
        lora: LoRA rank (r), alpha, dropout and targets (comma-separated: query, key, value, projection, mlp, head).
        merge: Also write the merged model into out_dir/final (model.safetensors + model_config.yaml + tokenizer)
            so the generate scripts use it as is; false keeps only the adapter and a pointer to the base model
            (merge later with scripts/merge_lora.py).
        quantize: nf4 (alias bnb.nf4): QLoRA. The frozen base weights of the transformer blocks are stored in 4 bits
            (NF4 with double-quantized scales, torchao), quantized while loading; LoRA, norms, embedding and head stay
            in the training precision. About 1/7 of the fp32 memory for the quantized weights; CPU and GPU; 1 process,
            DDP or FSDP. out_dir/final's merged model is the dequantized base + the update, in the base's dtype.
"""


def finetune_full(checkpoint_dir: Path, data: Optional[JSONData] = None, out_dir: Path = Path("out/finetune/full"),
                  precision: str = "auto", devices: Union[int, str] = 1, num_nodes: int = 1, strategy: str = "auto",
                  accelerator: str = "auto", resume: Union[bool, str] = False, seed: int = 42,
                  logger: Literal["csv", "tensorboard", "both"] = "csv",
                  train: FinetuneTrainArgs = full_train_defaults(), eval: FinetuneEvalArgs = FinetuneEvalArgs(),
                  quantize: Optional[str] = None) -> Path:
    if quantize is not None:
        raise LitModelError(f"--quantize {quantize} freezes the base weights in 4 bits, which only LoRA can train on "
                            "(QLoRA); use finetune/lora.py --quantize nf4, or drop --quantize for full finetuning")
    _run("full", **{k: v for k, v in locals().items() if k != "quantize"})
    return Path(out_dir) / "final"


finetune_full.__doc__ = """Finetune every weight of a model.

    Args:""" + _COMMON_DOC + """
        quantize: Not available: a quantized base cannot be finetuned in full (use finetune/lora.py --quantize nf4).
"""


def _run(method: str, checkpoint_dir: Path, data: Optional[JSONData], out_dir: Path, precision: str,
         devices: Union[int, str], num_nodes: int, strategy: str, accelerator: str, resume: Union[bool, str],
         seed: int, logger: str, train: TrainArgs, eval: FinetuneEvalArgs, lora: Optional[LoRAArgs] = None,
         merge: bool = True, quantize: Optional[str] = None) -> None:
    """Check every input that can be checked here (so a mistake costs no process start and writes nothing),
    build the Fabric and launch `main`."""
    from litmodel.data.records import load_records
    from litmodel.tokenizer import load_tokenizer

    out_dir = Path(out_dir)
    resolve_resume(out_dir, resume)  # refuse to overwrite another run
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    load_tokenizer(checkpoint_dir)
    config = load_config(checkpoint_dir)
    if data is None:
        raise LitModelError("no finetuning data; pass --data JSON --data.json_path FILE (.json or .jsonl)")
    load_records(data.json_path)  # missing file / keys, empty dataset: one line naming the record and key
    if eval.tasks:
        from litmodel.evaluation import check_tasks  # deferred: lm-eval is an optional extra, slow to import

        check_tasks(eval.tasks, eval.limit, eval.include_path)
    lora_config = lora.to_config() if method == "lora" else None
    if quantize is not None:
        quantize = _check_quantize(quantize)
    fabric, hparams = prepare_run(checkpoint_dir, config, data, out_dir, precision, devices, num_nodes, strategy,
                                  accelerator, seed, logger, train, eval)
    hparams["method"] = method
    if lora_config is not None:
        hparams.update({f"lora.{k}": str(v) for k, v in lora_config.to_dict().items()}, merge=merge,
                       quantize=quantize)
    spec = RunSpec(method, checkpoint_dir, data, out_dir, train, eval, resume, seed, lora_config, merge, quantize,
                   hparams)
    fabric.launch(main, spec)


def prepare_run(checkpoint_dir: Path, config, data, out_dir: Path, precision: str, devices: Union[int, str],
                num_nodes: int, strategy: str, accelerator: str, seed: int, logger: str, train: TrainArgs,
                eval: EvalArgs) -> tuple[Fabric, dict]:
    """What every finetuning recipe (SFT, DPO) checks and builds before launching: the run length and sequence
    length flags, the precision, the loggers, the Fabric, the batch split; returns it and the common hparams."""
    from litmodel.loggers import CSVLogger, TensorBoardLogger

    if train.max_tokens is not None:
        raise LitModelError("--train.max_tokens is a pretraining budget; finetuning runs --train.epochs "
                            "(and stops early at --train.max_steps)")
    if not train.epochs and not train.max_steps:
        raise LitModelError("set --train.epochs or --train.max_steps (how long to finetune)")
    if train.max_seq_length is not None and train.max_seq_length > config.block_size:
        raise LitModelError(f"--train.max_seq_length {train.max_seq_length} exceeds the model's block_size "
                            f"{config.block_size}; use at most {config.block_size}")
    precision = resolve_precision(precision, accelerator)
    loggers = []
    if logger in ("csv", "both"):
        loggers.append(CSVLogger(out_dir, name="logs"))
    if logger in ("tensorboard", "both"):
        loggers.append(TensorBoardLogger(out_dir, name="tensorboard"))
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                    precision=precision, loggers=loggers, activation_checkpointing=train.activation_checkpointing)
    accumulation_steps(train, fabric.world_size)  # a global batch that does not divide fails here
    hparams = dict(checkpoint_dir=str(checkpoint_dir), data=type(data).__name__,
                   **{f"data.{k}": str(v) for k, v in vars(data).items() if not k.endswith("_dataset")
                      and k not in ("tokenizer", "max_seq_length")},
                   out_dir=str(out_dir), precision=precision, devices=fabric.devices, num_nodes=num_nodes,
                   strategy=fabric.strategy, seed=seed, **{f"train.{k}": v for k, v in asdict(train).items()},
                   **{f"eval.{k}": v for k, v in asdict(eval).items()})
    return fabric, hparams


def _check_quantize(quantize: str) -> str:
    """The quantization mode of a --quantize value (one line for an unknown one or a missing torchao)."""
    import importlib.util

    if quantize not in TRAINING_QUANTIZE_MODES:
        raise LitModelError(f"unknown --quantize {quantize!r}; choose nf4 (alias bnb.nf4) or leave it out")
    if importlib.util.find_spec("torchao") is None:
        raise LitModelError(f"--quantize {quantize} needs torchao: pip install torchao (the quant extra)")
    return TRAINING_QUANTIZE_MODES[quantize]


# ---- the recipe ----------------------------------------------------------------------------------
def main(fabric: Fabric, spec: RunSpec) -> None:
    train, out_dir = spec.train, Path(spec.out_dir)
    resume_from = resolve_resume(out_dir, spec.resume)
    fabric.seed_everything(spec.seed)

    # 1. tokenizer and data
    tokenizer, config, max_seq_length = setup_data(fabric, spec.checkpoint_dir, spec.data, train)
    harness = None
    if spec.eval.tasks:  # lm-eval tasks at each validation; names were checked before launching
        from litmodel.evaluation import harness_evaluator  # deferred: lm-eval is an optional extra, slow to import

        harness = harness_evaluator(spec.eval.tasks, tokenizer, spec.eval.limit, spec.eval.include_path,
                                    max_length=max_seq_length, batch_size=train.micro_batch_size)
    data = spec.data

    # 2. the model: LoRA on the frozen base (optionally 4-bit) or every weight trainable, set up on the devices
    model = build_finetune_model(fabric, spec.checkpoint_dir, spec.method, spec.lora, spec.quantize, max_seq_length)
    optimizer = fabric.setup_optimizers(build_optimizer(model, train))

    # 3. data loaders (seeded, resumable), schedule length
    train_loader, val_loader, accum, schedule_steps, max_steps = make_loaders(fabric, data, train)

    # 4. what a resumable checkpoint holds: LoRA only the trainable weights and their optimizer state, gathered
    #    (small, and independent of the number of processes); full finetuning the model and optimizer
    lora = dataclasses.replace(spec.lora, quantize=spec.quantize) if spec.lora else None  # QLoRA resumes/merges as QLoRA
    state, save_fn, load_fn = resume_hooks(fabric, model, optimizer, spec.method, lora)
    if fabric.is_global_zero and resume_from is None:
        for logger in fabric.loggers:
            logger.log_hyperparams(spec.hparams)
    evaluators = []
    if harness is not None:
        evaluators.append(harness)
    if spec.eval.max_new_tokens > 0:  # a greedy answer to a fixed prompt at each validation
        sample = sample_prompt(data, spec.eval.sample_prompt)
        evaluators.append(lambda fabric, model, step: print_sample(fabric, model, tokenizer, sample,
                                                                   spec.eval.max_new_tokens, step, out_dir))
    fabric.print(f"training for {max_steps} steps (schedule: {schedule_steps} steps, "
                 f"{len(train_loader) / accum:.1f} per epoch) of {train.global_batch_size} sequences "
                 f"({accum} micro-batch(es) of {train.micro_batch_size} per process, {fabric.world_size} process(es))")

    # 5. the loop (litmodel/training.py): loss per answer token over the global batch
    seq_len = data.max_seq_length if data.packed else _mean_length(data)
    fit(fabric, model, optimizer, train_loader, train=train, eval=spec.eval, out_dir=out_dir, max_steps=max_steps,
        schedule_steps=schedule_steps, val_loader=val_loader, evaluators=evaluators, state=state,
        loss_fn=language_model_loss(train.router_aux_loss_coef),
        resume_from=resume_from, save_fn=save_fn, load_fn=load_fn,
        flops_per_token=train_flops_per_token(model, config, seq_len))

    # 6. out_dir/final: the checkpoint dir every other script reads; the loss curve
    write_final(fabric, model, spec.method, lora, spec.checkpoint_dir, out_dir, spec.merge)
    write_loss_plot(fabric, out_dir)


# ---- pieces of every finetuning recipe (SFT here, DPO in litmodel/finetune_dpo.py) -------------------
def setup_data(fabric: Fabric, checkpoint_dir: Path, data, train: TrainArgs, cut: str = "") -> tuple:
    """(tokenizer, config, max_seq_length): the checkpoint's tokenizer and config, and ``data`` set up (read,
    split, tokenized) with its one-line description and the count of truncated examples printed. ``cut``: how
    they were truncated, for the note."""
    from litmodel.tokenizer import Tokenizer

    tokenizer = Tokenizer(checkpoint_dir)
    config = load_config(checkpoint_dir)
    max_seq_length = train.max_seq_length or config.block_size
    data.setup(tokenizer, max_seq_length)
    fabric.print(data.describe())
    truncated = data.stats["train"]["truncated"] + (data.stats["val"] or {}).get("truncated", 0)
    if truncated:
        fabric.print(f"note: {truncated} example(s) longer than max_seq_length={max_seq_length} were truncated{cut} "
                     "(raise --train.max_seq_length to keep them whole)")
    return tokenizer, config, max_seq_length


def make_loaders(fabric: Fabric, data, train: TrainArgs) -> tuple:
    """(train_loader, val_loader or None, accumulation steps, schedule steps, max steps): seeded, resumable loaders
    of ``train.micro_batch_size`` and the run length in optimizer steps (epochs, capped by max_steps)."""
    train_loader = fabric.setup_dataloaders(data.train_dataloader(train.micro_batch_size))
    val_loader = data.val_dataloader(train.micro_batch_size)
    val_loader = fabric.setup_dataloaders(val_loader) if val_loader is not None else None
    accum = accumulation_steps(train, fabric.world_size)
    schedule_steps = math.ceil(train.epochs * len(train_loader) / accum) if train.epochs else train.max_steps
    max_steps = min(schedule_steps, train.max_steps) if train.max_steps else schedule_steps
    return train_loader, val_loader, accum, schedule_steps, max_steps


def build_finetune_model(fabric: Fabric, checkpoint_dir: Path, method: str, lora: Optional[LoRAConfig] = None,
                         quantize: Optional[str] = None, max_seq_length: Optional[int] = None):
    """The set-up model to train: the checkpoint with LoRA applied and only LoRA trainable (``method="lora"``;
    ``quantize="nf4"`` stores the frozen base in NF4, quantized while loading), or with every weight trainable (``"full"``).
    Memory-mapped; under FSDP built on meta, then each rank reads only its shards. LoRA gets the same init
    everywhere (seeded)."""
    config = load_config(checkpoint_dir)
    dtype = param_dtype(fabric.precision)
    sharded_load = fabric.strategy == "fsdp" and not quantize  # on meta; after sharding each rank reads its shards
    if quantize:  # QLoRA: the blocks' linear weights are quantized to NF4 one tensor at a time while loading
        on_device = fabric.device if fabric.strategy != "fsdp" else torch.device("cpu")  # FSDP moves shards itself
        shards = fabric.world_size if fabric.strategy == "fsdp" else 1
        model = load_model_nf4(checkpoint_dir, device=on_device, dtype=dtype, shards=shards)
    else:
        model = load_model(checkpoint_dir, device="meta" if sharded_load else fabric.device, dtype=dtype)
    lora_rng = torch.get_rng_state()
    if method == "lora":
        apply_lora(model, **lora.to_dict())
        mark_only_lora_as_trainable(model)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    fabric.print(f"model: {config.name} ({config.model_type}), {total / 1e6:.1f}M parameters, {trainable / 1e6:.3f}M "
                 f"trainable ({method}), max_seq_length {max_seq_length or config.block_size}, {fabric.precision}"
                 + (f", base in NF4: {nf4_model_nbytes(model) / 2**20:.1f} MiB of parameters" if quantize else ""))
    model = fabric.setup(model)
    if sharded_load:
        fill_from_checkpoint(model, checkpoint_dir, lora_rng)
    return model


def resume_hooks(fabric: Fabric, model, optimizer, method: str, lora: Optional[LoRAConfig] = None):
    """(state, save_fn, load_fn) for the loop: what a resumable checkpoint holds. LoRA: only the trainable weights
    and their optimizer state, gathered (small, and independent of the number of processes); full finetuning: the
    model and optimizer (the loop's default save/load)."""
    if method == "lora":
        state = {"lora_state": {}, "optimizer_state": {}, "lora_config": lora.to_dict()}
        return (state, partial(save_lora_state, fabric, model, optimizer),
                partial(load_lora_state, fabric, model, optimizer, lora))
    return {"model": model, "optimizer": optimizer}, None, None


def write_final(fabric: Fabric, model, method: str, lora: Optional[LoRAConfig], checkpoint_dir: Path, out_dir: Path,
                merge: bool = True) -> Path:
    """``out_dir/final``: the checkpoint dir every other script reads. LoRA: the adapter and (``merge``) the merged
    model; full: the weights in the checkpoint's dtype. Collective: every rank calls it."""
    final = Path(out_dir) / "final"
    if method == "lora":
        lora_state = trainable_state(model)  # collective
        if fabric.is_global_zero:
            write_lora_checkpoint(final, lora_state, lora, checkpoint_dir, merge=merge)
        fabric.barrier()
    else:
        save_final_checkpoint(fabric, model, model.config, final, checkpoint_dir, dtype=checkpoint_dtype(checkpoint_dir))
    fabric.print(f"saved {final}" + (" (adapter only; merge with scripts/merge_lora.py)"
                                     if method == "lora" and not merge else ""))
    return final


def _mean_length(data: JSONData) -> int:
    lengths = data.train_dataset.lengths()
    return max(1, round(sum(lengths) / max(1, len(lengths))))


def checkpoint_dtype(checkpoint_dir: Path) -> torch.dtype:
    """The floating dtype the checkpoint's weights are stored in (outputs are written in it too)."""
    header, _ = read_safetensors_header(Path(checkpoint_dir) / MODEL_FILE)
    for info in header.values():
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is not None and dtype.is_floating_point:
            return dtype
    return torch.float32


def sample_prompt(data: JSONData, prompt: Optional[str]) -> tuple[list[int], list[int]]:
    """(prompt ids, expected answer ids) of the sample: ``prompt`` (formatted like the training data; no
    expected answer), else the first validation example (or the first training example without a split)
    cut before its first answer token."""
    if prompt:
        return data.format_prompt(prompt), []
    dataset = data.val_dataset if data.val_dataset is not None and len(data.val_dataset) else data.train_dataset
    item = dataset[0]
    labels = item["labels"].tolist()
    start = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    return item["input_ids"][: start + 1].tolist(), labels[start:end]


def print_sample(fabric: Fabric, model, tokenizer, sample: tuple[list[int], list[int]], max_new_tokens: int,
                 step: int, out_dir: Path) -> None:
    """Greedy answer to the fixed prompt. Under FSDP every rank runs it (the forward gathers shards)."""
    from litmodel.generate import generate

    if not (fabric.strategy == "fsdp" or fabric.is_global_zero):
        return
    prompt, expected = sample
    module = model.module  # not the DDP wrapper: no collectives for a rank-0-only forward
    was_training = module.training
    module.eval()
    stop = set(tokenizer.stop_ids) | set(getattr(tokenizer, "end_of_turn_ids", ()) or ())
    length = min(len(prompt) + max_new_tokens, model.config.block_size)
    try:
        with fabric.autocast():
            out = list(generate(module, prompt, max(0, length - len(prompt)), temperature=0, stop_tokens=stop))
    finally:
        module.clear_kv_cache()
        module.train(was_training)
    if fabric.is_global_zero:
        text = tokenizer.decode(out)
        lines = [f"step {step} sample", "  prompt:   " + repr(tokenizer.decode(prompt)), "  answer:   " + repr(text)]
        if expected:
            lines.append("  expected: " + repr(tokenizer.decode([t for t in expected if t not in stop])))
        fabric.print("\n".join(lines))
        with open(out_dir / "samples.txt", "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


# ---- training state on disk ----------------------------------------------------------------------
def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) weights, gathered whole on CPU (collective under FSDP; filled on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    sd = get_model_state_dict(model.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                     ignore_frozen_params=True))
    return {k: v for k, v in sd.items() if k in trainable}  # DSD keeps a frozen tied head (lm_head.weight)


def save_lora_state(fabric: Fabric, model, optimizer, path: Path, state: dict) -> None:
    """The loop's `save_fn` for LoRA: ``state`` plus the gathered trainable weights and their optimizer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state["lora_state"] = trainable_state(model)
    with _allow_step(fabric):
        state["optimizer_state"] = get_optimizer_state_dict(
            model.module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    fabric.save(path, state)
    state["lora_state"], state["optimizer_state"] = {}, {}


def load_lora_state(fabric: Fabric, model, optimizer, lora: LoRAConfig, path: Path, state: dict) -> None:
    """The loop's `load_fn` for LoRA: the counters into ``state``, the weights and optimizer state into place."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    fabric.load(path, state)
    if dict(state["lora_config"]) != lora.to_dict():
        raise LitModelError(f"{path} was trained with LoRA {dict(state['lora_config'])} but this run asks for "
                            f"{lora.to_dict()}; pass the same --lora.* (and --quantize) flags to resume it")
    set_model_state_dict(model.module, dict(state["lora_state"]),
                         options=StateDictOptions(full_state_dict=True, strict=False))
    with _allow_step(fabric):
        set_optimizer_state_dict(model.module, optimizer, dict(state["optimizer_state"]),
                                 options=StateDictOptions(full_state_dict=True))
    state["lora_state"], state["optimizer_state"] = {}, {}


def _allow_step(fabric: Fabric):
    """DSD may run a zero-lr optimizer step to create the state; 16-mixed guards optimizer.step()."""
    return getattr(fabric, "_allow_step", contextlib.nullcontext)()


# ---- LoRA checkpoint dirs: adapter, base pointer, merging ------------------------------------------
def write_lora_checkpoint(out_dir: Path, lora_state: dict[str, torch.Tensor], lora: LoRAConfig,
                          base_checkpoint_dir: Path, merge: bool = True) -> Path:
    """Write ``out_dir`` atomically: the adapter (``lora.safetensors``, ``lora_config.yaml`` naming the base)
    and, with ``merge``, the merged checkpoint (the same code as scripts/merge_lora.py)."""
    with atomic_dir(out_dir) as tmp:
        save_safetensors({k: v for k, v in lora_state.items()}, tmp / LORA_WEIGHTS_FILE)
        write_lora_config(tmp, lora, base_checkpoint_dir)
        if merge:
            write_merged(tmp, base_checkpoint_dir, tmp)
    return Path(out_dir)


def write_lora_config(d: Path, lora: LoRAConfig, base_checkpoint_dir: Optional[Path]) -> None:
    base = str(base_checkpoint_dir) if base_checkpoint_dir is not None else None
    dataclasses.replace(lora, base_checkpoint_dir=base).to_yaml(Path(d) / LORA_CONFIG_FILE)


def read_lora_config(lora_dir: Path) -> tuple[LoRAConfig, Optional[str]]:
    """The LoRA config of ``lora_dir`` and the base checkpoint dir it names (None if it names none)."""
    cfg = LoRAConfig.from_yaml(Path(lora_dir) / LORA_CONFIG_FILE)
    return cfg, cfg.base_checkpoint_dir


def merged_model(base_checkpoint_dir: Path, lora_dir: Path) -> nn.Module:
    """The base model (in its stored dtype, on CPU) with the adapter of ``lora_dir`` folded in. A QLoRA adapter
    (``quantize: nf4`` in its config) is folded into the NF4-rounded base it was trained against."""
    model = load_model(base_checkpoint_dir)
    if LoRAConfig.from_yaml(Path(lora_dir) / LORA_CONFIG_FILE).quantize == "nf4":
        round_trip_nf4_(model)
    load_lora(model, lora_dir)
    return merge_lora(model)


def write_merged(lora_dir: Path, base_checkpoint_dir: Path, out_dir: Path) -> None:
    """Write the merged model's files (weights, model_config.yaml, tokenizer) into the existing dir ``out_dir``."""
    from litmodel.tokenizer import copy_tokenizer_files

    model = merged_model(base_checkpoint_dir, lora_dir)
    save_safetensors(model_state_for_saving(model), Path(out_dir) / MODEL_FILE)
    model.config.to_yaml(Path(out_dir) / CONFIG_FILE)
    copy_tokenizer_files(base_checkpoint_dir, out_dir)


def merge_lora_checkpoint(checkpoint_dir: Path, base_checkpoint_dir: Optional[Path] = None,
                          out_dir: Optional[Path] = None) -> Path:
    """Merge the adapter in ``checkpoint_dir`` into its base and write a complete checkpoint dir to ``out_dir``
    (default: ``checkpoint_dir`` itself, replaced atomically; the adapter files are kept)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise LitModelError(f"{checkpoint_dir} does not exist; pass the out_dir/final of a LoRA finetuning run")
    if not (checkpoint_dir / LORA_WEIGHTS_FILE).is_file():
        raise LitModelError(f"{checkpoint_dir} has no {LORA_WEIGHTS_FILE}; pass the out_dir/final of a LoRA "
                            "finetuning run")
    lora_cfg, named_base = read_lora_config(checkpoint_dir)
    base = base_checkpoint_dir or named_base
    if base is None:
        raise LitModelError(f"{checkpoint_dir / LORA_CONFIG_FILE} names no base model; pass --base_checkpoint_dir")
    base = Path(base)
    if not base.is_dir():
        hint = "" if base_checkpoint_dir else f" (named by {checkpoint_dir / LORA_CONFIG_FILE})"
        raise LitModelError(f"base checkpoint dir {base}{hint} does not exist; pass --base_checkpoint_dir")
    check_checkpoint_dir(base)
    if base.resolve() == checkpoint_dir.resolve():
        raise LitModelError(f"--base_checkpoint_dir {base} is the LoRA dir itself; pass the model it was trained on")
    out_dir = Path(out_dir) if out_dir is not None else checkpoint_dir
    with atomic_dir(out_dir) as tmp:
        shutil.copy2(checkpoint_dir / LORA_WEIGHTS_FILE, tmp / LORA_WEIGHTS_FILE)
        write_lora_config(tmp, lora_cfg, base)
        write_merged(tmp, base, tmp)
    return out_dir


# ---- the command line ----------------------------------------------------------------------------
def parse_args(fn, argv: Optional[list[str]] = None, description: str = "") -> dict:
    """The keyword arguments of ``fn`` from the command line (classes instantiated)."""
    from litmodel.cli import parse_function_args

    return parse_function_args(fn, argv, description, instantiate=True)


def setup(method: Literal["lora", "full"], argv: Optional[list[str]] = None, description: str = "") -> Path:
    """Parse ``--config x.yaml`` and flags, then run `finetune_lora` or `finetune_full`."""
    fn = finetune_lora if method == "lora" else finetune_full
    return fn(**parse_args(fn, argv, description))
