"""Speculative decoding: a small draft model proposes ``k`` tokens, the target model checks them in one
forward pass (batch 1).

Per round: the draft samples d_1..d_k one at a time from its distributions q_1..q_k; the target runs on
[last token, d_1..d_k] at once and gives p_1..p_{k+1}. Draft token d_i is accepted with probability
min(1, p_i(d_i) / q_i(d_i)) (greedy: when it is the target's argmax); at the first rejection the token
is drawn from norm(max(0, p_i - q_i)) (greedy: the target's argmax) and the round ends; when all k are
accepted a bonus token is drawn from p_{k+1}. This keeps the output distribution exactly the target's
(Leviathan et al. 2023, Chen et al. 2023); greedy output is the target's greedy output.

Both models keep static KV caches; a rejected suffix is not erased but overwritten later (the causal
mask never lets a query see a slot past its own position).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from litmodel.generate import ensure_kv_cache, model_device
from litmodel.sampling import sampling_probs
from litmodel.utils import LitModelError


@dataclass
class SpeculativeStats:
    """Counts of one speculative generation: ``accepted / proposed`` is the acceptance rate."""

    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else float("nan")


def check_draft(target_config, draft_config, k: int) -> None:
    """One-line errors for a draft that cannot draft for this target, or a bad ``k``."""
    if k < 1:
        raise LitModelError(f"--speculative_k must be >= 1 (draft tokens per round), got {k}")
    if target_config.vocab_size != draft_config.vocab_size:
        raise LitModelError(f"the draft model's vocabulary ({draft_config.vocab_size} tokens) differs from the "
                            f"target's ({target_config.vocab_size}); use a draft with the target's tokenizer")


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, drafted: torch.Tensor, generator: torch.Generator | None
                       ) -> tuple[int, int]:
    """The acceptance rule for one round: ``p`` (k+1, V) target probabilities, ``q`` (k, V) draft
    probabilities, ``drafted`` (k,) draft tokens. Returns (number accepted n, the next token): the
    resampled token at position n when n < k, else the bonus token drawn from p[k]."""
    k = drafted.numel()
    ar = torch.arange(k, device=p.device)
    p_d, q_d = p[ar, drafted], q[ar, drafted]
    u = torch.rand(k, generator=generator, device=p.device)
    ok = (u * q_d <= p_d).tolist()  # u < p/q, without dividing by a zero q (a sampled token has q > 0)
    n = 0
    while n < k and ok[n]:
        n += 1
    if n < k:
        residual = (p[n] - q[n]).clamp(min=0)
        total = residual.sum()
        dist = residual / total if total > 0 else p[n]  # p == q: any token of p (never reached in exact math)
    else:
        dist = p[k]
    return n, int(torch.multinomial(dist, 1, generator=generator))


def _draft_probs(logits: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    return sampling_probs(logits, temperature, top_k, top_p)


@torch.inference_mode()
def speculative_generate(target: nn.Module, draft: nn.Module, prompt_ids: Sequence[int], max_new_tokens: int, *,
                         k: int = 4, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                         stop_tokens: Sequence[int] = (), generator: torch.Generator | None = None,
                         include_stop: bool = False, stats: SpeculativeStats | None = None) -> Iterator[int]:
    """Generate for one prompt with speculative decoding, yielding token ids as they are accepted.

    Same contract as `litmodel.generate.generate` (stops after ``max_new_tokens`` or at a stop token,
    ``temperature=0`` is greedy); ``stats`` (optional) is filled with the acceptance counts.
    """
    if k < 1:
        raise LitModelError(f"--speculative_k must be >= 1, got {k}")
    if max_new_tokens <= 0:
        return
    stats = stats if stats is not None else SpeculativeStats()
    device = model_device(target)
    greedy = temperature <= 0
    stop = set(int(t) for t in stop_tokens)
    seq = [int(t) for t in prompt_ids]
    if not seq:
        raise LitModelError("the prompt needs at least one token")
    S = len(seq) + max_new_tokens + k + 1  # a round may write k + 1 slots past the last accepted token
    for m in (target, draft):
        ensure_kv_cache(m, 1, S)
    t_valid = d_valid = 0  # how many tokens of `seq` each model's cache holds
    produced = 0

    def forward(model: nn.Module, ids: list[int], start: int) -> torch.Tensor:
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        return model(idx, torch.arange(start, start + len(ids), device=device))[0]  # (T, V)

    while True:
        # draft: catch up on the tokens it has not seen, then propose k tokens one by one
        logits = forward(draft, seq[d_valid:], d_valid)[-1]
        d_valid = len(seq)
        drafted, qs = [], []
        for i in range(k):
            if greedy:
                tok = int(logits.argmax())
            else:
                q = _draft_probs(logits, temperature, top_k, top_p)
                tok = int(torch.multinomial(q, 1, generator=generator))
                qs.append(q)
            drafted.append(tok)
            if i < k - 1:
                logits = forward(draft, [tok], d_valid + i)[-1]
        # target: check all k in one pass (its cache holds all of seq but the last token)
        t_logits = forward(target, seq[t_valid:] + drafted, t_valid)[-(k + 1):]  # (k+1, V)
        if greedy:
            best = t_logits.argmax(-1).tolist()
            n = 0
            while n < k and drafted[n] == best[n]:
                n += 1
            nxt = best[n]
        else:
            p = _draft_probs(t_logits, temperature, top_k, top_p)
            n, nxt = accept_or_resample(p, torch.stack(qs), torch.tensor(drafted, device=device), generator)
        stats.rounds += 1
        stats.proposed += k
        stats.accepted += n
        new = drafted[:n] + [nxt]
        t_valid = len(seq) + n  # the target processed seq[-1] and the n accepted drafts
        d_valid = len(seq) + min(n, k - 1)  # the draft never fed its own last proposal
        for tok in new:
            if tok in stop:
                if include_stop:
                    stats.tokens += 1
                    yield tok
                return
            seq.append(tok)
            produced += 1
            stats.tokens += 1
            yield tok
            if produced >= max_new_tokens:
                return
