"""The language-model side of the loop's contract (`litmodel.training.fit`): the next-token loss as a sum
(``loss_fn``), the loss units of a micro-batch (``count_fn``: target tokens) and the tokens it reads
(``tokens_fn``), plus the router load-balancing term of mixture-of-experts models."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from litmodel.llama import router_aux_loss

IGNORE_INDEX = -100  # label of positions that are not trained on (prompt, padding); F.cross_entropy's default

# The recipe's side of the loop's contract (see `fit`)
LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]
CountFn = Callable[[Any], "int | torch.Tensor"]


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
