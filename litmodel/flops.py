"""FLOP counts per token and model FLOPs utilisation (MFU).

- ``train_flops_per_token(model, config, seq_len)``: the matrix-product FLOPs one training token
  costs (forward + backward), read off the model as it will train: which weights are trainable
  (``requires_grad``) decides which weight gradients are computed, and whether a layer's input
  carries a gradient decides its input-gradient product. Full training is 6N + attention; LoRA is
  the forward of everything, input gradients through the frozen linears, weight gradients of the
  adapters only, and the attention backward in full (scores and values have no weights: both
  operands get gradients).
- ``forward_flops_per_token``: the same for inference (2N + attention over the context).
- ``peak_flops(device, precision)``: the denominator. GPUs: the published dense (non-sparse) peak
  of the device for the matmul dtype (a table by device name). CPUs: a peak measured once per
  machine (several seconds of large matmuls in the matmul dtype, best of several rounds) and cached
  in ``~/.cache/litmodel/peak_flops.json``, keyed by CPU model, threads, dtype and torch version.
- ``mfu(flops_per_sec, peak)``: utilisation of one device, never above 1: a measured rate above a
  measured peak raises the cached peak (and says so); above a published peak it is clamped with a
  warning (the FLOP count would be wrong).

Attention is counted as PaLM and ``torch.utils.flop_counter`` count it: the full T x T score matrix
per sequence (causal masking does not halve it), 4 * n_head * head_size * T FLOPs per token and
layer forward, twice that backward. Norms, activations, softmax and the loss are not counted.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from litmodel.config import Config
from litmodel.atomic import atomic_file

log = logging.getLogger(__name__)


# ---- FLOPs per token ------------------------------------------------------------------------------
def _unwrap(module: nn.Module) -> nn.Module:
    """The model under Fabric, DDP, torch.compile and activation-checkpoint wrappers."""
    children = module.__dict__.get("_modules", {})
    for attr in ("_original_module", "_orig_mod", "_checkpoint_wrapped_module", "module"):
        if isinstance(children.get(attr), nn.Module):
            return _unwrap(children[attr])
    return module


def _requires_grad(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def _weight(module: nn.Module) -> torch.Tensor:
    """The stored weight (under a parametrization such as NF4 dequantization: the original)."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        return parametrizations.weight.original
    return module.weight


def _linear(module: nn.Module, input_grad: bool, fwd_only: bool = False) -> tuple[float, bool]:
    """(FLOPs per token, does the output require grad) of a linear-like layer (``nn.Linear``,
    ``LoRALinear``, bitsandbytes' ``Linear4bit``...) whose input requires grad iff ``input_grad``."""
    m = _unwrap(module)
    i, o = m.in_features, m.out_features
    w_grad = _weight(m).requires_grad
    bias = getattr(m, "bias", None)
    flops = 2 * i * o
    if not fwd_only:
        flops += 2 * i * o * (input_grad + w_grad)
    out_grad = input_grad or w_grad or (bias is not None and bias.requires_grad)
    if hasattr(m, "lora_A") and hasattr(m, "lora_B"):  # h = dropout(x); a = h A^T; out += a_i B_i^T per segment
        a_out, b_out = m.lora_A.shape[0], m.lora_B.shape[0]  # (k*r) rows of A, enabled rows of B
        r = m.lora_B.shape[1]
        if m.lora_A.dim() == 3:  # one adapter per expert (E, r, in), (E, out, r): a token uses one of them
            a_out, b_out, r = m.lora_A.shape[1], m.lora_B.shape[1], m.lora_B.shape[2]
        a_grad = input_grad or m.lora_A.requires_grad
        flops += 2 * i * a_out + 2 * r * b_out
        if not fwd_only:
            flops += 2 * i * a_out * (input_grad + m.lora_A.requires_grad)
            flops += 2 * r * b_out * (a_grad + m.lora_B.requires_grad)
        out_grad = out_grad or a_grad or m.lora_B.requires_grad
    return float(flops), out_grad


def _attention(config: Config, seq_len: int, backward: bool) -> float:
    fwd = 4 * config.n_head * config.head_size * seq_len  # QK^T and AV, per token
    return float(fwd * (3 if backward else 1))


