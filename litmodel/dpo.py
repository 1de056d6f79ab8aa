"""Direct preference optimisation (DPO): the loss and the quantities TRL users read.

The formulas follow the DPO paper (Rafailov et al., 2023) and TRL's ``DPOTrainer``. For a pair
(prompt x, chosen y_w, rejected y_l), with ``log pi(y|x)`` the sum of the answer tokens' log-probs:

    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]

* ``sigmoid`` (DPO; with ``label_smoothing`` eps, the conservative DPO of Mitchell 2023 / cDPO):
  ``loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)``
* ``ipo`` (Azar et al., 2023): ``loss = (h - 1 / (2 * beta)) ** 2``, where, as in TRL, the log-probs
  are averaged over each answer's tokens instead of summed.

Rewards (logged, never differentiated): ``chosen = beta * (log pi(y_w|x) - log ref(y_w|x))``,
``rejected`` likewise; reward accuracy is the fraction of pairs with chosen > rejected, and the
margin is chosen - rejected. The log-probs used by the loss (sums for sigmoid, means for IPO) are
also the ones the rewards and ``logps/*`` metrics report, as in TRL.

Batch layout: a batch of ``B`` pairs is one forward of ``2B`` rows, the chosen answers first
(rows ``0..B-1``), then the rejected ones (rows ``B..2B-1``), with already-shifted labels that are
``-100`` everywhere but on answer tokens (see `litmodel.data.preference`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from litmodel.data.preference import collate_pairs
from litmodel.lora import disable_adapters
from litmodel.losses import IGNORE_INDEX
from litmodel.utils import LitModelError

LOSS_TYPES = ("sigmoid", "ipo")
# the per-pair quantities, summed over pairs by `dpo_batch_sums` (the training loop divides by the pair count)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


@dataclass
class DPOArgs:
    """DPO hyperparameters (``--dpo.*``).

    Args:
        beta: Strength of the KL penalty towards the reference model (TRL's beta); larger keeps the policy closer.
        loss: sigmoid (the DPO loss) or ipo (identity preference optimisation, on length-averaged log-probs).
        label_smoothing: Probability that a preference label is flipped (conservative DPO); 0 is plain DPO.
            sigmoid loss only.
        precompute_reference: Compute the reference model's log-probs once, in one pass before training, instead
            of running the reference model at every step. Full finetuning then needs no second copy of the model;
            with LoRA the reference is the base with adapters disabled, so it saves compute, not memory.
    """

    beta: float = 0.1
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0
    precompute_reference: bool = False

    def check(self) -> None:
        if not self.beta > 0:
            raise LitModelError(f"--dpo.beta must be > 0, got {self.beta}; 0.1 is the usual value")
        if self.loss not in LOSS_TYPES:
            raise LitModelError(f"unknown --dpo.loss {self.loss!r}; choose {' or '.join(LOSS_TYPES)}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise LitModelError(f"--dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise LitModelError("--dpo.label_smoothing applies to the sigmoid loss only; drop it for --dpo.loss ipo")


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the answer tokens' log-probs, number of answer tokens) per row of (N, T, V) logits and
    already-shifted (N, T) labels (``-100`` off the answer). Computed in float32."""
    token_logps = -F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none").view(labels.shape)
    mask = labels != IGNORE_INDEX
    return (token_logps * mask).sum(-1), mask.sum(-1)


def loss_logps(logps_sum: torch.Tensor, n_tokens: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The sequence log-probs a loss works on: sums (sigmoid) or per-token means (ipo, as TRL)."""
    return logps_sum / n_tokens.clamp(min=1) if loss_type == "ipo" else logps_sum


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair (losses, chosen rewards, rejected rewards), each of shape (B,), from sequence log-probs
    (already averaged for ipo: see `loss_logps`). Rewards are detached."""
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    h = chosen_logratio - rejected_logratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise LitModelError(f"unknown DPO loss {loss_type!r}; choose {' or '.join(LOSS_TYPES)}")
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                 policy_chosen: torch.Tensor, policy_rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair values of the logged quantities (TRL's names), each of shape (B,)."""
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy_chosen.detach(),
        "logps/rejected": policy_rejected.detach(),
    }


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) halves of a (2B, ...) tensor laid out chosen rows first."""
    n = x.shape[0] // 2
    return x[:n], x[n:]


def dpo_batch_sums(policy_logps: torch.Tensor, policy_tokens: torch.Tensor, ref_logps: torch.Tensor,
                   beta: float, loss_type: str = "sigmoid",
                   label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(sum of the pair losses, sums of the `METRICS` over the pairs) of one batch.

    ``policy_logps``, ``policy_tokens``, ``ref_logps``: (2B,) answer log-prob sums, answer token counts and the
    reference's log-prob sums, chosen rows first. Sums (not means) so a training loop can normalise by the pair
    count of the whole global batch.
    """
    policy = split_pairs(loss_logps(policy_logps, policy_tokens, loss_type))
    ref = split_pairs(loss_logps(ref_logps.to(policy_logps.dtype), policy_tokens, loss_type))
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy[0], policy[1], ref[0], ref[1], beta, loss_type,
                                                       label_smoothing)
    metrics = pair_metrics(chosen_rewards, rejected_rewards, policy[0], policy[1])
    return losses.sum(), {k: v.sum() for k, v in metrics.items()}


