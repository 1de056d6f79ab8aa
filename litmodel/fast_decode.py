"""Fast eager decoding on CPU without compiling: an explicit module swap.

`prepare_fast_decode(model)` replaces, in place, the modules that dominate a batch-1 decode step and
returns the model (same forward signature, same results within float rounding):

* every `nn.Linear` -> `litmodel.cpu_linear.fast_linear(...)`: `GemvLinear` (litmodel's C matrix-vector
  kernel for one row, the weight unchanged) where the kernels are built and the CPU has them, else
  `PackedLinear` (the weight reordered once for oneDNN's kernels). Prompts (several rows) use the same weight.
* every `CausalSelfAttention` -> `DecodeAttention`: for one new token per row it rotates q and k in
  one call, writes the static KV cache in place and attends to the filled prefix of the cache only,
  without a mask unless rows are padded (SDPA over the whole masked cache costs ~0.25 ms per layer at
  1024 slots, the prefix ~0.03 ms), in float32 (bf16 SDPA for one query is ~5x slower on CPU).
  Prompts (several tokens) take the unchanged path.
* every Llama `RMSNorm` -> `FusedRMSNorm`: for one row, one layer-norm kernel instead of eight ops.
* every Llama `Block` without q/k norms, post-norms, experts or GeGLU -> `DecodeBlock`: the step of one
  token of one sequence is one function of ~36 ops (a rotation matrix per step instead of per-layer
  RoPE ops, cache-slot writes, two batched matmuls and a softmax over the visible slots, the linear
  kernels called directly), not ~60 ops and a dozen module calls; everything else takes `Block.forward`
  with the modules above. Each op costs ~1-2 us of dispatch on this CPU, so ops, not arithmetic, were a
  third of a SmolLM2-135M step. With litmodel's C extension built (`litmodel/_kernels.c`), the whole step
  of a layer is one C call (`DecodeBlock.step_layer`: norms, products, attention, residual adds, SiLU),
  also for 2-8 tokens at once (a speculative verification: each token bit for bit as its one-token step);
  where a product has no C kernel, the norms and attention still are (`DecodeBlock.step_native`).

It is for inference only. Linear layers without a fast kernel on this CPU (bf16/fp16 without AVX512-BF16/
AMX/AVX512-FP16) and non-CPU weights are left as they are.

On CUDA the decode step is a CUDA graph instead (`litmodel.decode_step.make_decode_step`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from litmodel.cpu_linear import GEMV_KERNELS, KERNEL_ROWS, GemvLinear, PackedLinear, fast_linear, kernels, on_threads
from litmodel.int4 import Int4Linear
from litmodel.layers import CausalSelfAttention, KVCache, RMSNorm, apply_rope, build_mask
from litmodel.llama import Block, SwiGLU
from litmodel.quantize import DecodeLinear, swap_modules


class FusedRMSNorm(nn.Module):
    """`litmodel.llama.RMSNorm` in fewer ops. One row (a decode step): one `F.layer_norm` kernel, as the
    layer norm of ``[x, -x]`` has mean 0 and variance mean(x^2), so its first half is
    x * rsqrt(mean(x^2) + eps) (float32 statistics; ~8 us instead of ~16 for the eight ops of RMSNorm or
    `F.rms_norm`, a composite on CPU). In float32 the computed mean is not exactly 0, so half the
    difference of the two halves cancels it (gamma holds weight / 2). Several rows (a prompt): `F.rms_norm`,
    which computes exactly as RMSNorm does."""

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps
        w = norm.weight.detach()
        self.exact = w.dtype == torch.float32
        self.register_buffer("weight2", torch.cat((w / 2, w / 2) if self.exact else (w, w)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(-1)
        if x.numel() != n:
            # without its weight argument: F.rms_norm with a weight is a slower composite on CPU
            return self.weight * F.rms_norm(x.float(), (n,), None, self.eps).to(x.dtype)
        return self.row(x)

    def row(self, x: torch.Tensor) -> torch.Tensor:
        """The norm of a single row ``x`` (..., n)."""
        n = x.size(-1)
        y = F.layer_norm(torch.cat((x, x.neg()), -1), (2 * n,), self.weight2, None, self.eps)
        return y[..., :n] - y[..., n:] if self.exact else y[..., :n]


class StepCache:
    """What every layer of one decode step would recompute alike: the mask cut to the filled cache prefix
    (None when nothing in it is masked), cos/sin in the activation dtype, the position as a Python int and
    the rotation matrix of the step. Shared by the attention modules and blocks of one model; an entry is
    reused only for the very same input tensor objects (held here, so they cannot be freed and their ids
    reused) and cache length."""

    def __init__(self) -> None:
        self.mask_in = self.mask = self.cos_in = self.cos = self.sin = None
        self.length = -1
        self.pos_in, self.pos, self.ranges = None, -1, {}
        self.rot_in, self.rot, self.rot_bases = None, None, {}
        self.cs_in, self.cs = None, None
        self.rows: dict = {}

    def position(self, input_pos: torch.Tensor) -> int:
        """The slot of ``input_pos`` (1,) (a host read of a CPU tensor: read in every layer, so that a
        tensor changed in place is never stale)."""
        p = input_pos.item()
        if input_pos is not self.pos_in or p != self.pos:
            self.pos_in, self.pos, self.ranges = input_pos, p, {}
        return p

    def visible_from(self, mask: torch.Tensor, length: int, window: int | None) -> int | None:
        """The first visible key slot ``lo`` when the keys one query sees are exactly slots lo..length-1
        (the causal prefix, cut to the sliding ``window``), else None (padding or another extra mask).
        Call `position` first: the answers are kept for one step."""
        key = (id(mask), window)
        if key not in self.ranges:
            lo = max(0, length - window) if window is not None else 0
            row = mask.reshape(-1)
            ok = mask.numel() == mask.size(-1) and bool(row[lo:length].all() & ~row[:lo].any())
            self.ranges[key] = (mask, lo if ok else None)  # the mask is held: its id stays unique
        return self.ranges[key][1]

    def causal_rows(self, input_pos: torch.Tensor, mask: torch.Tensor, window: int | None) -> tuple[int, int] | None:
        """(p, lo) when the T queries of ``input_pos`` sit at slots p..p+T-1 and ``mask`` lets each see exactly
        the causal prefix cut to the ``window`` (lo: the first query's first slot), else None. Checked once per
        step (the same tensors) and window."""
        p = int(input_pos[0])
        key = (id(input_pos), id(mask), p, window)
        if key not in self.rows:
            T, S = input_pos.numel(), mask.size(-1)
            ok = p + T <= S and torch.equal(input_pos, torch.arange(p, p + T)) and \
                torch.equal(mask, build_mask(T, input_pos, S, window, None, mask.device))
            lo = max(0, p + 1 - window) if window is not None else 0
            self.rows = {key: ((p, lo) if ok else None, input_pos, mask)}  # held: their ids stay unique
        return self.rows[key][0]

    def rotation(self, cos: torch.Tensor, sin: torch.Tensor, head_size: int) -> torch.Tensor:
        """The (head_size, head_size) float32 matrix R with ``x @ R == apply_rope(x, cos, sin)`` for one
        position (the first ``cos.size(-1)`` dims rotated, the rest passed through): one small matmul
        rotates every q and k head of a layer."""
        if cos is not self.rot_in:
            n = cos.size(-1)
            base = self.rot_bases.get((head_size, n))
            if base is None:  # where cos, -sin and sin go in R (row i of R: input dim i), and R without them
                i = torch.arange(n // 2)
                rows = torch.cat((torch.arange(n), i + n // 2, i))
                cols = torch.cat((torch.arange(n), i, i + n // 2))
                eye = torch.eye(head_size)
                eye[:n, :n] = 0
                base = self.rot_bases[(head_size, n)] = (eye, rows * head_size + cols)
            eye, where = base
            c, s = cos.reshape(-1).float(), sin.reshape(-1).float()
            values = torch.cat((c, -s[: n // 2], s[n // 2:]))
            self.rot_in, self.rot = cos, eye.reshape(-1).index_put((where,), values).view(head_size, head_size)
        return self.rot

    def cos_sin(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of one position as contiguous float32 vectors (for the C kernels), once per step."""
        if cos is not self.cs_in:
            self.cs_in, self.cs = cos, (cos.reshape(-1).float().contiguous(), sin.reshape(-1).float().contiguous())
        return self.cs

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


_ZERO = torch.zeros(())  # the ignored input of baddbmm(beta=0)


def _linear_fn(layer: nn.Module):
    """``layer`` as a plain function of (x, threads) (no module call for the fast linear layers)."""
    if type(layer) in (GemvLinear, Int4Linear):
        return layer.decode_fn()
    if type(layer) is PackedLinear:
        return layer.row
    return lambda x, threads: on_threads(layer, x, threads)  # its kernel runs on torch's threads


class DecodeBlock(Block):
    """A Llama `Block` whose step for one new token of one sequence is one function of ~36 ops instead
    of ~60 plus a dozen module calls (other inputs take `Block.forward` with the swapped attention and norms):

    * each RMSNorm is the one-row layer-norm kernel of `FusedRMSNorm`;
    * q and k of every head are rotated by one (H + G, hs) x (hs, hs) matmul with the step's rotation
      matrix (`StepCache.rotation`, built once per step for all layers), in float32;
    * the new key and value are copied into their cache slot; attention is two batched matmuls and a
      softmax in float32 over the visible slots only (no mask: a padding or any other extra mask takes
      the general path);
    * the linear kernels are called directly, the weights, sizes and views of the cache are looked up once.

    `step_one` is that step in torch ops; `step_native` is the same computation with the norms and the
    attention part in litmodel's C kernels, and `step_layer` the whole of it in one C call, used where they
    are built (tests run all three).

    Blocks with q/k norms, post-norms, a mixture of experts, a GeGLU or a softcap are not swapped.
    """

    def __init__(self, block: Block, step: StepCache) -> None:
        nn.Module.__init__(self)
        self.norm_1, self.attn, self.norm_2, self.mlp = block.norm_1, block.attn, block.norm_2, block.mlp
        self.post_norm, self.use_rope, self.window = block.post_norm, block.use_rope, block.window
        self.step = step
        a = block.attn
        self.sizes = (a.n_head, a.n_kv_heads, a.head_size, a.scale if a.scale is not None else a.head_size ** -0.5)
        # plain references (module attribute lookups cost ~0.4 us each, ~30 per layer)
        self.fns = (self.norm_1.row, _linear_fn(a.qkv), _linear_fn(a.proj), self.norm_2.row,
                    _linear_fn(block.mlp.fc), _linear_fn(block.mlp.proj))
        self.cache_views: tuple | None = None  # (cache, keys (G, hs, S), values (G, S, hs), batch 1?, C dtype)
        self.norms = (self.norm_1.weight, self.norm_1.eps, self.norm_2.weight, self.norm_2.eps)

    @staticmethod
    def fusable(block: nn.Module) -> bool:
        if type(block) is not Block:
            return False
        a = block.attn
        return (not block.post_norm and type(block.mlp) is SwiGLU and block.mlp.activation == "silu"
                and type(block.norm_1) is FusedRMSNorm and type(block.norm_2) is FusedRMSNorm
                and isinstance(a, DecodeAttention) and a.qk_norm is None and a.softcap is None)

    def forward(self, x, cos, sin, mask, input_pos):
        cache = self.attn.kv_cache
        if x.size(0) != 1 or mask is None or input_pos is None or type(cache) is not KVCache \
                or mask.dtype != torch.bool or input_pos.dim() != 1:
            return super().forward(x, cos, sin, mask, input_pos)
        views = self.cache_views
        # a new cache, or a copy of this block (the plan holds addresses): what it can do with it, found once
        if views is None or views[0] is not cache or views[6] != id(self):
            k, native_dtype = cache.k, None
            if kernels is not None and k.dtype in (torch.bfloat16, torch.float32) and k.is_contiguous() \
                    and cache.v.is_contiguous() and self.norms[0].dtype == k.dtype == self.norms[2].dtype:
                native_dtype = k.dtype  # step_native for activations of this dtype
            views = self.cache_views = (cache, k[0].transpose(1, 2), cache.v[0], k.size(0) == 1, native_dtype,
                                        self.native_plan(cache) if native_dtype is not None else None, id(self))
        _, keys, values, one_row, native_dtype, plan, _ = views
        step, T = self.step, x.size(1)
        if T > 1:  # a few tokens (a speculative verification, a short prompt): one C call per layer
            if plan is None or T > KERNEL_ROWS or not one_row or x.dtype != native_dtype or not x.is_contiguous():
                return super().forward(x, cos, sin, mask, input_pos)
            p_lo = step.causal_rows(input_pos, mask, self.window)
            if p_lo is None:
                return super().forward(x, cos, sin, mask, input_pos)
            return self.step_layer(plan, x, cos, sin, *p_lo, torch.get_num_threads())
        if input_pos.shape != (1,):
            return super().forward(x, cos, sin, mask, input_pos)
        p = step.position(input_pos)
        lo = step.visible_from(mask, p + 1, self.window)
        if lo is None or not one_row:  # a mask (padding), or a cache of several rows
            return super().forward(x, cos, sin, mask, input_pos)
        threads = torch.get_num_threads()
        if x.dtype == native_dtype:
            if plan is not None and x.is_contiguous():
                return self.step_layer(plan, x, cos, sin, p, lo, threads)
            return self.step_native(x, cos, sin, cache, p, lo, threads)
        if threads == 1:
            return self.step_one(x, cos, sin, keys, values, p, lo, 1)
        # the small ops on one thread, the matrix-vector products on all: at 2 threads each small op enters an
        # OpenMP region (a 12x64 @ 64x64 mm 5 -> 18 us, a softmax 2 -> 12 us), ~9% of a step here
        torch.set_num_threads(1)
        try:
            return self.step_one(x, cos, sin, keys, values, p, lo, threads)
        finally:
            torch.set_num_threads(threads)

    def step_one(self, x, cos, sin, keys, values, p: int, lo: int, threads: int) -> torch.Tensor:
        """The fused step: ``x`` (1, 1, n) of the token at cache slot ``p`` that sees slots lo..p."""
        H, G, hs, scale = self.sizes
        norm_1, qkv_fn, proj_fn, norm_2, fc_fn, down_fn = self.fns
        # attention: norm, one qkv product, rotate q and k (float32), write the cache slot, attend
        x = x.view(1, -1)  # 2-D rows: the linear kernels reshape 3-D inputs (~1.5 us each)
        qkv = qkv_fn(norm_1(x), threads).view(H + 2 * G, hs).float()
        qk = qkv[: H + G]
        if self.use_rope and cos is not None:
            qk = torch.mm(qk, self.step.rotation(cos, sin, hs))
        q, k = torch.split_with_sizes(qk, (H, G))
        keys.select(2, p).copy_(k)
        values.select(1, p).copy_(qkv[H + G:])
        k_seen, v_seen = keys[:, :, lo: p + 1], values[:, lo: p + 1]
        if k_seen.dtype != torch.float32:
            k_seen, v_seen = k_seen.float(), v_seen.float()
        scores = torch.baddbmm(_ZERO, q.view(G, H // G, hs), k_seen, beta=0, alpha=scale)
        y = torch.bmm(torch.softmax(scores, -1), v_seen).view(1, H * hs)
        x = x + proj_fn(y.to(x.dtype), threads)
        # MLP: norm, one gate-and-up product, SiLU(gate) * up, down
        gate, up = fc_fn(norm_2(x), threads).chunk(2, dim=-1)
        return (x + down_fn(F.silu(gate).mul_(up), threads)).view(1, 1, -1)

    def step_native(self, x, cos, sin, cache: KVCache, p: int, lo: int, threads: int) -> torch.Tensor:
        """`step_one` with its small steps in litmodel's C kernels (`litmodel/_kernels.c`): each norm is one
        call, and so is everything between the qkv and the output products (rotating q and k, writing the cache
        slot, attention over slots lo..p), instead of ~25 torch ops of ~2 us each."""
        H, G, hs, scale = self.sizes
        _, qkv_fn, proj_fn, _, fc_fn, down_fn = self.fns
        if p >= cache.k.size(2):
            raise IndexError(f"position {p} is past the end of the KV cache ({cache.k.size(2)} slots)")
        is_bf16, n = x.dtype == torch.bfloat16, x.size(-1)
        x = x.view(1, n)
        h, y = torch.empty_like(x), torch.empty(1, H * hs, dtype=x.dtype)
        w_1, eps_1, w_2, eps_2 = self.norms
        kernels.rmsnorm(x.data_ptr(), w_1.data_ptr(), h.data_ptr(), n, eps_1, is_bf16)
        qkv = qkv_fn(h, threads)
        c = s = None
        if self.use_rope and cos is not None:
            c, s = self.step.cos_sin(cos, sin)
        kernels.attend(qkv.data_ptr(), 0 if c is None else c.data_ptr(), 0 if s is None else s.data_ptr(),
                       0 if c is None else c.numel(), cache.k.data_ptr(), cache.v.data_ptr(), cache.k.size(2), p, lo,
                       H, G, hs, scale, y.data_ptr(), is_bf16, threads)
        x = x + proj_fn(y, threads)
        kernels.rmsnorm(x.data_ptr(), w_2.data_ptr(), h.data_ptr(), n, eps_2, is_bf16)
        gate, up = fc_fn(h, threads).chunk(2, dim=-1)
        return (x + down_fn(F.silu(gate).mul_(up), threads)).view(1, 1, -1)

    def native_plan(self, cache: KVCache) -> tuple | None:
        """The plan of `kernels.decode_layer` (the whole step in one C call, see `litmodel/_kernels.c`) for
        this block and ``cache``, or None where a product has no C kernel for the cache's dtype (the step then
        takes `step_native`). Holds the tensors whose addresses it contains."""
        dtype, a = cache.k.dtype, self.attn
        if not hasattr(kernels, "decode_layer"):
            return None
        products, held = [], []
        for layer in (a.qkv, a.proj, self.mlp.fc, self.mlp.proj):
            b = layer.bias
            if b is not None and (b.dtype != dtype or not b.is_contiguous()):
                return None
            if type(layer) is GemvLinear and layer.weight.dtype == dtype and dtype in GEMV_KERNELS \
                    and layer.weight.is_contiguous():
                kind, w, scales, group = (0 if dtype == torch.bfloat16 else 1), layer.weight.detach(), None, 0
            elif type(layer) is Int4Linear and layer.layout == "litmodel" and dtype == torch.bfloat16:
                kind, w, scales, group = 2, layer.weight, layer.scales_and_zeros, layer.group_size
            else:
                return None
            products.append((kind, w.data_ptr(), 0 if scales is None else scales.data_ptr(), group,
                             0 if b is None else b.data_ptr(), layer.out_features, layer.in_features))
            held += [w, scales, b]
        H, G, hs, scale = self.sizes
        n, inter, S = a.qkv.in_features, self.mlp.fc.out_features // 2, cache.k.size(2)
        sizes = (n, a.qkv.out_features, H * hs, n, 2 * inter, inter, n)  # per token, for up to KERNEL_ROWS tokens
        buffers = [torch.empty(KERNEL_ROWS * size, dtype=dtype) for size in sizes]
        scores, work = torch.empty(H * S), torch.empty((2 * H + 1) * hs)
        w_1, eps_1, w_2, eps_2 = self.norms
        plan = torch.tensor([dtype == torch.bfloat16, n, H, G, hs, S, cache.k.data_ptr(), cache.v.data_ptr(),
                             w_1.data_ptr(), w_2.data_ptr(), *(t.data_ptr() for t in buffers), scores.data_ptr(),
                             work.data_ptr(), inter, *(v for p in products for v in p)], dtype=torch.int64)
        assert plan.numel() == kernels.layer_plan_size()
        eps_scale = torch.tensor([eps_1, eps_2, scale], dtype=torch.float64)
        return plan.data_ptr(), eps_scale.data_ptr(), S, (plan, eps_scale, buffers, scores, work, held, cache, w_1, w_2)

    def step_layer(self, plan: tuple, x, cos, sin, p: int, lo: int, threads: int) -> torch.Tensor:
        """`step_native` in one C call (`kernels.decode_layer`, plan from `native_plan`) for the T <= 8 tokens
        of ``x`` (1, T, n) at slots p..p+T-1, the first seeing slots lo..p (a window, if any, moves along)."""
        plan_ptr, eps_scale_ptr, slots, _ = plan
        T = x.size(1)
        if p + T > slots:
            raise IndexError(f"position {p + T - 1} is past the end of the KV cache ({slots} slots)")
        out, window = torch.empty_like(x), self.window or 0
        if self.use_rope and cos is not None:
            c, s = self.step.cos_sin(cos, sin)
            kernels.decode_layer(plan_ptr, eps_scale_ptr, x.data_ptr(), out.data_ptr(), c.data_ptr(), s.data_ptr(),
                                 c.numel() // T, p, lo, window, T, threads)
        else:
            kernels.decode_layer(plan_ptr, eps_scale_ptr, x.data_ptr(), out.data_ptr(), 0, 0, 0, p, lo, window, T,
                                 threads)
        return out


def prepare_fast_decode(model: nn.Module, pack_linears: bool = True, fuse_blocks: bool = True) -> nn.Module:
    """Swap in the fast decode modules (see the module docstring), in place; returns ``model``.

    ``pack_linears=False`` keeps the linear layers (e.g. int8/int4 ones) and swaps the other modules only.
    ``fuse_blocks=False`` keeps the blocks (no `DecodeBlock`; for comparisons). A weight shared by several
    linear layers is packed once.
    """
    packed: dict[int, torch.Tensor] = {}
    step = StepCache()

    def pack(child: nn.Module):
        if type(child) not in (nn.Linear, DecodeLinear):
            return None
        layer = fast_linear(child, packed)
        if layer is None and type(child) is nn.Linear:  # bf16 on a CPU without bf16 matmul: DecodeLinear
            return DecodeLinear.from_linear(child)  # computes prompts in fp32
        return layer

    def swap(child: nn.Module):
        if isinstance(child, CausalSelfAttention) and not isinstance(child, DecodeAttention):
            return DecodeAttention(child, step)
        if type(child) is RMSNorm and not child.unit_offset:  # Gemma's (1 + w) norms stay as they are
            return FusedRMSNorm(child)
        return None

    with torch.no_grad():
        if pack_linears:
            swap_modules(model, pack)  # first, so that the new attention modules take the packed layers
        swap_modules(model, swap)
        if fuse_blocks:
            swap_modules(model, lambda child: DecodeBlock(child, step) if DecodeBlock.fusable(child) else None)
    return model
