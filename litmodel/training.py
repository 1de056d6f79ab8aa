"""Training pieces shared by the pretraining and finetuning recipes, written once.

Hyperparameter groups (`TrainArgs`, `EvalArgs`), optimizer parameter groups, the warmup + cosine
learning-rate schedule, loss, FLOPs/MFU accounting, throughput/ETA monitoring, evaluation, and
the layout of resumable training state under ``out_dir/step-XXXXXX``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from litmodel.config import Config
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


@dataclass
class EvalArgs:
    """Validation settings (``--eval.*``)."""

    interval: int = 100  # optimizer steps between validations
    max_iters: int = 20  # validation batches per run
    initial_validation: bool = False
    final_validation: bool = True


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


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token loss over the targets that are not ``ignore_index`` (computed in float32)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)


# ---- FLOPs, MFU and throughput ------------------------------------------------------------------
def matmul_params(config: Config) -> int:
    """Parameters that take part in matrix products per token (all but the embedding lookups)."""
    c = config
    attn = c.n_embd * (c.n_head + 2 * c.n_query_groups) * c.head_size + c.n_head * c.head_size * c.n_embd
    mlp = (3 if c.family == "llama" else 2) * c.n_embd * c.intermediate_size
    return c.n_layer * (attn + mlp) + c.n_embd * c.padded_vocab_size


def flops_per_token(config: Config, seq_len: int, backward: str = "full") -> float:
    """Model FLOPs per token (PaLM-style): 2N forward + attention scores, times 3 for full training.

    ``backward``: "full" (weights and activations: 6N), "lora" (frozen weights: activation gradients
    only, 4N) or "none" (inference, 2N). Attention (QK^T and AV) counts 4 * T * n_head * head_size
    per layer and token in the forward pass.
    """
    forward = 2 * matmul_params(config) + 4 * config.n_layer * seq_len * config.n_head * config.head_size
    return forward * {"full": 3, "lora": 2, "none": 1}[backward]


def measure_peak_flops(dtype: torch.dtype, device: torch.device | str = "cpu", size: int = 2048,
                       seconds: float = 1.0) -> float:
    """The matrix-product rate this device reaches right now (FLOP/s), the denominator of MFU."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n < 3:
        a @ b
        n += 1
    sync()
    return 2 * size**3 * n / (time.perf_counter() - start)


class SpeedMonitor:
    """Tokens/s, MFU and ETA over a sliding window of recent optimizer steps."""

    def __init__(self, flops_per_token: float, peak_flops: float | None, world_size: int = 1, window: int = 10):
        self.flops_per_token, self.peak_flops, self.world_size = flops_per_token, peak_flops, world_size
        self.window = window
        self.history: list[tuple[float, int]] = []  # (time, total tokens so far)

    def update(self, total_tokens: int) -> None:
        self.history.append((time.perf_counter(), total_tokens))
        self.history = self.history[-(self.window + 1):]

    def tokens_per_sec(self) -> float:
        if len(self.history) < 2:
            return float("nan")
        (t0, n0), (t1, n1) = self.history[0], self.history[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)

    def mfu(self) -> float:
        if not self.peak_flops:
            return float("nan")
        return self.tokens_per_sec() * self.flops_per_token / (self.peak_flops * self.world_size)

    def eta_seconds(self, total_tokens: int, target_tokens: int) -> float:
        rate = self.tokens_per_sec()
        return (target_tokens - total_tokens) / rate if rate == rate and rate > 0 else float("nan")


def format_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak, or the CPU resident set high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


@torch.no_grad()
def validate(fabric, model: nn.Module, batches: Iterable, max_iters: int) -> float:
    """Mean loss over at most ``max_iters`` batches of (input, target), averaged over processes."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=fabric.device)
    for i, batch in enumerate(batches):
        if i >= max_iters:
            break
        inputs, targets = batch[0].to(fabric.device), batch[1].to(fabric.device)
        loss = cross_entropy(model(inputs), targets)
        total += torch.stack([loss.float() * targets.numel(), torch.tensor(targets.numel(), device=fabric.device)])
    total = fabric.all_reduce(total, op="sum")
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


# ---- resumable state on disk -------------------------------------------------------------------
STEP_DIR = re.compile(r"^step-(\d{6,})(\.pt)?$")  # a file (one process) or a DCP dir (FSDP)


def step_dir(out_dir: Path, step: int, sharded: bool = False) -> Path:
    """Where the resumable state of ``step`` lives: ``step-XXXXXX.pt`` (one file) or ``step-XXXXXX/`` (FSDP shards)."""
    return Path(out_dir) / (f"step-{step:06d}" if sharded else f"step-{step:06d}.pt")


def latest_step_dir(out_dir: Path) -> Path | None:
    """The newest complete ``step-XXXXXX`` entry under ``out_dir`` (temp names never match)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in out_dir.iterdir() if (m := STEP_DIR.match(p.name)))
    return steps[-1][1] if steps else None


def resolve_resume(out_dir: Path, resume: str | bool | None) -> Path | None:
    """What to resume from: ``auto`` (the latest step dir, if any), a path, or nothing.

    Without ``--resume`` an out_dir that already holds a run is refused, so a new run never
    overwrites another one's checkpoints.
    """
    out_dir = Path(out_dir)
    if resume in (None, False, "", "none"):
        if latest_step_dir(out_dir) is not None or (out_dir / "final").exists():
            raise LitModelError(f"{out_dir} already holds a run; pass --resume auto to continue it, "
                                "or choose another --out_dir")
        return None
    if resume in ("auto", True):
        return latest_step_dir(out_dir)
    path = Path(resume)
    if not path.exists():
        raise LitModelError(f"--resume {path} does not exist; pass a step-XXXXXX dir under the out_dir or 'auto'")
    return path


def prune_step_dirs(out_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` step dirs (the oldest are removed only after a newer one is complete)."""
    import shutil

    steps = sorted((int(m.group(1)), p) for p in Path(out_dir).iterdir() if (m := STEP_DIR.match(p.name)))
    for _, p in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def cycle(loader: Iterable) -> Iterator:
    while True:
        yield from loader


def cpu_supports_fast_bf16() -> bool:
    """True when oneDNN has native bfloat16 kernels here (AVX512-BF16/AMX); elsewhere bf16 matmuls
    fall back to a reference path that is far slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str | None, accelerator: str) -> str:
    """``auto``/None: bf16-mixed where the hardware runs bf16 fast, else 32-true."""
    if precision not in (None, "auto"):
        return precision
    if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_supports_fast_bf16() else "32-true"


def full_model_state(fabric, model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on global rank 0 (None elsewhere), gathered shard by shard
    under FSDP (collective: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module = getattr(model, "module", model)
    if fabric.strategy == "fsdp":
        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return sd if fabric.is_global_zero else None


def save_final_checkpoint(fabric, model: nn.Module, config: Config, out_dir: Path,
                          tokenizer_dir: Path | None, dtype: torch.dtype | None = None) -> None:
    """Write ``out_dir`` as a checkpoint dir (weights, model_config.yaml, tokenizer files) from rank 0."""
    from litmodel.checkpoint import save_checkpoint_dir

    state = full_model_state(fabric, model)
    if fabric.is_global_zero:
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_checkpoint_dir(out_dir, state, config, tokenizer_dir)
    fabric.barrier()