# ---- the recipe's side of the training loop ------------------------------------------------------
def count_pairs(batch: dict) -> int:
    """`count_fn` of DPO: the pairs of a micro-batch (its rows are chosen + rejected)."""
    return batch["input_ids"].shape[0] // 2


class DPOObjective:
    """`loss_fn(model, batch) -> (sum of the pair losses, sums of the METRICS)` of DPO for the shared loop.

    The reference log-probs come from, in order: the batch (``ref_logps``, precomputed), ``ref_model`` (a frozen
    copy, full finetuning), or the policy itself with its LoRA adapters disabled (no second copy). The reference
    forward runs first, without gradients, on the unwrapped module (no DDP hooks; FSDP still gathers its shards),
    under ``autocast`` (the Fabric's precision context).
    """

    def __init__(self, args: DPOArgs, ref_model: Optional[nn.Module] = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        args.check()
        self.args, self.ref_model, self.autocast = args, ref_model, autocast

    @torch.no_grad()
    def reference_logps(self, model: nn.Module, batch: dict) -> torch.Tensor:
        if batch.get("ref_logps") is not None:
            return batch["ref_logps"]
        with self.autocast():
            if self.ref_model is not None:
                logits = self.ref_model(batch["input_ids"])
            else:
                with disable_adapters(model):
                    logits = getattr(model, "module", model)(batch["input_ids"])
        return answer_logps(logits, batch["labels"])[0]

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ref = self.reference_logps(model, batch)
        logps, n_tokens = answer_logps(model(batch["input_ids"]), batch["labels"])
        a = self.args
        return dpo_batch_sums(logps, n_tokens, ref, a.beta, a.loss, a.label_smoothing)


@torch.no_grad()
def precompute_reference(fabric, objective: DPOObjective, model: nn.Module, dataset, batch_size: int,
                         pad_id: int) -> torch.Tensor:
    """The reference log-prob sums (len(dataset), 2) = (chosen, rejected) of every pair, in one pass split over
    the processes (every process runs the same number of batches, as FSDP needs), then summed across them.
    Run it before training (or before loading a resumed state): ``model`` must still be the reference."""
    n, world, rank = len(dataset), fabric.world_size, fabric.global_rank
    per_rank = -(-n // world)
    mine = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    out = torch.zeros(n, 2, dtype=torch.float64, device=fabric.device)
    was_training, saved = model.training, dataset.reference
    model.eval()
    dataset.reference = None
    n_batches = -(-per_rank // batch_size)
    t0, shown = time.perf_counter(), 0
    try:
        for b in range(n_batches):
            if time.perf_counter() - t0 > 10 * (shown + 1):  # long passes show progress
                shown += 1
                fabric.print(f"reference log-probs: batch {b}/{n_batches} per process "
                             f"({time.perf_counter() - t0:.0f}s)")
            idx = mine[b * batch_size:(b + 1) * batch_size]
            batch = fabric.to_device(collate_pairs([dataset[i] for i in (idx or [0])], pad_id))
            logps = objective.reference_logps(model, batch).double()
            if idx:  # a rank without pairs left still runs the forward (FSDP collectives), and discards it
                chosen, rejected = split_pairs(logps)
                out[idx, 0], out[idx, 1] = chosen, rejected
    finally:
        model.train(was_training)
        dataset.reference = saved
    return fabric.all_reduce(out, op="sum").float().cpu()
