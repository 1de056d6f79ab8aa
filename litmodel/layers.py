"""The few pieces the model files share: rotary embeddings, the KV cache, RMSNorm and causal attention.

Kept here once so that `gpt.py`, `llama.py` and `gemma.py` each read as one model, top to bottom.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- rotary position embedding (the "rotate half" layout Hugging Face checkpoints use) ----------
def rope_inv_freq(n_elem: int, base: float, scaling: dict | None = None, device=None,
                  seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies of the rotated dims. ``scaling`` by its ``rope_type``: "llama3" (the default:
    Llama 3.1's frequency rescaling), "linear" (positions divided by ``factor``) or "longrope" (Phi-3:
    per-dim factors, the long ones once ``seq_len`` exceeds the original context, as transformers does)."""
    exponents = torch.arange(0, n_elem, 2, dtype=torch.int64, device=device).float() / n_elem
    rope_type = (scaling or {}).get("rope_type", "llama3")
    if scaling is not None and rope_type == "longrope":
        long = seq_len is not None and seq_len > scaling["original_max_seq_len"]
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32, device=device)
        return 1.0 / (ext * base**exponents)
    inv_freq = 1.0 / (base**exponents)
    if scaling is None:
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
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


class KVCacheMixin:
    """``set_kv_cache`` / ``clear_kv_cache`` of a model with ``config``, ``lm_head`` and ``blocks`` whose
    ``attn`` is a `CausalSelfAttention`. Sliding-window layers keep every position too: their mask
    hides the keys that left the window."""

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


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          scale: float, softcap: float) -> torch.Tensor:
    """Gemma 2's attention: scores squashed to (-softcap, softcap) by tanh before the softmax (SDPA has
    no hook for that), computed as transformers' eager path does: softmax in float32."""
    H, G = q.size(1), k.size(1)
    k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        T = q.size(2)
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """(B, H, T, hs) queries against (B, G, S, hs) keys/values, G dividing H (grouped-query attention).

    ``scale`` defaults to 1/sqrt(hs); ``softcap`` (Gemma 2) caps the scores with tanh."""
    if softcap is not None:
        return _softcapped_attention(q, k, v, mask, scale or 1.0 / math.sqrt(q.size(-1)), softcap)
    if (q.size(2) == 1 and mask is not None and q.device.type == "cpu" and mask.dtype == torch.bool
            and torch.compiler.is_compiling() and scale is None):
        return _single_query_attention(q, k, v, mask.expand(q.size(0), 1, 1, k.size(2)))
    gqa = q.size(1) != k.size(1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=scale)


class RMSNorm(nn.Module):
    """Normalise by the root mean square in float32, then scale: by ``weight`` cast back to the input
    dtype first (Llama), or by ``1 + weight`` in float32 (``unit_offset``: Gemma, whose weights start at 0)."""

    def __init__(self, size: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size) if unit_offset else torch.ones(size))
        self.eps, self.unit_offset = eps, unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_f = x.float()
        x_f = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x_f * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x_f.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.unit_offset else nn.init.ones_(self.weight)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with fused q, k, v rows [all q heads; all k heads; all v heads].

    Every family uses it; they differ in biases, how many head dims are rotated, and the options:
    ``qk_norm`` "head" (RMSNorm of each q and k head: Qwen3, Gemma 3) or "full" (RMSNorm over the
    whole q and k projections: OLMo 2), ``scale`` of the scores and their ``softcap`` (Gemma).
    """

    def __init__(self, n_embd: int, n_head: int, n_kv_heads: int, head_size: int, qkv_bias: bool,
                 proj_bias: bool, qk_norm: str | None = None, norm_eps: float = 1e-6, norm_offset: bool = False,
                 scale: float | None = None, softcap: float | None = None) -> None:
        super().__init__()
        self.n_head, self.n_kv_heads, self.head_size = n_head, n_kv_heads, head_size
        self.qkv = nn.Linear(n_embd, (n_head + 2 * n_kv_heads) * head_size, bias=qkv_bias)
        self.proj = nn.Linear(n_head * head_size, n_embd, bias=proj_bias)
        self.qk_norm, self.scale, self.softcap = qk_norm, scale, softcap
        if qk_norm is not None:
            per_head = qk_norm == "head"
            q_size, k_size = (head_size, head_size) if per_head else (n_head * head_size, n_kv_heads * head_size)
            self.q_norm = RMSNorm(q_size, norm_eps, norm_offset)
            self.k_norm = RMSNorm(k_size, norm_eps, norm_offset)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                mask: torch.Tensor | None, input_pos: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_size, self.n_kv_heads * self.head_size
        q, k, v = self.qkv(x).split((q_size, kv_size, kv_size), dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_size).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_size).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call model.set_kv_cache(...) first")
            k, v = self.kv_cache.update(input_pos, k, v)
        y = causal_attention(q, k, v, mask, self.scale, self.softcap)
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


# ---- grouped matmul (mixture of experts) --------------------------------------------------------
def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs here: fp32 on CPU, bf16 on Hopper GPUs, 16-byte aligned rows."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if x.device.type == "cpu":
        ok_dtype = x.dtype == torch.float32
    elif x.device.type == "cuda":
        ok_dtype = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    else:
        return False
    return ok_dtype and all(n * x.element_size() % 16 == 0 for n in (x.size(-1), w.size(1)))


def _contiguous_grad(g: torch.Tensor) -> torch.Tensor:
    return g.contiguous()  # _grouped_mm's backward rejects broadcast (stride-0) gradients


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (N, in) grouped by expert, ``counts[e]`` consecutive rows each, times the expert's
    ``w[e]`` (out, in) transposed: (N, out). One `torch._grouped_mm` call where it runs, else one
    matmul per expert (never a loop over tokens)."""
    if _grouped_mm_ok(x, w):
        out = torch._grouped_mm(x.contiguous(), w.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
        if out.requires_grad:
            out.register_hook(_contiguous_grad)
        return out
    parts = x.split(counts.tolist())
    return torch.cat([F.linear(part, w[e]) for e, part in enumerate(parts)])
