"""Int4 weight-only quantization, groupwise (gpt-fast / torchao "tinygemm" format).

`quantize_int4(model, group_size)` replaces every `nn.Linear` (the output head included) with an
`Int4Linear`: each row of the weight is cut into groups of ``group_size`` input columns, and each group
keeps 4-bit codes q in 0..15 with a scale and a zero point (both bf16):

    w ~= (q - 8) * scale + zero        (zero = group min + 8 * scale, scale = (max - min) / 15)

Two codes per byte, in the layout of the kernel that multiplies them:

* CPU with litmodel's C kernels (AVX512-BF16; groups of 64, 128 or 256): litmodel's layout (`pack_int4`) and
  `gemv_int4` in `litmodel/_kernels.c` for up to 8 rows (a decode step, a speculative verification), 1.2-2x
  torch's int4 kernel on one row here; longer prompts dequantize the weight to bf16 (`int4_dequant`, one
  pass) and multiply it with oneDNN.
* other CPUs, groups of 32: `torch.ops.aten._weight_int4pack_mm_for_cpu` (packing:
  `_convert_weight_to_int4pack_for_cpu`);
* CUDA: tinygemm, `torch.ops.aten._weight_int4pack_mm` (packing: `_convert_weight_to_int4pack`; not
  tested here: no GPU).

All of them take bfloat16 activations, so an Int4Linear computes in bfloat16 and returns the input's dtype.
Weights are 4.5 bits per value with group 64 (1/7 of float32, 1/3.6 of bf16). The token embedding stays in
the model's dtype (a lookup reads one row per token; a tied output head gets its own int4 copy).

Layers need ``out_features % 16 == 0`` and ``in_features % group_size == 0``: other layers keep their
precision and are named in a log line.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from litmodel.cpu_linear import KERNEL_ROWS, kernels, on_threads
from litmodel.utils import LitModelError

log = logging.getLogger(__name__)
GROUP_SIZES = (32, 64, 128, 256)
ACT_DTYPE = torch.bfloat16  # activation dtype of the int4 kernels
# litmodel's int4 kernel: AVX512-BF16, as its bf16 products
C_KERNEL = kernels is not None and hasattr(kernels, "gemv_int4") and kernels.supported()[0]


def quantize_groupwise_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes (N, K) int32 in 0..15, scales_and_zeros (K // group_size, N, 2) float32) of ``weight`` (N, K)."""
    N, K = weight.shape
    w = weight.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    zero = lo + 8 * scale
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(N, K)
    return q, torch.stack([scale.t(), zero.t()], dim=-1).contiguous()


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 (N, K) weight that codes ``q`` (N, K) and ``scales_and_zeros`` (K/g, N, 2) stand for."""
    scale = scales_and_zeros[..., 0].float().t().repeat_interleave(group_size, dim=1)
    zero = scales_and_zeros[..., 1].float().t().repeat_interleave(group_size, dim=1)
    return (q.float() - 8) * scale + zero


def _code_columns(K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns whose codes byte j of a row holds, in its low and its high nibble (litmodel's layout).

    Blocks of 128 columns (a last one of 64 where K % 128 == 64) in 64 (32) bytes: byte j = 16 L + 8 h + i
    (i < 8) of a block of width W holds column (W / 4) h + 8 L + i in its low nibble and W / 2 more in its high
    one, which is the order `vpunpcklbw`/`vpunpckhbw` put them in (see `gemv_int4` in litmodel/_kernels.c)."""
    low, high = [], []
    for base in range(0, K, 128):
        W = min(128, K - base)
        j = torch.arange(W // 2)
        col = base + (W // 4) * ((j // 8) % 2) + 8 * (j // 16) + j % 8
        low.append(col)
        high.append(col + W // 2)
    return torch.cat(low), torch.cat(high)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes ``q`` (N, K) in 0..15 -> (N, K / 2) uint8 in litmodel's layout (`_code_columns`)."""
    low, high = _code_columns(q.size(1))
    return (q[:, low] | q[:, high] << 4).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """`pack_int4`'s inverse: (N, K / 2) uint8 -> codes (N, K) int32."""
    low, high = _code_columns(2 * packed.size(1))
    q = torch.empty(packed.size(0), 2 * packed.size(1), dtype=torch.int32)
    q[:, low], q[:, high] = (packed & 15).int(), (packed >> 4).int()
    return q


def int4_supported(out_features: int, in_features: int, group_size: int) -> bool:
    return out_features % 16 == 0 and in_features % group_size == 0


class Int4Linear(nn.Module):
    """A linear layer with groupwise int4 weights, computed by a fused int4 kernel (see the module docstring).

    ``layout``: "litmodel" (``weight`` (N, K/2) uint8 from `pack_int4`, ``scales_and_zeros`` (N, 2, K/g) bf16:
    each row's scales, then its zeros), "torch-cpu" or "tinygemm" (torch's packed weight, ``scales_and_zeros``
    (K/g, N, 2) bf16)."""

    def __init__(self, linear: nn.Linear, group_size: int = 64) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        if not int4_supported(self.out_features, self.in_features, group_size):
            raise LitModelError(f"int4 needs out_features % 16 == 0 and in_features % {group_size} == 0, got a "
                                f"{self.out_features}x{self.in_features} layer; pick another --int4_group_size")
        q, sz = quantize_groupwise_int4(linear.weight, group_size)
        dev = linear.weight.device
        if dev.type == "cuda":  # tinygemm layout (untested here: no GPU)
            self.layout = "tinygemm"
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        elif C_KERNEL and group_size >= 64:
            self.layout = "litmodel"
            packed, sz = pack_int4(q), sz.permute(1, 2, 0)
        else:
            self.layout = "torch-cpu"
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", sz.to(ACT_DTYPE).contiguous())
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def dequantized(self) -> torch.Tensor:
        """The float32 (N, K) weight the layer multiplies by (for tests and references)."""
        if self.layout == "litmodel":
            return dequantize_int4(unpack_int4(self.weight), self.scales_and_zeros.permute(2, 0, 1), self.group_size)
        eye = torch.eye(self.in_features, dtype=ACT_DTYPE, device=self.weight.device)
        mm = torch.ops.aten._weight_int4pack_mm if self.layout == "tinygemm" else \
            torch.ops.aten._weight_int4pack_mm_for_cpu
        return mm(eye, self.weight, self.group_size, self.scales_and_zeros).float().t().contiguous()

    def decode(self, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """`forward` without its reshapes and casts: ``x`` (rows, K) in bf16 on CPU -> (rows, N) in bf16 (+ bias),
        on ``threads`` threads (default: torch's count)."""
        if x.dtype != ACT_DTYPE or x.device.type != "cpu" or x.dim() != 2:
            return self(x)
        threads = torch.get_num_threads() if threads is None else threads
        if self.layout != "litmodel":
            y = on_threads(lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.weight, self.group_size, self.scales_and_zeros), x, threads)
            return y + self.bias if self.bias is not None else y
        x = x.contiguous()
        b = self.bias if self.bias is not None and self.bias.dtype == ACT_DTYPE else None
        N, K, g = self.out_features, self.in_features, self.group_size
        if x.size(0) <= KERNEL_ROWS:  # a decode step, a speculative verification: one pass over the codes
            y = torch.empty(x.size(0), N, dtype=ACT_DTYPE)
            kernels.gemv_int4(self.weight.data_ptr(), self.scales_and_zeros.data_ptr(), g, x.data_ptr(),
                              0 if b is None else b.data_ptr(), y.data_ptr(), N, K, x.size(0), threads)
        else:  # a prompt: the bf16 weight, made once for all its rows
            w = torch.empty(N, K, dtype=ACT_DTYPE)
            kernels.int4_dequant(self.weight.data_ptr(), self.scales_and_zeros.data_ptr(), g, w.data_ptr(), N, K,
                                 threads)
            y = F.linear(x, w, b)
        return y + self.bias if self.bias is not None and b is None else y

    def decode_fn(self):
        """``decode(x, threads)`` for the fused decode step (`litmodel.fast_decode.DecodeBlock`), with the
        pointers and sizes of litmodel's kernel looked up once for its one-row calls."""
        if self.layout != "litmodel" or (self.bias is not None and self.bias.dtype != ACT_DTYPE):
            return self.decode
        w, sz, b = self.weight, self.scales_and_zeros, self.bias
        args = (w.data_ptr(), sz.data_ptr(), self.group_size)
        b_ptr, N, K = 0 if b is None else b.data_ptr(), self.out_features, self.in_features

        def decode(x: torch.Tensor, threads: int) -> torch.Tensor:
            if x.dtype != ACT_DTYPE or x.dim() != 2 or x.size(0) != 1 or not x.is_contiguous():
                return self.decode(x, threads)
            y = torch.empty(1, N, dtype=ACT_DTYPE)
            kernels.gemv_int4(*args, x.data_ptr(), b_ptr, y.data_ptr(), N, K, 1, threads)
            return y

        decode.tensors = (w, sz, b)  # held by the function: the addresses it uses stay valid
        return decode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(ACT_DTYPE)
        if x2.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.group_size, self.scales_and_zeros)
            y = y + self.bias if self.bias is not None else y
        else:
            y = self.decode(x2)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, " \
               f"bias={self.bias is not None}, layout={self.layout}"


def quantize_int4(model: nn.Module, group_size: int = 64) -> nn.Module:
    """Replace every `nn.Linear` whose shape the int4 kernels support with an `Int4Linear` (in place;
    returns ``model``). Layers they do not support keep their precision, named in one log line."""
    if group_size not in GROUP_SIZES:
        raise LitModelError(f"--int4_group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    kept = []
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                full = f"{name}.{child_name}" if name else child_name
                if int4_supported(child.out_features, child.in_features, group_size):
                    setattr(module, child_name, Int4Linear(child, group_size))
                else:
                    kept.append(f"{full} ({child.out_features}x{child.in_features})")
    if kept:
        log.warning("int4: kept %d layer(s) in %s (int4 needs out %% 16 == 0 and in %% %d == 0): %s", len(kept),
                    next((p.dtype for p in model.parameters()), "their dtype"), group_size, ", ".join(kept))
    return model