def _count(model: nn.Module, config: Config, seq_len: int, fwd_only: bool) -> float:
    model = _unwrap(model)
    blocks = getattr(model, "blocks", None)
    if blocks is None:  # not a litmodel transformer: every linear, inputs with gradients, no attention
        return sum(_linear(m, True, fwd_only)[0] for m in model.modules()
                   if hasattr(m, "in_features") and hasattr(m, "out_features") and hasattr(m, "weight"))
    # follow the residual stream: does the activation entering each layer carry a gradient?
    res = _requires_grad(model.wte) or _requires_grad(getattr(model, "wpe", None))
    total = 0.0
    for block in blocks:
        block = _unwrap(block)
        h1 = res or _requires_grad(block.norm_1)
        f, qkv = _linear(block.attn.qkv, h1, fwd_only)
        total += f + _attention(config, seq_len, backward=qkv and not fwd_only)
        f, attn_out = _linear(block.attn.proj, qkv, fwd_only)
        total += f
        res_mid = res or attn_out
        h2 = (res if getattr(block, "parallel_residual", False) else res_mid) or _requires_grad(block.norm_2)
        top_k = getattr(block.mlp, "top_k", 1)  # a mixture of experts: each token runs top_k experts
        if hasattr(block.mlp, "router"):
            total += _linear(block.mlp.router, h2, fwd_only)[0]
        f, fc = _linear(block.mlp.fc, h2, fwd_only)
        total += top_k * f
        f, mlp_out = _linear(block.mlp.proj, fc, fwd_only)
        total += top_k * f
        res = res_mid or mlp_out
    f, _ = _linear(model.lm_head, res or _requires_grad(model.norm_f), fwd_only)
    return total + f


def train_flops_per_token(model: nn.Module, config: Config, seq_len: int) -> float:
    """Matrix-product FLOPs of one training token (forward + backward) at sequence length ``seq_len``.

    Trainable vs frozen comes from ``requires_grad``: full training gives 6N + attention (N: the
    matmul weights, head included; embeddings are lookups); LoRA/QLoRA gives the forward of
    everything, input gradients through frozen layers (none before the first layer whose input
    carries a gradient), adapter weight gradients, and the attention backward in full.
    Activation-checkpointing recomputation is not counted (model FLOPs, not hardware FLOPs).
    """
    return _count(model, config, seq_len, fwd_only=False)


def forward_flops_per_token(model: nn.Module, config: Config, seq_len: int) -> float:
    """Matrix-product FLOPs of one token's forward pass attending to ``seq_len`` positions (2N + attention)."""
    return _count(model, config, seq_len, fwd_only=True)


# ---- peak FLOP/s ----------------------------------------------------------------------------------
# Published dense (non-sparse) peaks in FLOP/s per GPU, from NVIDIA's datasheets/whitepapers (the
# sheets print tensor-core figures "with sparsity": halved here). Matched in order, first wins.
# bf16/fp16 with float32 accumulation (what PyTorch uses). No tf32/bf16 before Ampere.
_T = 1e12
GPU_PEAKS: list[tuple[str, str, dict[str, float]]] = [
    # (regex on the lower-cased device name, label, {dtype: FLOP/s})
    (r"gb200|b200", "B200", {"fp32": 75 * _T, "tf32": 1100 * _T, "bf16": 2250 * _T, "fp16": 2250 * _T}),
    (r"h200.*nvl", "H200 NVL", {"fp32": 60 * _T, "tf32": 417.5 * _T, "bf16": 835.5 * _T, "fp16": 835.5 * _T}),
    (r"h200|gh200", "H200 SXM", {"fp32": 67 * _T, "tf32": 494.5 * _T, "bf16": 989.5 * _T, "fp16": 989.5 * _T}),
    (r"h100.*nvl", "H100 NVL", {"fp32": 60 * _T, "tf32": 417.5 * _T, "bf16": 835.5 * _T, "fp16": 835.5 * _T}),
    (r"h100.*(pcie|hbm2e)", "H100 PCIe", {"fp32": 51 * _T, "tf32": 378 * _T, "bf16": 756.5 * _T, "fp16": 756.5 * _T}),
    (r"h100|h800", "H100 SXM", {"fp32": 67 * _T, "tf32": 494.5 * _T, "bf16": 989.5 * _T, "fp16": 989.5 * _T}),
    (r"a100|a800", "A100", {"fp32": 19.5 * _T, "tf32": 156 * _T, "bf16": 312 * _T, "fp16": 312 * _T}),
    (r"l40s", "L40S", {"fp32": 91.6 * _T, "tf32": 183 * _T, "bf16": 362 * _T, "fp16": 362 * _T}),
    (r"l40\b", "L40", {"fp32": 90.5 * _T, "tf32": 90.5 * _T, "bf16": 181 * _T, "fp16": 181 * _T}),
    (r"\bl4\b", "L4", {"fp32": 30.3 * _T, "tf32": 60 * _T, "bf16": 121 * _T, "fp16": 121 * _T}),
    # A10G: AWS publishes no separate sheet; the A10 datasheet figures (as Lightning uses)
    (r"a10g|\ba10\b", "A10/A10G", {"fp32": 31.2 * _T, "tf32": 62.5 * _T, "bf16": 125 * _T, "fp16": 125 * _T}),
    (r"rtx 4090", "RTX 4090", {"fp32": 82.6 * _T, "tf32": 82.6 * _T, "bf16": 165.2 * _T, "fp16": 165.2 * _T}),
    (r"rtx 3090", "RTX 3090", {"fp32": 35.6 * _T, "tf32": 35.6 * _T, "bf16": 71 * _T, "fp16": 71 * _T}),
    (r"v100.*pcie", "V100 PCIe", {"fp32": 14 * _T, "fp16": 112 * _T}),
    (r"v100", "V100 SXM2", {"fp32": 15.7 * _T, "fp16": 125 * _T}),
    (r"\bt4\b", "T4", {"fp32": 8.1 * _T, "fp16": 65 * _T}),
]


