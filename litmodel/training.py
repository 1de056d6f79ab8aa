"""The training loop every recipe calls (`fit`), and the pieces it is made of, written once.

Hyperparameter groups (`TrainArgs`, `EvalArgs`), optimizer parameter groups, the warmup + cosine
learning-rate schedule, the next-token loss, throughput/MFU/ETA monitoring (FLOP counts and peaks:
litmodel/flops.py), validation, and the layout of resumable training state under ``out_dir/step-XXXXXX``.

The loop (`fit`) normalises per loss unit over the whole global batch: a recipe gives
``count_fn(batch)`` (the units of a micro-batch, e.g. its target tokens, known before the forward) and
``loss_fn(model, batch) -> (sum of unit losses, {metric: sum})``; each step fetches its micro-batches,
all-reduces their unit count once and back-propagates ``loss_sum * world_size / global_count`` (DDP and
FSDP average gradients over ranks), so the gradient is the sum of the unit-loss gradients over the
global count whatever the micro-batch size, number of processes, padding or packing.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from litmodel.config import Config
from litmodel.fabric import capture_rng_state, restore_rng_state
from litmodel.flops import Peak, peak_flops
from litmodel.flops import mfu as flops_mfu
from litmodel.utils import LitModelError

IGNORE_INDEX = -100  # label of positions that are not trained on (prompt, padding); F.cross_entropy's default

# The recipe's side of the loop's contract (see `fit`)
LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]
CountFn = Callable[[Any], "int | torch.Tensor"]
Evaluator = Callable[[Any, nn.Module, int], "dict[str, float]"]  # (fabric, model, step) -> metrics


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


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token loss over the targets that are not ``ignore_index`` (computed in float32)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """SUM of the next-token losses over the targets that are not ``ignore_index`` (float32); 0, not NaN,
    when every target is ignored."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index,
                           reduction="sum")


