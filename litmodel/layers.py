"""The few pieces both model files share: rotary embeddings, the KV cache and causal attention.

Kept here once so that `gpt.py` and `llama.py` each read as one model, top to bottom.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- rotary position embedding (the "rotate half" layout Hugging Face checkpoints use) ----------
def rope_inv_freq(n_elem: int, base: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """Inverse frequencies of the rotated dims; ``scaling`` applies Llama 3.1's frequency rescaling."""
    inv_freq = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.int64, device=device).float() / n_elem))
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_seq_len"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape ``(*positions.shape, 2 * len(inv_freq))`` in float32."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.size(-1)`` dims of every head of ``x`` (B, heads, T, head_size)."""
    if cos.dim() == 3:  # per-sequence positions (B, T, n): broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    n = cos.size(-1)
    x_rot, x_pass = x[..., :n], x[..., n:]
    x1, x2 = x_rot[..., : n // 2], x_rot[..., n // 2 :]
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.size(-1) else rotated


# ---- KV cache and attention ----------------------------------------------------------------------
class KVCache(nn.Module):
    """A static cache of keys and values: (batch, kv_heads, max_seq_length, head_size)."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_seq_length: int, head_size: int,
                 device=None, dtype=None) -> None:
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_length, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


def build_mask(T: int, input_pos: torch.Tensor | None, cache_len: int | None, sliding_window: int | None,
               mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """The boolean attention mask (True = attend), or None when plain causal attention suffices.

    Queries sit at cache slots ``input_pos`` (or 0..T-1 without a cache); keys at slots 0..S-1.
    A key is visible if it is not in the future, within the sliding window (HF: kv > q - window),
    and allowed by the caller's ``mask`` (padding, or packed sequences).
    """
    if input_pos is None and mask is None and (sliding_window is None or T <= sliding_window):
        return None
    q_pos = input_pos if input_pos is not None else torch.arange(T, device=device)
    k_pos = torch.arange(cache_len if input_pos is not None else T, device=device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        allowed = allowed & (k_pos[None, :] > q_pos[:, None] - sliding_window)
    allowed = allowed[None, None]
    return allowed if mask is None else allowed & mask


def _single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per head (a decode step) as two small matmuls and a softmax, for
    `torch.compile` on CPU: the fused SDPA kernel costs ~0.2-0.3 ms per call there (a quarter of a
    decode step of a 135M model), these ~0.03 ms. Same math as SDPA: float32 scores scaled by
    1/sqrt(hs), masked softmax, weighted sum of the values; grouped-query heads share their k/v."""
    B, H, _, hs = q.shape
    G, S = k.size(1), k.size(2)
    qf = q.float().view(B, G, H // G, hs)
    scores = torch.matmul(qf, k.float().transpose(-1, -2)) * (1.0 / math.sqrt(hs))  # (B, G, H/G, S)
    scores = scores.masked_fill(~mask.view(mask.size(0), 1, 1, S), float("-inf"))
    y = torch.matmul(torch.softmax(scores, dim=-1), v.float())  # (B, G, H/G, hs)
    return y.view(B, H, 1, hs).to(q.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, H, T, hs) queries against (B, G, S, hs) keys/values, G dividing H (grouped-query attention)."""
    if (q.size(2) == 1 and mask is not None and q.device.type == "cpu" and mask.dtype == torch.bool
            and torch.compiler.is_compiling()):
        return _single_query_attention(q, k, v, mask.expand(q.size(0), 1, 1, k.size(2)))
    gqa = q.size(1) != k.size(1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with fused q, k, v rows [all q heads; all k heads; all v heads].

    Both families use it; they differ only in biases and in how many head dims are rotated.
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_heads: int, head_size: int, qkv_bias: bool,
                 proj_bias: bool) -> None:
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_size = n_head, n_kv_heads, head_size
        self.qkv = nn.Linear(n_embd, (n_head + 2 * n_kv_heads) * head_size, bias=qkv_bias)
        self.proj = nn.Linear(n_head * head_size, n_embd, bias=proj_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                mask: torch.Tensor | None, input_pos: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_size, self.n_kv_heads * self.head_size
        q, k, v = self.qkv(x).split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_size).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_size).transpose(1, 2)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call model.set_kv_cache(...) first")
            k, v = self.kv_cache.update(input_pos, k, v)
        y = causal_attention(q, k, v, mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, q_size))

    def set_kv_cache(self, batch_size: int, max_seq_length: int, device=None, dtype=None) -> None:
        self.kv_cache = KVCache(batch_size, self.n_kv_heads, max_seq_length, self.head_size, device, dtype)


def init_gpt2_style(model: nn.Module, n_layer: int, std: float = 0.02) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, unit norms, and the residual
    projections (`*.proj`) scaled by 1/sqrt(2 * n_layer) so the residual stream keeps its scale."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            scale = 1 / math.sqrt(2 * n_layer) if name.endswith(".proj") else 1.0
            nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "reset_parameters") and not list(module.children()):
            module.reset_parameters()  # LayerNorm / RMSNorm: ones (and zero bias)
