"""The training hyperparameters (``--train.*``, ``--eval.*``) and what follows from them alone: the split of
the global batch into micro-batches, the AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from litmodel.utils import LitModelError


@dataclass
class TrainArgs:
    """Optimisation hyperparameters (``--train.*`` on the command line)."""

    global_batch_size: int = 64  # sequences per optimizer step, over all processes
    micro_batch_size: int = 4  # sequences per forward/backward on one process
    max_tokens: int | None = None  # stop after this many training tokens ...
    max_steps: int | None = None  # ... or after this many optimizer steps
    epochs: int | None = None  # finetuning: passes over the dataset
    max_seq_length: int | None = None  # None: the model's block_size
    lr: float = 6e-4
    min_lr: float = 6e-5  # the cosine schedule decays to this
    warmup_steps: int = 100
    weight_decay: float = 0.1  # not applied to norms, biases and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    max_norm: float | None = 1.0  # gradient clipping; None disables
    activation_checkpointing: bool = False
    log_interval: int = 1  # optimizer steps between log lines
    save_interval: int | None = 1000  # optimizer steps between resumable checkpoints; None: only at the end
    # mixture-of-experts models: weight of the router load-balancing loss added to the loss (0: off, as
    # transformers' default; its MoE configs suggest 0.001 when router losses are on)
    router_aux_loss_coef: float = 0.0


@dataclass
class EvalArgs:
    """Validation settings (``--eval.*``)."""

    interval: int = 100  # optimizer steps between validations
    max_iters: int = 20  # validation batches per run
    initial_validation: bool = False
    final_validation: bool = True
    tasks: str | None = None  # lm-eval tasks run at each validation, e.g. arc_easy,piqa (needs the [eval] extra)
    limit: float | None = 100  # examples per task in those runs (a fraction if below 1; null: all)
    include_path: str | None = None  # a directory of your own task YAML files for --eval.tasks


def accumulation_steps(train: TrainArgs, world_size: int) -> int:
    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise LitModelError(
            f"--train.global_batch_size {train.global_batch_size} is not divisible by micro_batch_size x devices "
            f"= {train.micro_batch_size} x {world_size}; pick a global batch that is a multiple of {per_step}")
    return train.global_batch_size // per_step


def build_optimizer(model: nn.Module, train: TrainArgs, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only: norms, biases and embeddings are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = name.split(".")[-2:-1] in (["wte"], ["wpe"]) or "wte." in name or "wpe." in name
        (no_decay if p.ndim < 2 or is_embedding else decay).append(p)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": fused} if fused is not None else {"foreach": True}
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), **kwargs)


def lr_at(step: int, train: TrainArgs, max_steps: int) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / (train.warmup_steps + 1)
    progress = min(1.0, (step - train.warmup_steps) / max(1, max_steps - train.warmup_steps))
    return train.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (train.lr - train.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
