"""The GPT family in one file: GPT-2 and GPT-NeoX (Pythia).

GPT-2: learned absolute positions, LayerNorm, tanh-GELU MLP, biases everywhere, tied embeddings.
GPT-NeoX: rotary positions on part of each head, parallel residual (attention and MLP both read
the block's input), untied output head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from litmodel.config import Config
from litmodel.layers import (CausalSelfAttention, KVCacheMixin, build_mask, init_gpt2_style, rope_cos_sin,
                             rope_inv_freq)


class GPT(KVCacheMixin, nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.learned_pos_emb else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.cache_len: int | None = None

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, padded_vocab_size); arguments as in `litmodel.llama.Llama.forward`."""
        B, T = idx.shape
        if positions is None:
            positions = input_pos if input_pos is not None else torch.arange(T, device=idx.device)
        if input_pos is None and T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's block_size {self.config.block_size}")
        x = self.wte(idx)
        cos = sin = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            inv_freq = rope_inv_freq(self.config.rope_n_elem, self.config.rope_base, device=idx.device)
            cos, sin = rope_cos_sin(inv_freq, positions)
        mask = build_mask(T, input_pos, self.cache_len, self.config.sliding_window, mask, idx.device)
        for block in self.blocks:
            x = block(x, cos, sin, mask, input_pos)
        return self.lm_head(self.norm_f(x))

    def init_weights(self) -> None:
        init_gpt2_style(self, self.config.n_layer)


class Block(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.n_query_groups, config.head_size,
                                        qkv_bias=config.bias, proj_bias=config.bias)
        self.norm_2 = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.parallel_residual = config.parallel_residual

    def forward(self, x, cos, sin, mask, input_pos):
        attn_out = self.attn(self.norm_1(x), cos, sin, mask, input_pos)
        if self.parallel_residual:
            return x + attn_out + self.mlp(self.norm_2(x))
        x = x + attn_out
        return x + self.mlp(self.norm_2(x))


class MLP(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))
