"""The Gemma family in one file: Gemma 2 and Gemma 3 (text).

Embeddings scaled by sqrt(n_embd) -> per block: RMSNorm -> attention -> RMSNorm -> residual, then
RMSNorm -> GeGLU MLP (tanh GELU) -> RMSNorm -> residual (norms before *and* after each sub-layer)
-> final RMSNorm -> tied output head. Gemma's RMSNorm scales by (1 + weight). Attention scores are
scaled by 1/sqrt(query_pre_attn_scalar); layers alternate between a sliding window and global
attention (`config.layer_types`). Gemma 2 soft-caps the attention scores and the final logits with
tanh; Gemma 3 instead normalises each q and k head and gives its sliding-window layers their own,
unscaled RoPE base (`rope_local_base`) while the global layers may use linear RoPE scaling.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from litmodel.config import Config
from litmodel.layers import (CausalSelfAttention, KVCacheMixin, RMSNorm, build_mask, init_gpt2_style, rope_cos_sin,
                             rope_inv_freq)
from litmodel.llama import SwiGLU


class Gemma(KVCacheMixin, nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.n_embd, config.norm_eps, unit_offset=True)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.cache_len: int | None = None

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, padded_vocab_size); arguments as in `litmodel.llama.Llama.forward`."""
        B, T = idx.shape
        c = self.config
        if positions is None:
            positions = input_pos if input_pos is not None else torch.arange(T, device=idx.device)
        if input_pos is None and T > c.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's block_size {c.block_size}")
        rope = {None: rope_cos_sin(rope_inv_freq(c.rope_n_elem, c.rope_base, c.rope_scaling, idx.device), positions)}
        if c.rope_local_base is not None:  # Gemma 3: the sliding-window layers' own base, never scaled
            rope["local"] = rope_cos_sin(rope_inv_freq(c.rope_n_elem, c.rope_local_base, None, idx.device), positions)
        masks = {w: build_mask(T, input_pos, self.cache_len, w, mask, idx.device)
                 for w in {block.window for block in self.blocks}}
        x = self.wte(idx)
        x = x * torch.tensor(math.sqrt(c.n_embd), dtype=x.dtype)  # rounded to the model dtype, as Gemma does
        for block in self.blocks:
            cos, sin = rope["local" if block.window is not None and "local" in rope else None]
            x = block(x, cos, sin, masks[block.window], input_pos)
        logits = self.lm_head(self.norm_f(x))
        if c.final_softcap is not None:
            logits = torch.tanh(logits / c.final_softcap) * c.final_softcap
        return logits

    def init_weights(self) -> None:
        init_gpt2_style(self, self.config.n_layer)  # the (1 + w) norms start at w = 0


class Block(nn.Module):
    def __init__(self, config: Config, index: int) -> None:
        super().__init__()
        eps = config.norm_eps
        scalar = config.query_pre_attn_scalar or config.head_size
        self.norm_1 = RMSNorm(config.n_embd, eps, unit_offset=True)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.n_query_groups, config.head_size,
                                        qkv_bias=config.attn_bias, proj_bias=False, qk_norm=config.qk_norm,
                                        norm_eps=eps, norm_offset=True, scale=scalar**-0.5,
                                        softcap=config.attn_softcap)
        self.post_attn_norm = RMSNorm(config.n_embd, eps, unit_offset=True)
        self.norm_2 = RMSNorm(config.n_embd, eps, unit_offset=True)
        self.mlp = SwiGLU(config.n_embd, config.intermediate_size, bias=False, activation="gelu_tanh")
        self.post_mlp_norm = RMSNorm(config.n_embd, eps, unit_offset=True)
        self.window = config.layer_window(index)

    def forward(self, x, cos, sin, mask, input_pos):
        x = x + self.post_attn_norm(self.attn(self.norm_1(x), cos, sin, mask, input_pos))
        return x + self.post_mlp_norm(self.mlp(self.norm_2(x)))