@dataclass
class Peak:
    """The FLOP/s MFU divides by (``None``: not known, no MFU) and how to print what it is."""

    flops: float | None
    label: str
    measured: bool = False  # CPU: measured here and cached under cache_key
    cache_key: str | None = field(default=None, repr=False)
    cache_path: Path | None = field(default=None, repr=False)
    cpu: str = ""
    threads: int = 0


def matmul_dtype(precision: str) -> torch.dtype:
    """The dtype the matrix products run in under a Fabric precision (mixed: the autocast dtype)."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def _uses_tf32() -> bool:
    try:
        if torch.backends.cuda.matmul.allow_tf32:
            return True
    except (AttributeError, RuntimeError):
        pass
    return torch.get_float32_matmul_precision() != "highest"


def gpu_peak(name: str, precision: str, tf32: bool = False) -> Peak:
    """The published dense peak of the GPU called ``name`` for ``precision`` (table lookup)."""
    kind = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(matmul_dtype(precision), "tf32" if tf32 else "fp32")
    lowered = name.lower()
    for pattern, label, peaks in GPU_PEAKS:
        if re.search(pattern, lowered):
            if kind == "tf32" and "tf32" not in peaks:
                kind = "fp32"
            if kind not in peaks:
                return Peak(None, f"MFU not reported: {label} has no {kind} peak (no {kind} support)")
            return Peak(peaks[kind], f"of {label} dense {kind} peak ({peaks[kind] / _T:.0f} TFLOP/s)")
    return Peak(None, f"MFU not reported: unknown device {name!r} (add it to litmodel/flops.py)")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cache_dir() -> Path:
    """``$LITMODEL_CACHE_DIR``, else ``$XDG_CACHE_HOME/litmodel``, else ``~/.cache/litmodel``."""
    if os.environ.get("LITMODEL_CACHE_DIR"):
        return Path(os.environ["LITMODEL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "litmodel"


def measure_matmul_flops(dtype: torch.dtype, device: torch.device | str = "cpu", seconds: float = 5.0,
                         rounds: int = 5, max_size: int = 2048, wall_only: bool = False) -> float:
    """The best matrix-product rate (FLOP/s) over ``rounds`` rounds filling ``seconds`` in all.

    The size grows from 512 until one product takes >= 50 ms (capped at ``max_size``), so a slow dtype (bf16
    on a CPU without bf16 units) is probed with small matrices instead of taking minutes. On CPU a
    round's rate is the larger of FLOPs per wall second and FLOPs per CPU second of this process
    times its threads: on a shared machine the process is preempted, and wall time alone would
    measure the neighbours' load (seen here: 9 GFLOP/s by wall time, 113 by CPU time, at load 11
    on 2 cores), not what the cores can do. ``wall_only``: the rate by wall time (how busy the
    machine is right now)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    threads = torch.get_num_threads()
    size = 512
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        a @ b  # warm-up
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        sync()
        took = min(time.perf_counter() - t0, (time.process_time() - c0) / threads if device.type == "cpu" else 1e9)
        if took >= 0.05 or size >= max_size:
            break
        size *= 2
    best = 0.0
    for _ in range(rounds):
        n, start, cpu_start = 0, time.perf_counter(), time.process_time()
        while n < 2 or time.perf_counter() - start < seconds / rounds:
            a @ b
            n += 1
        sync()
        flops = 2 * size**3 * n
        best = max(best, flops / (time.perf_counter() - start))
        if device.type == "cpu" and not wall_only:
            best = max(best, flops * threads / max(time.process_time() - cpu_start, 1e-9))
    return best


