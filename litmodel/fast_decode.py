"""Fast eager decoding on CPU without compiling: an explicit module swap.

`prepare_fast_decode(model)` replaces, in place, the modules that dominate a batch-1 decode step and
returns the model (same forward signature, same results within float rounding):

* every `nn.Linear` -> `PackedLinear`: the weight is reordered once into oneDNN's blocked layout
  (`torch.ops.mkldnn._reorder_linear_weight`, what Inductor's freezing does), and the product is one
  `mkldnn::_linear_pointwise` call that reads the weights at close to the memory bandwidth for one
  row (row-major `F.linear` reached ~1/3 of that here in fp32, ~1/15 in bf16). Any number of rows works,
  so the prefill uses the same packed weight (no second copy). A tied output head gets its own
  packed copy (the embedding lookup still needs the plain table).
* every `CausalSelfAttention` -> `DecodeAttention`: for one new token per row it rotates q and k in
  one call, writes the static KV cache in place and attends to the filled prefix of the cache only,
  without a mask unless rows are padded (SDPA over the whole masked cache costs ~0.25 ms per layer at
  1024 slots, the prefix ~0.03 ms), in float32 (bf16 SDPA for one query is ~5x slower on CPU).
  Prompts (several tokens) take the unchanged path.
* every Llama `RMSNorm` -> `FusedRMSNorm`: one `F.rms_norm` kernel instead of seven ops.

It is for inference only: packed weights cannot be trained, saved or moved to another device.
Linear layers of a dtype oneDNN has no fast kernel for on this CPU (bf16/fp16 without AVX512-BF16/
AMX/AVX512-FP16) and non-CPU weights are left as they are.

On CUDA the decode step is a CUDA graph instead (`litmodel.generate.make_decode_step`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from litmodel.layers import CausalSelfAttention, KVCache, RMSNorm, apply_rope
from litmodel.precision import native_half_matmul
from litmodel.quantize import DecodeLinear


def packable(weight: torch.Tensor) -> bool:
    """Whether oneDNN has a fast kernel for a packed linear of this weight on this machine."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype in (torch.bfloat16, torch.float16) and native_half_matmul(weight.dtype)


