"""Precision names and what they mean: the one owner of `--precision` for training and for inference.

Training (Fabric) takes Lightning's names: ``32-true``, ``bf16-mixed``, ``bf16-true``, ``16-mixed``, ``16-true``
(aliases 32, "bf16", 16). Inference loads weights in one dtype, so it takes the ``*-true`` names only. ``auto``
(or None) picks what runs fast on this machine.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch

from litmodel.utils import LitModelError, apply_to_tensors

PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "16-true")
PRECISION_ALIASES = {32: "32-true", "32": "32-true", "bf16": "bf16-mixed", 16: "16-mixed", "16": "16-mixed"}
INFERENCE_DTYPES = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}


@functools.lru_cache(maxsize=None)
def native_half_matmul(dtype: torch.dtype) -> bool:
    """Whether oneDNN has native bf16 / fp16 matmul kernels on this CPU (AVX512-BF16, AMX, AVX512-FP16); elsewhere
    half-precision matmuls fall back to a reference path far slower than float32 (~80x on AVX2)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(precision: str | int) -> str:
    """The canonical training precision name for ``precision`` (an alias allowed), or a one-line error."""
    name = PRECISION_ALIASES.get(precision, precision)
    if name not in PRECISIONS:
        raise LitModelError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return name


def resolve_precision(precision: str | None, accelerator: str) -> str:
    """Training precision: ``auto``/None is bf16-mixed where the hardware runs bf16 fast, else 32-true."""
    if precision not in (None, "auto"):
        return precision
    if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()):
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if native_half_matmul(torch.bfloat16) else "32-true"


def inference_dtype(precision: str | None, device: torch.device) -> torch.dtype:
    """The dtype inference loads weights in: ``precision`` (a ``*-true`` name) or, for None/auto, bf16 on GPUs
    (fp16 without bf16) and on CPUs with native bf16 (it halves the bytes read per token), else float32."""
    if precision in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if native_half_matmul(torch.bfloat16) else torch.float32
    if precision not in INFERENCE_DTYPES:
        raise LitModelError(f"unknown --precision {precision!r}; choose one of {', '.join(INFERENCE_DTYPES)}")
    return INFERENCE_DTYPES[precision]


def precision_name(dtype: torch.dtype) -> str:
    """The ``*-true`` name of an inference dtype."""
    return {v: k for k, v in INFERENCE_DTYPES.items()}[dtype]


class Precision:
    """What a training precision does: the autocast dtype (``*-mixed``), the parameter dtype (``*-true``) and the
    conversion of a model's inputs and outputs."""

    def __init__(self, name: str, device_type: str) -> None:
        self.name = check_precision(name)
        self.device_type = device_type
        low = torch.bfloat16 if self.name.startswith("bf16") else torch.float16
        self.autocast_dtype = low if self.name.endswith("-mixed") else None
        self.param_dtype = low if self.name in ("bf16-true", "16-true") else None

    def forward_context(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def convert_input(self, data: Any) -> Any:
        if self.param_dtype is None:
            return data
        return apply_to_tensors(data, lambda t: t.to(self.param_dtype) if t.is_floating_point() else t)

    def convert_output(self, data: Any) -> Any:
        if self.name == "32-true":
            return data
        return apply_to_tensors(data, lambda t: t.float() if t.is_floating_point() and t.dtype != torch.float64 else t)


def param_dtype(precision: str) -> torch.dtype:
    """The dtype weights are held in under a training precision (float32 unless ``*-true`` half)."""
    return Precision(precision, "cpu").param_dtype or torch.float32