def _inputs_and_targets(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A language-model micro-batch: a dict with ``input_ids`` and ``labels`` or a tuple (inputs, targets)."""
    if isinstance(batch, Mapping):
        return batch["input_ids"], batch["labels"]
    return batch[0], batch[1]


def count_target_tokens(batch: Any) -> torch.Tensor:
    """`count_fn` of language modelling: the micro-batch's targets that are not ``IGNORE_INDEX``."""
    return (_inputs_and_targets(batch)[1] != IGNORE_INDEX).sum()


def next_token_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`loss_fn` of language modelling: the summed next-token loss (no extra metrics). A dict batch may
    carry ``positions`` and ``mask`` (packed sequences)."""
    inputs, targets = _inputs_and_targets(batch)
    if isinstance(batch, Mapping):
        logits = model(inputs, positions=batch.get("positions"), mask=batch.get("mask"))
    else:
        logits = model(inputs)
    return token_loss_sum(logits, targets), {}


def language_model_loss(router_aux_loss_coef: float = 0.0) -> LossFn:
    """`loss_fn` of language modelling for ``--train.router_aux_loss_coef``: `next_token_loss`, plus for a
    mixture-of-experts model ``coef`` x the router load-balancing loss of the forward
    (`litmodel.llama.router_aux_loss`, as transformers adds ``router_aux_loss_coef * aux_loss``), counted
    once per target token so that the loop's division by the token count gives transformers' mean loss.
    The aux loss is logged as ``router_aux``; validation (eval mode) reports the next-token loss alone."""
    if not router_aux_loss_coef:
        return next_token_loss
    from litmodel.llama import router_aux_loss

    def loss_fn(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_sum, metrics = next_token_loss(model, batch)
        aux = router_aux_loss(model)
        if aux is None:  # eval mode, or a model without experts
            return loss_sum, metrics
        n = count_target_tokens(batch).to(aux.dtype)
        return loss_sum + router_aux_loss_coef * aux * n, {**metrics, "router_aux": aux.detach() * n}

    return loss_fn


def count_input_tokens(batch: Any) -> int:
    """Default `tokens_fn`: the tokens the model reads in a micro-batch, padding included (throughput, MFU)."""
    return _inputs_and_targets(batch)[0].numel()


# ---- throughput and MFU (FLOP counts and peaks: litmodel/flops.py) ---------------------------------
class SpeedMonitor:
    """Tokens/s, MFU and ETA over a sliding window of recent optimizer steps.

    ``peak``: the per-device FLOP/s MFU divides by (`litmodel.flops.peak_flops`); None or an unknown
    peak: no MFU."""

    def __init__(self, flops_per_token: float, peak: Peak | None, world_size: int = 1, window: int = 10):
        self.flops_per_token, self.peak, self.world_size = flops_per_token, peak, world_size
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
        """Utilisation of each device in [0, 1] (all processes' tokens over world_size devices); NaN if unknown."""
        if self.peak is None or not self.flops_per_token:
            return float("nan")
        value = flops_mfu(self.tokens_per_sec() * self.flops_per_token / self.world_size, self.peak)
        return float("nan") if value is None else value

    def eta_seconds(self, total_tokens: int, target_tokens: int) -> float:
        rate = self.tokens_per_sec()
        return (target_tokens - total_tokens) / rate if rate == rate and rate > 0 else float("nan")

    def seconds_per_step(self) -> float:
        """Mean wall time of the recent steps (one `update` per step)."""
        h = self.history
        return (h[-1][0] - h[0][0]) / (len(h) - 1) if len(h) > 1 else float("nan")

    def restart(self) -> None:
        """Forget the window (keeping the last count, timed from now): time spent since, e.g. in
        validation, stays out of the throughput."""
        if self.history:
            self.history = [(time.perf_counter(), self.history[-1][1])]


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


# ---- resumable state on disk -------------------------------------------------------------------
STEP_STATE_NAME = re.compile(r"^step-(\d{6,})(\.pt)?$")  # a file (one process) or a DCP dir (FSDP)


def step_state_path(out_dir: Path, step: int, sharded: bool = False) -> Path:
    """Where the resumable state of ``step`` lives: ``step-XXXXXX.pt`` (one file) or ``step-XXXXXX/`` (FSDP shards)."""
    return Path(out_dir) / (f"step-{step:06d}" if sharded else f"step-{step:06d}.pt")


def latest_step_state(out_dir: Path) -> Path | None:
    """The newest complete ``step-XXXXXX.pt`` file or ``step-XXXXXX/`` dir in ``out_dir`` (temp names never match)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in out_dir.iterdir() if (m := STEP_STATE_NAME.match(p.name)))
    return steps[-1][1] if steps else None


def resolve_resume(out_dir: Path, resume: str | bool | None) -> Path | None:
    """What to resume from: ``auto`` (the latest step dir, if any), a path, or nothing.

    Without ``--resume`` an out_dir that already holds a run is refused, so a new run never
    overwrites another one's checkpoints.
    """
    out_dir = Path(out_dir)
    if resume in (None, False, "", "none"):
        if latest_step_state(out_dir) is not None or (out_dir / "final").exists():
            raise LitModelError(f"{out_dir} already holds a run; pass --resume auto to continue it, "
                                "or choose another --out_dir")
        return None
    if resume in ("auto", True):
        return latest_step_state(out_dir)
    path = Path(resume)
    if not path.exists():
        raise LitModelError(f"--resume {path} does not exist; pass a step-XXXXXX dir under the out_dir or 'auto'")
    return path


def prune_step_states(out_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` step states, files or dirs (the oldest go only after a newer one is complete)."""
    import shutil

    steps = sorted((int(m.group(1)), p) for p in Path(out_dir).iterdir() if (m := STEP_STATE_NAME.match(p.name)))
    for _, p in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def cycle(loader: Iterable) -> Iterator:
    while True:
        yield from loader


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


# ---- the training loop -------------------------------------------------------------------------
def fit(fabric, model: nn.Module, optimizer: torch.optim.Optimizer, train_loader, *, train: TrainArgs,
        eval: EvalArgs, out_dir: Path, max_steps: int, schedule_steps: int | None = None,
        loss_fn: LossFn = next_token_loss, count_fn: CountFn = count_target_tokens,
        tokens_fn: Callable[[Any], int] = count_input_tokens, unit_name: str = "target_tokens",
        val_loader: Iterable | None = None, evaluators: Sequence[Evaluator] = (), state: dict | None = None,
        resume_from: Path | None = None, save_fn: Callable[[Path, dict], None] | None = None,
        load_fn: Callable[[Path, dict], None] | None = None, flops_per_token: float | None = None,
        show: Sequence[str] = ()) -> dict:
    """Train until ``state["step"] == max_steps``; the one loop of every recipe.

    The recipe gives the set-up ``model`` and ``optimizer``, ``train_loader`` (iterated forever, one
    micro-batch per item; its ``state_dict``/``load_state_dict`` keep the data position) and:

    * ``count_fn(batch) -> int | Tensor``: the loss units of a micro-batch, known without a forward
      (language modelling: the targets that are not ``IGNORE_INDEX``; preference pairs for DPO).
    * ``loss_fn(model, batch) -> (loss_sum, metrics)``: the SUM of the unit losses of the micro-batch
      (0, not NaN, when it has no unit), and optional metric SUMS (scalar tensors, the same keys on
      every call); the loop logs each as ``sum over the global batch / global count``. An auxiliary
      loss (e.g. a router balance term) goes into ``loss_sum`` scaled as the recipe wants it per unit.
    * ``tokens_fn(batch) -> int``: tokens the model reads (padding included), for tokens/s, MFU, ETA
      and the ``tokens`` column.

    Each step fetches its ``accumulation_steps`` micro-batches first, all-reduces their unit count once,
    then runs forward+backward on each (without gradient sync but for the last) scaled by
    ``world_size / global_count``, so the gradient is sum(unit-loss gradients) / global_count. A global
    batch without a unit skips the update (with a warning line). Then: clipping (``train.max_norm``),
    ``fabric.step``, the LR schedule (warmup + cosine over ``schedule_steps``, default ``max_steps``),
    a log line and metrics every ``train.log_interval`` steps (loss, lr, tokens/s, MFU, ETA, memory,
    grad norm, epoch), validation every ``eval.interval`` steps (``val_loss`` per unit over
    ``eval.max_iters`` batches of ``val_loader``, and each of ``evaluators(fabric, model, step) ->
    {name: float}``, run in eval mode without gradients on every rank, logged beside it), and a
    resumable checkpoint every ``train.save_interval`` steps and at the end (two kept).

    ``state``: what a checkpoint holds besides the loop's counters (default ``{"model", "optimizer"}``);
    the loop adds ``step``, ``tokens``, ``units``, ``train_loader`` (its position) and ``rng``, and saves
    it with ``save_fn(path, state)`` (default ``fabric.save``) to ``out_dir/step-XXXXXX.pt`` (a
    ``step-XXXXXX/`` DCP dir when ``state`` holds an FSDP model). ``resume_from``: such a checkpoint,
    loaded with ``load_fn(path, state)`` (default ``fabric.load``) before the first step.
    ``flops_per_token``: training FLOPs per token read (`litmodel.flops.train_flops_per_token`), for MFU
    against `litmodel.flops.peak_flops` (None: no MFU). ``show``: metric names (of ``loss_fn``) also printed
    on the step line (e.g. DPO's ``rewards/accuracies``); every metric is logged either way.
    Returns ``{"step", "tokens", "units", "val_loss", ...}``: the counters and the last validation.
    """
    out_dir = Path(out_dir)
    accum = accumulation_steps(train, fabric.world_size)
    schedule_steps = schedule_steps or max_steps
    state = {"model": model, "optimizer": optimizer} if state is None else state
    for key, value in (("step", 0), ("tokens", 0), ("units", 0), ("train_loader", {}), ("rng", {})):
        state.setdefault(key, value)
    sharded = fabric.strategy == "fsdp" and any(isinstance(v, nn.Module) for v in state.values())
    if resume_from is not None:
        (load_fn or fabric.load)(Path(resume_from), state)
        train_loader.load_state_dict(state["train_loader"])
        restore_rng_state(state["rng"])
        fabric.print(f"resumed from {resume_from} at step {state['step']}")

    peak = peak_flops(fabric.device, fabric.precision) if flops_per_token else None  # CPU: measured once, cached
    speed = SpeedMonitor(flops_per_token or 0.0, peak, fabric.world_size)
    if peak is not None:
        fabric.print(f"MFU below: {peak.label}" if peak.flops else peak.label)
    results: dict[str, float] = {}
    if eval.initial_validation:
        results = _validate_and_log(fabric, model, val_loader, evaluators, loss_fn, count_fn, eval, state,
                                    perplexity=unit_name.endswith("tokens"))
    speed.update(state["tokens"])
    batches = cycle(train_loader)  # after a resume the first pass continues where the run stopped
    model.train()
    while state["step"] < max_steps:
        lr = lr_at(state["step"], train, schedule_steps)
        set_lr(optimizer, lr)
        micro_batches = [fabric.to_device(next(batches)) for _ in range(accum)]
        local = torch.stack([
            sum(torch.as_tensor(count_fn(b), dtype=torch.float64, device=fabric.device) for b in micro_batches),
            torch.tensor(float(sum(int(tokens_fn(b)) for b in micro_batches)), dtype=torch.float64,
                         device=fabric.device)])
        count, step_tokens = fabric.all_reduce(local, op="sum").tolist()  # the one collective before backward
        loss_total, metric_totals, grad_norm = torch.zeros((), device=fabric.device), {}, None
        if count > 0:
            scale = fabric.world_size / count  # DDP/FSDP average over ranks: undo it, divide by the global count
            for i, batch in enumerate(micro_batches):
                with fabric.no_backward_sync(model, enabled=i < accum - 1):
                    loss_sum, metrics = loss_fn(model, batch)
                    fabric.backward(loss_sum * scale)
                loss_total += loss_sum.detach().float()
                for k, v in metrics.items():
                    metric_totals[k] = metric_totals.get(k, 0.0) + v.detach().float()
            if train.max_norm:
                grad_norm = fabric.clip_gradients(model, optimizer, max_norm=train.max_norm)
            fabric.step(optimizer)
        else:
            fabric.print(f"warning: step {state['step'] + 1}: no {unit_name} in the whole global batch (every target "
                         "masked); the update is skipped")
        optimizer.zero_grad(set_to_none=True)
        del micro_batches
        state["step"] += 1
        state["tokens"] += int(step_tokens)
        state["units"] += int(count)
        speed.update(state["tokens"])
        step = state["step"]
        is_last = step == max_steps

        if step % train.log_interval == 0 or is_last:
            metrics = {"step": step, "tokens": state["tokens"], unit_name: state["units"]}
            epoch = _epoch(train_loader)
            if epoch is not None:
                metrics["epoch"] = epoch
            if count > 0:
                sums = fabric.all_reduce(torch.stack([loss_total, *metric_totals.values()]), op="sum") / count
                metrics["loss"] = sums[0].item()
                metrics.update({k: v.item() for k, v in zip(metric_totals, sums[1:])})
            metrics.update(lr=lr, tokens_per_sec=speed.tokens_per_sec(), mfu=speed.mfu(),
                           memory_mb=memory_mb(fabric.device))
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            fabric.log_dict(metrics, step=step)
            eta = format_eta((max_steps - step) * speed.seconds_per_step())
            fabric.print(f"step {step}/{max_steps}" + (f" | epoch {epoch:.2f}" if epoch is not None else "")
                         + f" | loss {metrics.get('loss', float('nan')):.4f}"
                         + "".join(f" | {k} {metrics[k]:.4f}" for k in show if k in metrics) + f" | lr {lr:.2e} | "
                         f"{metrics['tokens_per_sec']:.0f} tok/s"
                         + (f" | MFU {metrics['mfu'] * 100:.1f}%" if metrics["mfu"] == metrics["mfu"] else "")
                         + f" | ETA {eta}")
        if (eval.interval and step % eval.interval == 0) or (is_last and eval.final_validation):
            results = _validate_and_log(fabric, model, val_loader, evaluators, loss_fn, count_fn, eval, state,
                                        perplexity=unit_name.endswith("tokens"))
            speed.restart()  # keep validation time out of the throughput
        if (train.save_interval and step % train.save_interval == 0) or is_last:
            state["train_loader"] = train_loader.state_dict()
            state["rng"] = capture_rng_state()
            (save_fn or fabric.save)(step_state_path(out_dir, step, sharded), state)
            if fabric.is_global_zero:
                prune_step_states(out_dir, keep=2)
            fabric.barrier()
    summary = f"done: {state['step']} steps, {state['tokens']:,} tokens, {state['units']:,} {unit_name}"
    if "val_loss" in results:
        summary += f", final val loss {results['val_loss']:.4f}"
    fabric.print(summary)
    return {"step": state["step"], "tokens": state["tokens"], "units": state["units"], **results}


@torch.no_grad()
def validate(fabric, model: nn.Module, batches: Iterable, max_iters: int, loss_fn: LossFn = next_token_loss,
             count_fn: CountFn = count_target_tokens) -> dict[str, float]:
    """``{"val_loss", "val_<metric>"...}`` per unit over at most ``max_iters`` batches, all processes together:
    the same definition as the training loss."""
    was_training = model.training
    model.eval()
    count = torch.zeros((), dtype=torch.float64, device=fabric.device)
    totals: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        if i >= max_iters:
            break
        batch = fabric.to_device(batch)
        count += torch.as_tensor(count_fn(batch), dtype=torch.float64, device=fabric.device)
        loss_sum, metrics = loss_fn(model, batch)
        for k, v in {"loss": loss_sum, **metrics}.items():
            totals[k] = totals.get(k, 0.0) + v.detach().double()
    model.train(was_training)
    if not totals:
        return {}
    sums = fabric.all_reduce(torch.stack([count, *totals.values()]), op="sum")
    return {f"val_{k}": (v / sums[0].clamp(min=1)).item() for k, v in zip(totals, sums[1:])}


def _validate_and_log(fabric, model: nn.Module, val_loader, evaluators: Sequence[Evaluator], loss_fn: LossFn,
                      count_fn: CountFn, eval: EvalArgs, state: dict, perplexity: bool = True) -> dict[str, float]:
    t0 = time.perf_counter()
    step, results = state["step"], {}
    if val_loader is not None:
        results = validate(fabric, model, val_loader, eval.max_iters, loss_fn, count_fn)
        if "val_loss" in results and perplexity:  # a per-token loss (not e.g. DPO's per-pair loss)
            results["val_ppl"] = math.exp(min(results["val_loss"], 50))
    if evaluators:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for evaluator in evaluators:
                results.update(evaluator(fabric, model, step) or {})  # None: it only printed
        model.train(was_training)
    if results:
        fabric.log_dict({"tokens": state["tokens"], **results}, step=step)
        shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in results.items())
        fabric.print(f"step {step}: {shown} ({time.perf_counter() - t0:.1f}s)")
    return results


def _epoch(loader) -> float | None:
    """Passes over the training data so far (a loader that counts batches per epoch), else None."""
    if hasattr(loader, "batches_yielded") and hasattr(loader, "__len__") and len(loader):
        return loader.epoch + loader.batches_yielded / len(loader)
    return None
