"""The command line of the finetuning recipes (SFT: `litmodel.finetune`; DPO: `litmodel.finetune_dpo`), written once.

Their argument groups (``--train.*``, ``--eval.*``, ``--lora.*``) and per-recipe defaults, the help text of
each flag (`FLAG_HELP`, turned into the entry points' docstrings by `document_flags`; jsonargparse reads
``--help`` from them), the checks every recipe makes before any process starts or any file is written
(`check_run_inputs`, `check_quantize`, `prepare_run`, which also builds the Fabric), and `RunSpec`, the one
picklable object a launched `main` receives.
"""

from __future__ import annotations

import importlib.util
import inspect
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from litmodel.checkpoint import check_checkpoint_dir, load_config
from litmodel.cli import parse_function_args
from litmodel.config import Config
from litmodel.dpo import DPOArgs
from litmodel.fabric import Fabric
from litmodel.loggers import build_loggers
from litmodel.lora import LoRAConfig
from litmodel.precision import resolve_precision
from litmodel.quantize import TRAINING_QUANTIZE_MODES
from litmodel.training_args import EvalArgs, TrainArgs, accumulation_steps
from litmodel.tokenizer import load_tokenizer
from litmodel.training_state import resolve_resume
from litmodel.utils import LitModelError


# ---- argument groups and defaults -----------------------------------------------------------------
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


def finetune_train_defaults(lr: float, weight_decay: float) -> FinetuneTrainArgs:
    """The ``--train.*`` defaults every finetuning recipe shares, with its own learning rate and weight decay."""
    return FinetuneTrainArgs(global_batch_size=16, micro_batch_size=1, epochs=1, lr=lr, min_lr=0.0, warmup_steps=10,
                             weight_decay=weight_decay, save_interval=200)


def lora_train_defaults() -> FinetuneTrainArgs:
    return finetune_train_defaults(lr=3e-4, weight_decay=0.0)


def full_train_defaults() -> FinetuneTrainArgs:
    return finetune_train_defaults(lr=2e-5, weight_decay=0.02)


def dpo_train_defaults() -> FinetuneTrainArgs:
    # pairs per step; TRL's default learning rate (1e-6) is for full finetuning, LoRA takes larger steps
    return finetune_train_defaults(lr=5e-5, weight_decay=0.0)


@dataclass
class RunSpec:
    """Everything a recipe's `main` needs, in one picklable object (sent to spawned workers)."""

    method: Literal["lora", "full"]
    checkpoint_dir: Path
    data: Any  # set-up-able data module: JSONData (SFT) or PreferenceData (DPO)
    out_dir: Path
    train: TrainArgs
    eval: FinetuneEvalArgs
    resume: Union[bool, str]
    seed: int
    lora: Optional[LoRAConfig] = None
    merge: bool = True
    quantize: Optional[str] = None  # SFT with LoRA only: "nf4" (QLoRA)
    dpo: Optional[DPOArgs] = None  # DPO only
    hparams: dict = field(default_factory=dict)


# ---- help text: one line per flag, shared by the entry points ---------------------------------------
FLAG_HELP = {
    "checkpoint_dir": "The model to finetune: a checkpoint dir (checkpoints/<org>/<name>) written by "
                      "scripts/download.py, scripts/convert_hf_checkpoint.py or pretraining.",
    "data": "The instruction/chat data: --data JSON --data.json_path FILE (.json list or .jsonl), with "
            "--data.val_split_fraction, --data.prompt_style chat|alpaca (default: chat when the tokenizer has a chat "
            "template), --data.packed (pack examples into full rows), --data.seed (validation split).",
    "out_dir": "Where logs, resumable step-XXXXXX checkpoints and the final checkpoint dir (out_dir/final) go.",
    "precision": "32-true, bf16-mixed, bf16-true, 16-mixed, 16-true, or auto (bf16-mixed where the hardware runs "
                 "bf16 fast, else 32-true).",
    "devices": "Processes per node (GPUs, or CPU processes).",
    "num_nodes": "Nodes; several nodes are started by torchrun or srun.",
    "strategy": "auto (single or ddp), single, ddp or fsdp.",
    "accelerator": "cpu, cuda or auto.",
    "resume": "auto (the latest step checkpoint in out_dir), a step checkpoint path, or false (refuses an out_dir "
              "that already holds a run).",
    "seed": "Seed for initialisation, dropout and data order.",
    "logger": "csv, tensorboard or both (under out_dir).",
    "train": "Batch sizes, epochs / max_steps (max_steps stops early; the LR schedule spans the epochs when they are "
             "set, so a run stopped by max_steps continues unchanged with --resume auto), learning rate, warmup, "
             "clipping, activation checkpointing, checkpoint interval. max_seq_length (default: the model's "
             "block_size) truncates longer examples.",
    "eval": "Validation interval and size, and the greedy sample answer printed at each validation.",
    "lora": "LoRA rank (r), alpha, dropout and targets (comma-separated: query, key, value, projection, mlp, head).",
}


