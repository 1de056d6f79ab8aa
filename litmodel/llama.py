"""The Llama family in one file: Llama 2/3.x, Mistral, Qwen2.5/3, Qwen3-MoE, Mixtral, Phi-3/4-mini, OLMo 2,
SmolLM2/3, TinyLlama.

RMSNorm -> grouped-query attention with rotary positions -> residual -> RMSNorm -> SwiGLU MLP -> residual.
Options from the config: qkv bias (Qwen2), tied embeddings, RoPE scaling (Llama 3.1, Phi's LongRoPE),
partial rotary (Phi-4-mini), a sliding attention window (Mistral v0.1, Phi-3), q/k RMSNorm per head
(Qwen3) or over the whole projections (OLMo 2), norms after attention and MLP instead of before
(OLMo 2), layers without rotary embedding (SmolLM3), and a mixture-of-experts MLP (Mixtral, Qwen3-MoE).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from litmodel.config import Config
from litmodel.layers import (CausalSelfAttention, KVCacheMixin, RMSNorm, build_mask, grouped_mm, init_gpt2_style,
                             rope_cos_sin, rope_inv_freq)

__all__ = ["Block", "GroupedLinear", "Llama", "MoE", "RMSNorm", "SwiGLU", "router_aux_loss"]


class Llama(KVCacheMixin, nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.cache_len: int | None = None

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, padded_vocab_size) for token ids ``idx`` (B, T).

        ``input_pos`` (T,): the KV-cache slots these tokens are written to (generation).
        ``positions`` (T,) or (B, T): rotary positions, when they differ from the slots
        (left-padded batches, packed sequences). ``mask``: extra boolean mask, broadcastable
        to (B, 1, T, S), ANDed with the causal mask.
        """
        B, T = idx.shape
        c = self.config
        if positions is None:
            positions = input_pos if input_pos is not None else torch.arange(T, device=idx.device)
        if input_pos is None and T > c.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's block_size {c.block_size}")
        cos, sin = rope_for(c.rope_n_elem, c.rope_base, c.rope_scaling, positions)
        masks = {w: build_mask(T, input_pos, self.cache_len, w, mask, idx.device)
                 for w in {block.window for block in self.blocks}}
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, cos, sin, masks[block.window], input_pos)
        return self.lm_head(self.norm_f(x))

    def init_weights(self) -> None:
        init_gpt2_style(self, self.config.n_layer)


def rope_for(n_elem: int, base: float, scaling: dict | None,
             positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for ``positions``. LongRoPE picks its long factors when the furthest position is past the
    original context (as transformers does, per forward call) and scales cos/sin by its attention factor."""
    if scaling is not None and scaling.get("rope_type") == "longrope":
        seq_len = int(positions.max()) + 1
        inv_freq = rope_inv_freq(n_elem, base, scaling, positions.device, seq_len=seq_len)
        cos, sin = rope_cos_sin(inv_freq, positions)
        return cos * scaling["attention_factor"], sin * scaling["attention_factor"]
    return rope_cos_sin(rope_inv_freq(n_elem, base, scaling, positions.device), positions)


class Block(nn.Module):
    def __init__(self, config: Config, index: int = 0) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.n_query_groups, config.head_size,
                                        qkv_bias=config.attn_bias or config.bias, proj_bias=config.bias,
                                        qk_norm=config.qk_norm, norm_eps=config.norm_eps)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MoE(config) if config.n_expert else SwiGLU(config.n_embd, config.intermediate_size, config.bias)
        self.post_norm = config.post_norm  # OLMo 2: the norms sit after attention and MLP
        self.use_rope = index not in (config.nope_layers or ())  # SmolLM3's NoPE layers
        self.window = config.layer_window(index)

    def forward(self, x, cos, sin, mask, input_pos):
        if not self.use_rope:
            cos = sin = None
        if self.post_norm:
            x = x + self.norm_1(self.attn(x, cos, sin, mask, input_pos))
            return x + self.norm_2(self.mlp(x))
        x = x + self.attn(self.norm_1(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.norm_2(x))


class SwiGLU(nn.Module):
    """proj(act(gate(x)) * up(x)), with gate and up fused in one matrix: rows [gate; up].
    ``activation`` "silu" (SwiGLU) or "gelu_tanh" (GeGLU: Gemma)."""

    def __init__(self, n_embd: int, intermediate_size: int, bias: bool, activation: str = "silu") -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 2 * intermediate_size, bias=bias)
        self.proj = nn.Linear(intermediate_size, n_embd, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        gate = F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")
        return self.proj(gate * up)


class GroupedLinear(nn.Module):
    """One (out, in) matrix per expert, stacked as ``weight`` (n_expert, out, in). Applied to rows sorted
    by expert, ``counts[e]`` rows for expert e, as one grouped matmul (`layers.grouped_mm`)."""

    def __init__(self, n_expert: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(n_expert, out_features, in_features))
        self.reset_parameters()

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return grouped_mm(x, self.weight, counts)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)


class MoE(nn.Module):
    """A mixture of SwiGLU experts (Mixtral, Qwen3-MoE).

    The router picks each token's top-k experts by softmax probability (renormalised to sum to 1 when
    ``norm_topk_prob``); the (token, expert) pairs are sorted by expert so that each expert's rows are
    contiguous, every expert runs as one grouped matmul, and the outputs are weighted and summed back
    per token. ``fc`` holds each expert's rows [gate; up], ``proj`` its down projection.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.n_expert, self.top_k = config.n_expert, config.n_expert_per_token
        self.norm_topk_prob = config.norm_topk_prob
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.fc = GroupedLinear(config.n_expert, config.n_embd, 2 * config.moe_intermediate_size)
        self.proj = GroupedLinear(config.n_expert, config.moe_intermediate_size, config.n_embd)
        self.router_logits: torch.Tensor | None = None  # of the last training forward, for `router_aux_loss`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x)
        self.router_logits = logits if self.training else None
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // self.top_k  # the token of each sorted (token, expert) pair
        counts = torch.bincount(flat, minlength=self.n_expert)
        gate, up = self.fc(x[token], counts).chunk(2, dim=-1)
        y = self.proj(F.silu(gate) * up, counts) * weights.reshape(-1)[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, y).view(shape)


def router_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The router load-balancing loss of the last training forward, as transformers computes it
    (`load_balancing_loss_func`, Switch Transformer eqs. 4-6, all layers pooled):
    ``n_expert * sum_e f_e * P_e``, f_e the share of top-k assignments that went to expert e and
    P_e its mean router probability. None for a model without experts (or after an eval forward).
    Padding is not excluded (transformers' default, without an attention mask)."""
    moes = [m for m in model.modules() if isinstance(m, MoE) and m.router_logits is not None]
    if not moes:
        return None
    n_expert, k = moes[0].n_expert, moes[0].top_k
    assigned = probs = 0.0
    rows = 0
    for m in moes:
        p = torch.softmax(m.router_logits.float(), dim=-1)
        chosen = p.topk(k, dim=-1).indices.reshape(-1)
        assigned = assigned + torch.bincount(chosen, minlength=n_expert).float()
        probs = probs + p.sum(dim=0)
        rows += p.size(0)
    return n_expert * torch.sum((assigned / rows) * (probs / rows))
