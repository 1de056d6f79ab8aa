"""Int4 weight-only quantization, groupwise (gpt-fast / torchao "tinygemm" format).

`quantize_int4(model, group_size)` replaces every `nn.Linear` (the output head included) with an
`Int4Linear`: each row of the weight is cut into groups of ``group_size`` input columns, and each group
keeps 4-bit codes q in 0..15 with a scale and a zero point:

    w ~= (q - 8) * scale + zero        (zero = group min + 8 * scale, scale = (max - min) / 15)

The codes are packed two per byte by the fused dequantizing matmul kernels:
CPU `torch.ops.aten._weight_int4pack_mm_for_cpu` (packing: `_convert_weight_to_int4pack_for_cpu`) and
CUDA's tinygemm `torch.ops.aten._weight_int4pack_mm` (packing: `_convert_weight_to_int4pack`; not tested
here: no GPU). The kernels take bfloat16 activations (the CPU kernel's float32 path is a slow reference),
so an Int4Linear computes in bfloat16 and returns the input's dtype. Weights are 4.5 bits per value
with group 64 (1/7 of float32, 1/3.6 of bf16). The token embedding stays in the model's dtype (a lookup
reads one row per token; a tied output head gets its own int4 copy).

The kernels need ``out_features % 16 == 0`` and ``in_features % group_size == 0``: other layers keep
their precision and are named in a log line.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from litmodel.utils import LitModelError

log = logging.getLogger(__name__)
GROUP_SIZES = (32, 64, 128, 256)
ACT_DTYPE = torch.bfloat16  # activation dtype of the int4 kernels


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


def int4_supported(out_features: int, in_features: int, group_size: int) -> bool:
    return out_features % 16 == 0 and in_features % group_size == 0


class Int4Linear(nn.Module):
    """A linear layer with groupwise int4 weights, computed by the fused int4 matmul kernel."""

    def __init__(self, linear: nn.Linear, group_size: int = 64) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        if not int4_supported(self.out_features, self.in_features, group_size):
            raise LitModelError(f"int4 needs out_features % 16 == 0 and in_features % {group_size} == 0, got a "
                                f"{self.out_features}x{self.in_features} layer; pick another --int4_group_size")
        q, sz = quantize_groupwise_int4(linear.weight, group_size)
        dev = linear.weight.device
        if dev.type == "cuda":  # tinygemm layout (untested here: no GPU)
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", sz.to(ACT_DTYPE))
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` without its reshapes and casts, for the fused decode step (`litmodel.fast_decode.DecodeBlock`):
        ``x`` (rows, K) in bf16 on CPU."""
        if x.dtype != ACT_DTYPE or x.device.type != "cpu" or x.dim() != 2:
            return self(x)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales_and_zeros)
        return y + self.bias if self.bias is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(ACT_DTYPE)
        if x2.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, " \
               f"bias={self.bias is not None}"


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
