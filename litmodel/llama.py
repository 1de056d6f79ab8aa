"""The Llama family in one file: Llama 2/3.x, Mistral, Qwen2.5, TinyLlama, SmolLM2.

RMSNorm -> grouped-query attention with rotary positions -> residual -> RMSNorm -> SwiGLU MLP -> residual.
Options from the config: qkv bias (Qwen2), tied embeddings (SmolLM2, Llama 3.2), Llama 3.1 RoPE
frequency scaling, and a sliding attention window (Mistral v0.1).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from litmodel.config import Config
from litmodel.layers import CausalSelfAttention, build_mask, init_gpt2_style, rope_cos_sin, rope_inv_freq


class Llama(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
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
        if positions is None:
            positions = input_pos if input_pos is not None else torch.arange(T, device=idx.device)
        if input_pos is None and T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's block_size {self.config.block_size}")
        inv_freq = rope_inv_freq(self.config.rope_n_elem, self.config.rope_base, self.config.rope_scaling, idx.device)
        cos, sin = rope_cos_sin(inv_freq, positions)
        mask = build_mask(T, input_pos, self.cache_len, self.config.sliding_window, mask, idx.device)
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x, cos, sin, mask, input_pos)
        return self.lm_head(self.norm_f(x))

    def set_kv_cache(self, batch_size: int, max_seq_length: int | None = None, device=None, dtype=None) -> None:
        """Allocate a static KV cache in every block (default length: the model's block_size)."""
        self.cache_len = max_seq_length or self.config.block_size
        device = device or self.lm_head.weight.device
        dtype = dtype or self.lm_head.weight.dtype
        for block in self.blocks:
            block.attn.set_kv_cache(batch_size, self.cache_len, device, dtype)

    def clear_kv_cache(self) -> None:
        self.cache_len = None
        for block in self.blocks:
            block.attn.kv_cache = None

    def init_weights(self) -> None:
        init_gpt2_style(self, self.config.n_layer)


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.n_query_groups, config.head_size,
                                        qkv_bias=config.attn_bias or config.bias, proj_bias=config.bias)
        self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config.n_embd, config.intermediate_size, config.bias)

    def forward(self, x, cos, sin, mask, input_pos):
        x = x + self.attn(self.norm_1(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.norm_2(x))


class SwiGLU(nn.Module):
    """proj(silu(gate(x)) * up(x)), with gate and up fused in one matrix: rows [gate; up]."""

    def __init__(self, n_embd: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 2 * intermediate_size, bias=bias)
        self.proj = nn.Linear(intermediate_size, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class RMSNorm(nn.Module):
    """Normalise by the root mean square in float32, then scale (as Llama does)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f = x.float()
        x_f = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_f.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