_PROBE = "probe=2"  # the probe's version: entries of an older probe (wall time only) are measured again


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, flops: float) -> None:
    data = _read_cache(path)
    data[key] = {"flops": flops, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    except OSError as err:  # a read-only home must not stop training
        log.warning("could not write the peak-FLOP/s cache %s (%s)", path, err)


def _cpu_label(flops: float, cpu: str, threads: int) -> str:
    return f"of measured peak ({flops / 1e9:.0f} GFLOP/s, {cpu}, {threads} thread{'s' * (threads != 1)})"


def cpu_peak(precision: str, seconds: float = 5.0, path: Path | None = None, refresh: bool = False) -> Peak:
    """The measured matmul peak of this CPU for ``precision`` with the current thread count, cached."""
    dtype = matmul_dtype(precision)
    cpu, threads = cpu_name(), torch.get_num_threads()
    key = f"{cpu}|threads={threads}|{str(dtype).removeprefix('torch.')}|torch={torch.__version__}|{_PROBE}"
    path = path or cache_dir() / "peak_flops.json"
    entry = None if refresh else _read_cache(path).get(key)
    if entry and entry.get("flops"):
        flops = float(entry["flops"])
    else:
        log.info("measuring this CPU's peak matmul rate (%s, %d threads, %.0f s; cached in %s)",
                 dtype, threads, seconds, path)
        flops = measure_matmul_flops(dtype, "cpu", seconds=seconds)
        _write_cache(path, key, flops)
    return Peak(flops, _cpu_label(flops, cpu, threads), measured=True, cache_key=key, cache_path=path, cpu=cpu,
                threads=threads)


def peak_flops(device: torch.device, precision: str, seconds: float = 5.0) -> Peak:
    """The FLOP/s one device can reach in ``precision``'s matmul dtype: the published dense peak of
    a known GPU, the measured and cached peak of a CPU, or ``Peak(None, why)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device), precision, tf32=_uses_tf32())
    if device.type == "cpu":
        return cpu_peak(precision, seconds=seconds)
    return Peak(None, f"MFU not reported: unknown device {device.type!r} (add it to litmodel/flops.py)")


def mfu(flops_per_sec: float, peak: Peak) -> float | None:
    """Model FLOPs utilisation of one device (``flops_per_sec``: what one process achieves), in [0, 1];
    None when the peak is unknown. A rate above a measured peak means the probe was unlucky (a
    busy machine): the cached peak is raised to the rate, and a log line says so."""
    if peak.flops is None or not peak.flops > 0 or flops_per_sec != flops_per_sec:
        return None
    if flops_per_sec <= peak.flops:
        return max(0.0, flops_per_sec / peak.flops)
    if peak.measured:
        log.warning("measured %.1f GFLOP/s exceeds the cached peak %.1f GFLOP/s: raising the cached peak",
                    flops_per_sec / 1e9, peak.flops / 1e9)
        peak.flops = float(flops_per_sec)
        peak.label = _cpu_label(peak.flops, peak.cpu, peak.threads)
        if peak.cache_path is not None and peak.cache_key is not None:
            _write_cache(peak.cache_path, peak.cache_key, peak.flops)
    else:
        log.warning("achieved %.1f TFLOP/s exceeds the published peak %.1f TFLOP/s: the FLOP count is too high; "
                    "reporting MFU 100%%", flops_per_sec / _T, peak.flops / _T)
    return 1.0
