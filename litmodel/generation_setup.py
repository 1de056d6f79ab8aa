"""Loading a checkpoint dir for inference: the device, the dtype, the model and tokenizer, int8/int4
quantization and the fast-decode module swap, the decode step (`Generation`, what `generate/base.py`,
`generate/chat.py` and `generate/serve.py` start from), and the warm-up of a compiled step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from litmodel.checkpoint import check_checkpoint_dir, load_config, load_model
from litmodel.decode_step import DecodeStep, make_decode_step
from litmodel.fast_decode import prepare_fast_decode
from litmodel.generate import generate, model_device
from litmodel.int4 import quantize_int4
from litmodel.precision import inference_dtype
from litmodel.quantize import INFERENCE_QUANTIZE_MODES, optimize_for_decode, quantize_int8
from litmodel.tokenizer import load_tokenizer
from litmodel.utils import LitModelError


def resolve_device(device: str | None = "auto") -> torch.device:
    """``--device`` as a `torch.device`: auto (cuda if available, else cpu), gpu, cpu, cuda or cuda:N."""
    device = (device or "auto").lower()
    if device in ("auto", "gpu"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LitModelError(f"--device {device} requested but CUDA is not available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise LitModelError(f"unknown --device {device!r}; use auto, cpu or cuda[:N]") from None


@dataclass
class Generation:
    """What `setup_generation` loads: the model and tokenizer plus the decode step to use."""

    model: nn.Module
    tokenizer: object
    config: object
    device: torch.device
    dtype: torch.dtype
    decode_step: DecodeStep
    compile: bool = False
    quantize: str | None = None
    load_seconds: float = 0.0


def setup_generation(checkpoint_dir: str | Path, device: str | None = "auto", precision: str | None = None,
                     quantize: str | None = None, compile: bool = False, fast_decode: bool = True,
                     int4_group_size: int = 64) -> Generation:
    """Load a checkpoint dir for generation (shared by `generate/base.py` and `generate/chat.py`).

    Extra files in the dir (a merged LoRA's ``lora.safetensors`` / ``lora_config.yaml``) are ignored.
    ``fast_decode``: prepare the model for batch-1 decoding: eager on CPU, the module swap of
    `litmodel.fast_decode.prepare_fast_decode` (oneDNN-packed weights, a cheaper one-token attention);
    with ``compile``, `litmodel.quantize.optimize_for_decode` (fused matrix-vector kernels). On CUDA the
    decode step is a CUDA graph (see `make_decode_step`).
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    dtype = inference_dtype(precision, dev)
    if quantize is not None and quantize not in INFERENCE_QUANTIZE_MODES:
        raise LitModelError(f"unknown --quantize {quantize!r}; choose one of {', '.join(INFERENCE_QUANTIZE_MODES)} "
                            "(or omit it)")
    d = check_checkpoint_dir(checkpoint_dir)
    tokenizer = load_tokenizer(d)
    config = load_config(d)
    model = load_model(d, device=dev, dtype=dtype, config=config)
    model = prepare_model(model, quantize, compile, fast_decode, int4_group_size)
    step = make_decode_step(model, compile=compile)
    return Generation(model, tokenizer, config, dev, dtype, step, compile, quantize, time.perf_counter() - t0)


def prepare_model(model: nn.Module, quantize: str | None = None, compile: bool = False, fast_decode: bool = True,
                  int4_group_size: int = 64) -> nn.Module:
    """Quantize (``int8``/``int4``) and/or swap in the fast decode modules; returns the model to use."""
    if quantize == "int8":
        quantize_int8(model)
    elif quantize == "int4":
        quantize_int4(model, int4_group_size)
    if not fast_decode or model_device(model).type != "cpu":
        return model
    if compile:
        if quantize is None:
            optimize_for_decode(model, compiled=True)
        return model
    return prepare_fast_decode(model, pack_linears=quantize is None)


def warmup(gen: Generation, max_seq_length: int, prompt_len: int = 2) -> None:
    """Compile the decode step for a cache of ``max_seq_length`` slots before timing anything."""
    list(generate(gen.model, [0] * prompt_len, 3, temperature=0, decode_step=gen.decode_step,
                  max_seq_length=max_seq_length))
