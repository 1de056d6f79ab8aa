"""FLOP formulas against torch's FlopCounterMode, the GPU peak table, the CPU peak cache, MFU <= 100%."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from litmodel import build_model
from litmodel.config import Config
from litmodel import flops as flops_mod
from litmodel.flops import Peak, cpu_peak, forward_flops_per_token, gpu_peak, mfu, peak_flops, train_flops_per_token
from litmodel.lora import apply_lora, mark_only_lora_as_trainable

CONFIGS = {
    "gpt2": dict(model_type="gpt2", bias=True, tie_embeddings=True, learned_pos_emb=True, rotary_percentage=0.0),
    "neox": dict(model_type="gpt_neox", bias=True, parallel_residual=True, rotary_percentage=0.25),
    "llama-gqa": dict(model_type="llama", n_query_groups=2, intermediate_size=96),
}
LORA = {"full": None, "lora-qv": ("query", "value"), "lora-mlp": ("mlp",),
        "lora-all": ("query", "key", "value", "projection", "mlp", "head")}


def _model(family: str, mode: str):
    config = Config(block_size=32, vocab_size=128, n_layer=2, n_head=4, n_embd=64, **CONFIGS[family])
    model = build_model(config)
    if LORA[mode]:
        apply_lora(model, targets=LORA[mode], r=4, dropout=0.1)
        mark_only_lora_as_trainable(model)
    return model, config


def _counted(model, T: int, backward: bool, B: int = 2) -> float:
    idx = torch.randint(0, 128, (B, T))
    # the math kernel: torch's counter has no formula for the fused CPU attention kernel
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if backward:
            logits = model(idx)
            F.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
        else:
            with torch.no_grad():
                model(idx)
    return counter.get_total_flops() / (B * T)


@pytest.mark.parametrize("mode", list(LORA))
@pytest.mark.parametrize("family", list(CONFIGS))
def test_train_flops_match_flop_counter(family, mode):
    model, config = _model(family, mode)
    T = 24
    counted = _counted(model, T, backward=True)
    formula = train_flops_per_token(model, config, T)
    assert abs(formula / counted - 1) < 0.05, (formula, counted)
    if mode == "full":  # 6N + attention (3x its forward)
        n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert formula == 6 * n + 3 * 4 * config.n_layer * config.n_head * config.head_size * T


@pytest.mark.parametrize("family", list(CONFIGS))
def test_forward_flops_match_flop_counter(family):
    model, config = _model(family, "lora-qv")
    counted = _counted(model, 16, backward=False)
    assert abs(forward_flops_per_token(model, config, 16) / counted - 1) < 0.05


def test_flops_see_through_wrappers():
    from litmodel.fabric import Fabric

    model, config = _model("llama-gqa", "lora-qv")
    expected = train_flops_per_token(model, config, 8)
    wrapped = Fabric(accelerator="cpu", activation_checkpointing=True).setup(model)
    assert type(wrapped.module.blocks[0]).__name__ == "CheckpointWrapper"
    compiled = torch.compile(wrapped)  # not run: only the wrappers' structure matters
    assert train_flops_per_token(compiled, config, 8) == train_flops_per_token(wrapped, config, 8) == expected


@pytest.mark.parametrize("name, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16-mixed", 989.5), ("NVIDIA H100 PCIe", "bf16-true", 756.5),
    ("NVIDIA H100 NVL", "16-mixed", 835.5), ("NVIDIA H200", "bf16-mixed", 989.5), ("NVIDIA B200", "bf16-mixed", 2250),
    ("NVIDIA A100-SXM4-80GB", "32-true", 19.5), ("NVIDIA A100 80GB PCIe", "bf16-mixed", 312),
    ("NVIDIA L4", "bf16-mixed", 121), ("NVIDIA L40S", "bf16-mixed", 362), ("NVIDIA A10G", "16-mixed", 125),
    ("NVIDIA GeForce RTX 4090", "bf16-mixed", 165.2), ("NVIDIA GeForce RTX 3090", "32-true", 35.6),
    ("Tesla V100-SXM2-16GB", "16-mixed", 125), ("Tesla V100-PCIE-32GB", "32-true", 14),
])
def test_gpu_peak_table(name, precision, tflops):
    peak = gpu_peak(name, precision)
    assert peak.flops == pytest.approx(tflops * 1e12)
    assert "dense" in peak.label and not peak.measured


def test_gpu_peak_tf32_and_missing_dtype():
    assert gpu_peak("NVIDIA A100-SXM4-40GB", "32-true", tf32=True).flops == pytest.approx(156e12)
    assert gpu_peak("Tesla V100-SXM2-16GB", "32-true", tf32=True).flops == pytest.approx(15.7e12)  # no tf32 units
    v100_bf16 = gpu_peak("Tesla V100-SXM2-16GB", "bf16-mixed")
    assert v100_bf16.flops is None and "no bf16" in v100_bf16.label


def test_unknown_device_has_no_mfu():
    peak = gpu_peak("NVIDIA Quantum Toaster 9000", "bf16-mixed")
    assert peak.flops is None
    assert peak.label == ("MFU not reported: unknown device 'NVIDIA Quantum Toaster 9000' "
                          "(add it to litmodel/flops.py)")
    assert mfu(1e12, peak) is None


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(flops_mod, "measure_matmul_flops", lambda dtype, device, seconds: calls.append(dtype) or 5e10)
    path = tmp_path / "peak.json"
    first = cpu_peak("32-true", path=path)
    second = cpu_peak("32-true", path=path)
    assert calls == [torch.float32] and first.flops == second.flops == 5e10
    assert first.measured and first.label.startswith("of measured peak (50 GFLOP/s, ")
    assert f"{torch.get_num_threads()} thread" in first.label
    cpu_peak("bf16-mixed", path=path)  # mixed precision is measured in the autocast dtype
    assert calls == [torch.float32, torch.bfloat16]
    keys = list(json.loads(path.read_text()))
    assert len(keys) == 2 and all(f"threads={torch.get_num_threads()}" in k and torch.__version__ in k for k in keys)


def test_peak_flops_cpu_uses_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LITMODEL_CACHE_DIR", str(tmp_path))
    peak = peak_flops(torch.device("cpu"), "32-true", seconds=0.2)  # a real (short) probe
    assert peak.flops > 1e8 and (tmp_path / "peak_flops.json").is_file()


def test_mfu_never_above_100_percent(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(flops_mod, "measure_matmul_flops", lambda dtype, device, seconds: 1e10)
    path = tmp_path / "peak.json"
    peak = cpu_peak("32-true", path=path)
    assert mfu(5e9, peak) == pytest.approx(0.5)
    with caplog.at_level(logging.WARNING, logger="litmodel.flops"):
        assert mfu(2e10, peak) == 1.0
    assert "raising the cached peak" in caplog.text
    assert peak.flops == 2e10 and "20 GFLOP/s" in peak.label
    assert cpu_peak("32-true", path=path).flops == 2e10  # the cache was raised too
    published = gpu_peak("NVIDIA H100 80GB HBM3", "bf16-mixed")
    assert mfu(2e15, published) == 1.0 and published.flops == pytest.approx(989.5e12)
    assert mfu(float("nan"), published) is None
    assert mfu(1e12, Peak(None, "unknown")) is None
