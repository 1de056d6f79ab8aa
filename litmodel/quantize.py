"""Int8 weight-only quantization and batch-1 decode kernels, in pure PyTorch.

* `quantize_int8(model)`: every `nn.Linear` (the output head included) becomes an `Int8Linear`:
  int8 weights with one scale per output channel (symmetric, absmax / 127), dequantized inside the
  matmul by ``torch._weight_int8pack_mm`` (CPU and CUDA; a dequantize-then-matmul fallback elsewhere).
  A tied output head and embedding share one int8 matrix (`Int8Embedding` reads the same rows and
  scales), so the weights take about half the memory of bf16.
* `optimize_for_decode(model)`: every `nn.Linear` becomes a `DecodeLinear` (same parameters, same
  state dict) whose single-row product, under `torch.compile` on CPU, is a fused matrix-vector kernel
  that reads several blocks of weight rows at once (see `_matvec`) instead of a BLAS call.

Batch-1 decoding is bound by memory bandwidth: every token reads every weight once, so the bytes of
weights per token set the speed limit (see benchmarks/RESULTS_generate.md for what each path reaches).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from litmodel.precision import native_half_matmul

# the values of --quantize: weight-only formats for inference (generate/, serving, evaluation) and for the frozen
# base of QLoRA finetuning (litgpt's "bnb.nf4" accepted as an alias), each -> the mode it selects
INFERENCE_QUANTIZE_MODES = {"int8": "int8", "int4": "int4"}
TRAINING_QUANTIZE_MODES = {"nf4": "nf4", "bnb.nf4": "nf4"}


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


STREAMS = 4  # weight row blocks a matrix-vector kernel reads at the same time


def _matvec(x: torch.Tensor, weight: torch.Tensor, streams: int = STREAMS) -> torch.Tensor:
    """``x @ weight.T`` in float32 for a single row ``x`` (..., K), written so that inductor emits one
    fused matrix-vector kernel that reads ``streams`` blocks of rows at once.

    One sequential stream of weights reaches only ~10-12 GB/s per core here (the hardware prefetcher
    keeps few lines in flight); reading 4 distant row blocks in the same loop raises it by ~40%. The
    blocks are computed as separate reductions over the same loop range, which inductor fuses into
    one loop with one accumulator per block. Accumulation is in float32.
    """
    xf = x.reshape(-1).float()
    n = weight.size(0)
    while streams > 1 and n % streams:
        streams //= 2
    rows = n // streams
    parts = [(xf * weight[j * rows:(j + 1) * rows].float()).sum(-1) for j in range(streams)]
    out = parts[0] if streams == 1 else torch.cat(parts)
    return out.reshape(*x.shape[:-1], n)


def _few_rows(x: torch.Tensor) -> bool:
    return x.numel() // x.size(-1) == 1


class DecodeLinear(nn.Linear):
    """`nn.Linear` whose one-row product is a fused matrix-vector kernel under `torch.compile` on CPU
    (same parameters, same state dict; outside `torch.compile` it is a plain `nn.Linear`)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DecodeLinear":
        """A new layer holding the very same parameter objects (a tied weight stays tied)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_compiling() and x.device.type == "cpu" and _few_rows(x):
            out = _matvec(x, self.weight)
            if self.bias is not None:
                out = out + self.bias.float()
            return out.to(x.dtype)
        if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and not _is_compiling() \
                and not _few_rows(x) and not native_half_matmul(x.dtype):
            # CPUs without bf16/fp16 instructions (AVX2) run half-precision GEMMs ~5x slower than fp32:
            # multiply the (exactly) upcast values in float32 and round the result once, as F.linear does
            bias = self.bias.float() if self.bias is not None else None
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def swap_modules(model: nn.Module, fn) -> None:
    """Replace, in place, every submodule ``child`` of ``model`` for which ``fn(child)`` returns a module
    by that module (``fn`` returns None to keep a child)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            new = fn(child)
            if new is not None:
                setattr(module, name, new)


