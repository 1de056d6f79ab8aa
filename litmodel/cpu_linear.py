"""The linear layers of fast CPU decoding: one-row products at the speed of reading the weights.

A decode step of one sequence multiplies each weight matrix by one vector, so it is bound by reading the
weights, and by whatever fixed work each of its ~4 products per layer costs. Two layers, by preference:

* `GemvLinear`: litmodel's own matrix-vector kernels (`litmodel/_kernels.c`, built by `pip install`: bf16
  with AVX512-BF16, float32 with AVX2/AVX-512) for up to 8 rows, reading the row-major weight once with
  ~1 us of fixed cost, on torch's threads; longer prompts go to oneDNN with the same plain weight. The weight is
  the layer's own parameter, unchanged (a tied head shares the embedding table; the state dict is intact).
* `PackedLinear`: where the C kernels are not built or not usable on this CPU, the weight is reordered once
  into oneDNN's blocked layout and every product is one `mkldnn::_linear_pointwise` call (~11 us of fixed
  cost per call on the 2-core CPU of benchmarks/RESULTS.md, ~25-30 GB/s).

`fast_linear(linear)` returns the best of the two for a layer, or None where neither has a fast kernel
(bf16 without AVX512-BF16, a CUDA weight). Both are for inference: no gradient flows through their one-row
products, and packed weights cannot be trained, saved or moved.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from litmodel.precision import native_half_matmul

try:  # optional: where no C compiler was found at install time, oneDNN's kernels are used instead
    from litmodel import _kernels as kernels

    _bf16_ok, _f32_ok = kernels.supported()
    GEMV_KERNELS = {torch.bfloat16: kernels.gemv_bf16} if _bf16_ok else {}
    if _f32_ok:
        GEMV_KERNELS[torch.float32] = kernels.gemv_f32
except ImportError:  # pragma: no cover - depends on the build
    kernels, GEMV_KERNELS = None, {}


# up to this many rows (a decode step, a speculative verification) `GemvLinear` uses its kernel, in one pass over
# the weights; longer prompts go to oneDNN with the plain weight (as fast as a packed copy from ~16 rows on, 2-3x
# faster than `F.linear` in fp32 here)
KERNEL_ROWS = 8


def on_threads(fn, x: torch.Tensor, threads: int) -> torch.Tensor:
    """``fn(x)`` with torch on ``threads`` threads, the count restored after."""
    before = torch.get_num_threads()
    if before == threads:
        return fn(x)
    torch.set_num_threads(threads)
    try:
        return fn(x)
    finally:
        torch.set_num_threads(before)


def packable(weight: torch.Tensor) -> bool:
    """Whether oneDNN has a fast kernel for a packed linear of this weight on this machine."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype in (torch.bfloat16, torch.float16) and native_half_matmul(weight.dtype)


class GemvLinear(nn.Module):
    """A linear layer (same parameters) whose one-row product is litmodel's C matrix-vector kernel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the very same parameters: ties stay tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.row(x, torch.get_num_threads())

    def row(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        """``F.linear(x, weight, bias)``; on ``threads`` threads by the kernel for up to `KERNEL_ROWS` rows."""
        w, b = self.weight, self.bias
        kernel = GEMV_KERNELS.get(w.dtype)
        rows = x.numel() // self.in_features
        if kernel is None or x.dtype != w.dtype or x.device.type != "cpu" or not w.is_contiguous() \
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            return F.linear(x, w, b)  # a gradient to compute, or a weight moved since
        if rows > KERNEL_ROWS:  # a prompt
            if not torch.backends.mkldnn.is_available():
                return F.linear(x, w, b)
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        x, b = x.contiguous(), None if b is None else b.contiguous()  # held while the kernel runs
        y = torch.empty(*x.shape[:-1], self.out_features, dtype=x.dtype)
        kernel(w.data_ptr(), x.data_ptr(), 0 if b is None else b.data_ptr(), y.data_ptr(), self.out_features,
               self.in_features, rows, threads)
        return y

    def decode_fn(self):
        """`row` for the fused decode step (`litmodel.fast_decode.DecodeBlock`), with the weight, bias and kernel
        looked up once (module attribute lookups cost ~0.4 us each; the step makes ~120 products)."""
        w, b, kernel = self.weight.detach(), None if self.bias is None else self.bias.detach(), GEMV_KERNELS.get(
            self.weight.dtype)
        if kernel is None or not w.is_contiguous() or (b is not None and not b.is_contiguous()):
            return self.row
        w_ptr, b_ptr, n, k, dtype = w.data_ptr(), 0 if b is None else b.data_ptr(), self.out_features, \
            self.in_features, w.dtype

        def row(x: torch.Tensor, threads: int) -> torch.Tensor:
            if x.dtype != dtype or x.dim() != 2 or x.size(0) != 1 or not x.is_contiguous():
                return self.row(x, threads)
            y = torch.empty(1, n, dtype=dtype)
            kernel(w_ptr, x.data_ptr(), b_ptr, y.data_ptr(), n, k, 1, threads)
            return y

        row.tensors = (w, b)  # held by the function: the addresses it uses stay valid
        return row

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"dtype={self.weight.dtype}, litmodel's matrix-vector kernel"


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

    def row(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        """The product on ``threads`` threads (`DecodeBlock` runs its small torch ops on one)."""
        return on_threads(self.forward, x, threads)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"dtype={self.weight.dtype}, packed for oneDNN"


def fast_linear(linear: nn.Linear, packed: dict[int, torch.Tensor] | None = None) -> nn.Module | None:
    """The fast layer for ``linear`` on this machine (`GemvLinear`, else `PackedLinear`), or None. ``packed``
    maps id(weight) -> packed weight, so that a weight shared by several layers is packed once."""
    w = linear.weight
    if w.device.type == "cpu" and w.dtype in GEMV_KERNELS and w.is_contiguous():
        return GemvLinear(linear)
    if not packable(w):
        return None
    packed = {} if packed is None else packed
    layer = PackedLinear(linear, packed.get(id(w)))
    packed[id(w)] = layer.weight
    return layer