class PackedLinear(nn.Module):
    """A linear layer whose weight is prepacked for oneDNN (inference only; ``weight`` is an opaque
    mkldnn tensor of the original (out, in) shape and dtype)."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        if packed is None:
            # batch_size=1: the layout oneDNN picks for one-row products (decode); larger products use it too
            packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)
        self.register_buffer("weight", packed, persistent=False)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:  # e.g. a float32 activation reaching a bf16 layer: match F.linear's error
            raise RuntimeError(f"PackedLinear of {self.weight.dtype} got a {x.dtype} input")
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"dtype={self.weight.dtype}, packed for oneDNN"


class FusedRMSNorm(nn.Module):
    """`litmodel.llama.RMSNorm` as one `F.rms_norm` call (float32 statistics, then scaled, as RMSNorm)."""

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # without its weight argument: F.rms_norm with a weight is a slow composite on CPU (~3x)
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), None, self.eps).to(x.dtype)


class StepCache:
    """What every layer of one decode step would recompute alike: the mask cut to the filled cache prefix
    (None when nothing in it is masked) and cos/sin in the activation dtype. Shared by the attention
    modules of one model; an entry is reused only for the very same input tensor objects (held here, so
    they cannot be freed and their ids reused) and cache length."""

    def __init__(self) -> None:
        self.mask_in = self.mask = self.cos_in = self.cos = self.sin = None
        self.length = -1

    def prefix_mask(self, mask: torch.Tensor, length: int) -> torch.Tensor | None:
        if mask is not self.mask_in or length != self.length:
            m = mask[..., :length]
            self.mask_in, self.length, self.mask = mask, length, None if bool(m.all()) else m
        return self.mask

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`litmodel.layers.apply_rope` of ``x`` (B, heads, 1, hs) in three ops when every dim is rotated:
        x * cos + swap_halves(x) * [-sin, sin]."""
        n = cos.size(-1)
        if n != x.size(-1):  # partial rotary (GPT-NeoX)
            return apply_rope(x, cos, sin)
        if cos is not self.cos_in or self.cos.dtype != x.dtype:
            if cos.dim() == 3:  # per-row positions (B, T, n): broadcast over heads
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            signed = torch.cat((-sin[..., : n // 2], sin[..., n // 2:]), dim=-1)
            self.cos_in, self.cos, self.sin = cos, cos.to(x.dtype), signed.to(x.dtype)
        swapped = x.view(*x.shape[:-1], 2, n // 2).flip(-2).view(x.shape)
        return torch.addcmul(x * self.cos, swapped, self.sin)


class DecodeAttention(CausalSelfAttention):
    """`CausalSelfAttention` with a cheaper path for one new token per row (same parameters and cache)."""

    def __init__(self, attn: CausalSelfAttention, step: StepCache | None = None) -> None:
        nn.Module.__init__(self)
        self.n_head, self.n_kv_heads, self.head_size = attn.n_head, attn.n_kv_heads, attn.head_size
        self.qkv, self.proj, self.kv_cache = attn.qkv, attn.proj, attn.kv_cache
        self.qk_norm, self.scale, self.softcap = attn.qk_norm, attn.scale, attn.softcap
        if attn.qk_norm is not None:
            self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.step = step or StepCache()

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                mask: torch.Tensor | None, input_pos: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        if T != 1 or input_pos is None or input_pos.shape != (1,) or mask is None or type(self.kv_cache) is not KVCache \
                or mask.dtype != torch.bool or self.softcap is not None:  # the general path for anything else
            return super().forward(x, cos, sin, mask, input_pos)
        H, G, hs = self.n_head, self.n_kv_heads, self.head_size
        qkv = self.qkv(x)
        if self.qk_norm == "full":  # OLMo 2: RMSNorm over the whole q and k projections
            q, k, v = qkv.split((H * hs, G * hs, G * hs), dim=-1)
            qkv = torch.cat((self.q_norm(q), self.k_norm(k), v), dim=-1)
        qkv = qkv.view(B, H + 2 * G, 1, hs)
        qk, v = qkv[:, :H + G], qkv[:, H + G:]
        if self.qk_norm == "head":  # Qwen3, Gemma 3: RMSNorm of each q and k head
            qk = torch.cat((self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])), dim=1)
        if cos is not None:
            qk = self.step.rope(qk, cos, sin)  # q and k heads together: one rotation
        q, k = qk[:, :H], qk[:, H:]
        cache = self.kv_cache
        cache.k.index_copy_(2, input_pos, k if k.dtype == cache.k.dtype else k.to(cache.k.dtype))
        cache.v.index_copy_(2, input_pos, v if v.dtype == cache.v.dtype else v.to(cache.v.dtype))
        # attend to the filled prefix of the cache only (a host read of the position is free on CPU): the
        # cost no longer grows with the cache length, and without padding no mask is needed at all
        L = int(input_pos[0]) + 1
        keys, values, mask = cache.k[:, :, :L], cache.v[:, :, :L], self.step.prefix_mask(mask, L)
        if q.dtype != torch.float32:  # bf16/fp16 SDPA for one query is ~5x slower than fp32 on CPU
            q, keys, values = q.float(), keys.float(), values.float()
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=H != G, scale=self.scale)
        return self.proj(y.to(x.dtype).reshape(B, 1, H * hs))


def _swap_children(model: nn.Module, fn) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            new = fn(child)
            if new is not None:
                setattr(module, name, new)


def prepare_fast_decode(model: nn.Module, pack_linears: bool = True) -> nn.Module:
    """Swap in the fast decode modules (see the module docstring), in place; returns ``model``.

    ``pack_linears=False`` keeps the linear layers (e.g. int8/int4 ones) and swaps attention and norms only.
    A weight shared by several linear layers is packed once.
    """
    packed: dict[int, torch.Tensor] = {}
    step = StepCache()

    def pack(child: nn.Module):
        if type(child) not in (nn.Linear, DecodeLinear):
            return None
        if packable(child.weight):
            key = id(child.weight)
            layer = PackedLinear(child, packed.get(key))
            packed[key] = layer.weight
            return layer
        if type(child) is nn.Linear:  # bf16 on a CPU without bf16 matmul: DecodeLinear computes prompts in fp32
            layer = DecodeLinear(child.in_features, child.out_features, child.bias is not None, device="meta")
            layer.weight, layer.bias = child.weight, child.bias
            return layer
        return None

    def swap(child: nn.Module):
        if isinstance(child, CausalSelfAttention) and not isinstance(child, DecodeAttention):
            return DecodeAttention(child, step)
        if type(child) is RMSNorm and not child.unit_offset:  # Gemma's (1 + w) norms stay as they are
            return FusedRMSNorm(child)
        return None

    with torch.no_grad():
        if pack_linears:
            _swap_children(model, pack)  # first, so that the new attention modules take the packed layers
        _swap_children(model, swap)
    return model