def optimize_for_decode(model: nn.Module, compiled: bool = True) -> nn.Module:
    """Prepare a model's linear layers for fast batch-1 decoding on CPU, in place.

    ``compiled=True`` (the decode step will be `torch.compile`d): every plain `nn.Linear` becomes a
    `DecodeLinear` (weights, state dict and tying untouched). ``compiled=False`` with float32 weights
    on CPU: the weights are stored column-major (same values and shapes, transposed strides), which
    makes `F.linear` use MKL's faster matrix-vector kernel (~1.5x at batch 1); prefill gets slower,
    so this is only for eager decoding.
    """
    swap_modules(model, lambda child: DecodeLinear.from_linear(child) if type(child) is nn.Linear else None)
    if not compiled:
        relaid: dict[int, nn.Parameter] = {}
        for module in model.modules():
            if isinstance(module, DecodeLinear) and module.weight.device.type == "cpu" \
                    and module.weight.dtype == torch.float32 and module.weight.is_contiguous():
                key = id(module.weight)
                if key not in relaid:
                    relaid[key] = nn.Parameter(module.weight.detach().t().contiguous().t(),
                                               requires_grad=module.weight.requires_grad)
                module.weight = relaid[key]
        wte = getattr(model, "wte", None)
        if isinstance(wte, nn.Embedding) and id(wte.weight) in relaid:  # keep a tied embedding tied
            wte.weight = relaid[id(wte.weight)]
    return model


# ---- int8 weight-only quantization -------------------------------------------------------------------
def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per row) with ``weight ~= int8 * scale[:, None]``."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


@functools.lru_cache(maxsize=None)
def _int8pack_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._weight_int8pack_mm`` runs for this device and activation dtype (probed once)."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    try:
        x = torch.ones(1, 32, dtype=dtype, device=device_type)
        w = torch.ones(8, 32, dtype=torch.int8, device=device_type)
        s = torch.ones(8, dtype=dtype, device=device_type)
        y = torch._weight_int8pack_mm(x, w, s)
        return bool((y.float() == 32).all())
    except Exception:
        return False


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (out, in) and a scale per output channel.

    ``y = (x @ int8.T) * scales + bias``, computed by ``torch._weight_int8pack_mm`` (a fused
    dequantizing kernel on CPU and CUDA; it stays an extern call inside a compiled graph) where it
    runs, else by a dequantize-then-matmul fallback. The weights are never dequantized in memory.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        # whether torch._weight_int8pack_mm runs here (decided once, outside any torch.compile trace)
        self.fused = _int8pack_mm_works(torch.device(device or "cpu").type, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, shared: "Int8Linear | None" = None) -> "Int8Linear":
        dtype = linear.weight.dtype
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.device, dtype)
        if shared is not None:
            q.weight, q.scales = shared.weight, shared.scales
        else:
            w, s = quantize_weight_int8(linear.weight)
            q.weight, q.scales = w, s.to(dtype)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        if self.fused and x.dtype == self.scales.dtype:
            out = torch._weight_int8pack_mm(x.reshape(-1, x.size(-1)), self.weight, scales)
            out = out.reshape(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * scales
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with a scale per row (shared with a tied `Int8Linear`)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight).to(self.scales.dtype) * self.scales[idx].unsqueeze(-1)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every `nn.Linear` with an `Int8Linear` and the token embedding with an `Int8Embedding`
    (in place; each original weight is released as soon as it is converted).

    With tied embeddings the output head and the embedding share the same int8 matrix and per-row
    scales (a row's scale serves both the lookup and the output channel), keeping the tie.
    """
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    wte = getattr(model, "wte", None)
    head = getattr(model, "lm_head", None)
    swap_modules(model, lambda child: Int8Linear.from_linear(child)
                 if isinstance(child, nn.Linear) and not (tied and child is head) else None)
    if isinstance(wte, nn.Embedding):
        w, s = quantize_weight_int8(wte.weight)
        dtype = wte.weight.dtype
        model.wte = Int8Embedding(w, s.to(dtype))
        if tied and isinstance(getattr(model, "lm_head", None), nn.Linear):
            head = Int8Linear(model.lm_head.in_features, model.lm_head.out_features, False,
                              model.lm_head.weight.device, dtype)
            head.weight, head.scales = model.wte.weight, model.wte.scales
            model.lm_head = head
    elif tied and isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.lm_head = Int8Linear.from_linear(model.lm_head)
    return model