def document_flags(summary: str, **own_help: str) -> Callable[[Callable], Callable]:
    """Give an entry point the docstring its ``--help`` is read from: ``summary`` and an ``Args:`` line per
    parameter, in signature order: its text in ``own_help``, else the shared one in `FLAG_HELP`."""

    def decorate(fn: Callable) -> Callable:
        lines = [summary, "", "    Args:"]
        for name in inspect.signature(fn).parameters:
            text = own_help.get(name) or FLAG_HELP[name]
            lines.append(textwrap.fill(f"{name}: {text}", width=116, initial_indent=" " * 8,
                                       subsequent_indent=" " * 12))
        fn.__doc__ = "\n".join(lines) + "\n"
        return fn

    return decorate


def parse_args(fn: Callable, argv: Optional[list[str]] = None, description: str = "") -> dict:
    """The keyword arguments of ``fn`` from the command line (classes instantiated)."""
    return parse_function_args(fn, argv, description, instantiate=True)


# ---- checks before launching, and the Fabric ------------------------------------------------------
def check_run_inputs(checkpoint_dir: Path, out_dir: Path, resume: Union[bool, str]) -> tuple[Path, Config]:
    """(checkpoint dir, its config): the checks every finetuning recipe makes first. ``out_dir`` holds no other
    run (unless resuming), the checkpoint dir exists and its tokenizer and config load."""
    resolve_resume(out_dir, resume)  # refuse to overwrite another run
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    load_tokenizer(checkpoint_dir)
    return checkpoint_dir, load_config(checkpoint_dir)


def check_quantize(quantize: str) -> str:
    """The quantization mode of a --quantize value (one line for an unknown one or a missing torchao)."""
    if quantize not in TRAINING_QUANTIZE_MODES:
        raise LitModelError(f"unknown --quantize {quantize!r}; choose nf4 (alias bnb.nf4) or leave it out")
    if importlib.util.find_spec("torchao") is None:
        raise LitModelError(f"--quantize {quantize} needs torchao: pip install torchao (the quant extra)")
    return TRAINING_QUANTIZE_MODES[quantize]


def prepare_run(checkpoint_dir: Path, config: Config, data, out_dir: Path, precision: str, devices: Union[int, str],
                num_nodes: int, strategy: str, accelerator: str, seed: int, logger: str, train: TrainArgs,
                eval: EvalArgs) -> tuple[Fabric, dict]:
    """What every finetuning recipe (SFT, DPO) checks and builds before launching: the run length and sequence
    length flags, the precision, the loggers, the Fabric, the batch split; returns it and the common hparams."""
    if train.max_tokens is not None:
        raise LitModelError("--train.max_tokens is a pretraining budget; finetuning runs --train.epochs "
                            "(and stops early at --train.max_steps)")
    if not train.epochs and not train.max_steps:
        raise LitModelError("set --train.epochs or --train.max_steps (how long to finetune)")
    if train.max_seq_length is not None and train.max_seq_length > config.block_size:
        raise LitModelError(f"--train.max_seq_length {train.max_seq_length} exceeds the model's block_size "
                            f"{config.block_size}; use at most {config.block_size}")
    precision = resolve_precision(precision, accelerator)
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                    precision=precision, loggers=build_loggers(out_dir, logger),
                    activation_checkpointing=train.activation_checkpointing)
    accumulation_steps(train, fabric.world_size)  # a global batch that does not divide fails here
    hparams = dict(checkpoint_dir=str(checkpoint_dir), data=type(data).__name__,
                   **{f"data.{k}": str(v) for k, v in vars(data).items() if not k.endswith("_dataset")
                      and k not in ("tokenizer", "max_seq_length")},
                   out_dir=str(out_dir), precision=precision, devices=fabric.devices, num_nodes=num_nodes,
                   strategy=fabric.strategy, seed=seed, **{f"train.{k}": v for k, v in asdict(train).items()},
                   **{f"eval.{k}": v for k, v in asdict(eval).items()})
    return fabric, hparams


def lora_hparams(lora: LoRAConfig, merge: bool) -> dict:
    """The LoRA hyperparameters as logged beside the others (``lora.r``, ..., ``merge``)."""
    return {**{f"lora.{k}": str(v) for k, v in lora.to_dict().items()}, "merge": merge}
