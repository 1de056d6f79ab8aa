"""NF4 (QLoRA) base weights: the format against torchao's reference, the linear layer against dequantized fp32
weights, loading tensor by tensor, and the peak memory while loading."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from litmodel import Config, build_model
from litmodel.checkpoint import load_model, save_checkpoint_dir
from litmodel.lora import LoRALinear, apply_lora, mark_only_lora_as_trainable, merge_lora

if importlib.util.find_spec("torchao") is None:  # not importorskip: torchao's import logs CUDA warnings
    pytest.skip("needs torchao (the quant extra)", allow_module_level=True)
from litmodel.nf4 import (NF4_LEVELS, NF4Linear, dequantize_nf4, is_nf4, load_model_nf4, nf4_block_sizes,  # noqa: E402
                          quantize_nf4, torchao_nf4)

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(name="tiny", model_type="llama", block_size=32, vocab_size=96, n_layer=2, n_head=4, n_query_groups=2,
            n_embd=64, intermediate_size=128)
# the largest half-gap between adjacent NF4 levels ((1.0 - 0.6962) / 2): the worst rounding error, in block absmaxes
NF4_HALF_GAP = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2


def test_quantize_equals_torchao_reference():
    ao = torchao_nf4()
    w = torch.randn(128, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    ref = ao.to_nf4(w)
    mine = quantize_nf4(w, scaler_block_size=256, chunk_elements=4096)  # several chunks
    assert torch.equal(mine.quantized_data, ref.quantized_data)
    assert torch.equal(mine.quantized_scalers, ref.quantized_scalers)
    torch.testing.assert_close(mine.quantization_factor, ref.quantization_factor, rtol=0, atol=0)
    # the fast dequantization is torchao's, bit for bit
    assert torch.equal(dequantize_nf4(mine), ref.get_original_weight())


def test_nf4_error_within_known_bound():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    q = quantize_nf4(w)
    dq = dequantize_nf4(q)
    absmax = w.view(-1, 64).abs().amax(1, keepdim=True)
    stored = q.dequantize_scalers(q.quantized_scalers, q.quantization_factor, q.scaler_block_size)[:, None]
    err = (dq - w).view(-1, 64).abs()
    # rounding to the nearest level (at most the half gap, in absmaxes) plus the int8 error of the stored absmax
    assert (err <= NF4_HALF_GAP * absmax + (stored - absmax).abs() + 1e-6).all()
    assert ((stored - absmax).abs() / absmax).max() < 0.02
    rel = err / absmax
    # for normal weights NF4's mean error is ~0.04 absmax (QLoRA's information-theoretic optimum for N(0, 1))
    assert rel.mean() < 0.05
    assert nf4_block_sizes((6, 64)) == (64, 3) and nf4_block_sizes((10, 10)) is None
    assert nf4_block_sizes((3, 64), shards=2) is None and nf4_block_sizes((4096, 2048)) == (64, 256)
    # the same blocks for 1, 2, 4 and 8 processes (whole scaler blocks in every shard)
    assert {nf4_block_sizes((128, 64), shards=w) for w in (1, 2, 4, 8)} == {(64, 16)}


@pytest.mark.parametrize("segments", [None, [(64, True), (32, False), (32, True)]])
def test_nf4_lora_linear_forward_backward_equal_dequantized_fp32(segments):
    torch.manual_seed(0)
    base = nn.Linear(64, 128, bias=True)
    nf4 = quantize_nf4(base.weight.detach())
    dense = nn.Linear(64, 128, bias=True)
    with torch.no_grad():
        dense.weight.copy_(dequantize_nf4(nf4))
        dense.bias.copy_(base.bias)
    q_base = NF4Linear(64, 128, bias=True, device="meta")
    q_base.weight, q_base.bias = nn.Parameter(nf4, requires_grad=False), nn.Parameter(base.bias.detach().clone())
    ref = LoRALinear(dense, r=4, alpha=8, segments=segments)
    q = LoRALinear(q_base, r=4, alpha=8, segments=segments)
    with torch.no_grad():
        for p in (ref.lora_B, q.lora_B):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
        q.lora_A.copy_(ref.lora_A)
    ref.weight.requires_grad_(False)
    x1 = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = ref(x1), q(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-6, atol=1e-6)
    for name in ("lora_A", "lora_B", "bias"):
        torch.testing.assert_close(getattr(q, name).grad, getattr(ref, name).grad, rtol=1e-6, atol=1e-6)
    assert q.weight.grad is None and is_nf4(q.weight)
    # and against the original full-precision weight: only NF4's error (~10% relative, QLoRA's 4-bit NormalFloat)
    w = base.weight.detach()
    assert (dense.weight - w).norm() / w.norm() < 0.12


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    config = Config(**TINY)
    model = build_model(config)
    model.init_weights()
    return save_checkpoint_dir(tmp_path_factory.mktemp("nf4") / "tiny", model, config)


def test_load_model_nf4_equals_dense_model_with_dequantized_weights(tiny_ckpt):
    q = load_model_nf4(tiny_ckpt, dtype=torch.float32)
    dense = load_model(tiny_ckpt)
    names = {n for n, p in q.named_parameters() if is_nf4(p)}
    assert names == {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert all(not p.requires_grad for p in q.parameters())
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    exact = dense(x)
    with torch.no_grad():
        for n, p in dense.named_parameters():
            if n in names:
                p.copy_(dequantize_nf4(q.get_parameter(n)))
    torch.testing.assert_close(q(x), dense(x), rtol=1e-5, atol=1e-5)
    assert (q(x) - exact).abs().max() < 0.2 * exact.abs().max()
    # LoRA on top: trains, and merging gives dense weights equal to dequantized base + update
    apply_lora(q, targets="query,value,mlp", r=4, alpha=8)
    mark_only_lora_as_trainable(q)
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = F.cross_entropy(q(x).flatten(0, 1), x.roll(-1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        before = q(x)
        merged = merge_lora(q)
        assert not is_nf4(merged.blocks[0].attn.qkv.weight) and is_nf4(merged.blocks[0].attn.proj.weight)
        torch.testing.assert_close(merged(x), before, rtol=1e-5, atol=1e-5)


PEAK_SCRIPT = r"""
import json, sys, torch
from litmodel.nf4 import load_model_nf4, nf4_model_nbytes, quantize_nf4
quantize_nf4(torch.randn(64, 64))  # import torchao and warm up the kernels before measuring

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
start = status("VmRSS")
model = load_model_nf4(sys.argv[1], dtype=torch.float32)
print(json.dumps({"start": start, "peak": status("VmHWM"), "model": nf4_model_nbytes(model)}))
"""


@pytest.mark.slow
def test_peak_memory_while_loading_is_nf4_model_plus_largest_tensor(tmp_path):
    """A ~100 MB fp32 checkpoint loads into NF4 with a peak RSS of the NF4 model + the largest tensor + a few MB."""
    config = Config(name="mid", model_type="llama", block_size=64, vocab_size=2048, n_layer=6, n_head=8, n_embd=512,
                    intermediate_size=2048)
    torch.manual_seed(0)
    with torch.no_grad():
        model = build_model(config)
        for p in model.parameters():
            p.normal_(0, 0.02)
    ckpt = save_checkpoint_dir(tmp_path / "mid", model, config)
    full = sum(p.numel() * 4 for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    del model
    # a fixed mmap threshold turns off glibc's adaptive one, which otherwise keeps some freed temporaries in the
    # heap depending on the order of earlier frees: RSS then follows the live tensors, run after run
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(ckpt)], capture_output=True, text=True, env=env,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    grown = m["peak"] - m["start"]
    allowance = 16 * 2**20  # allocator slack + one chunk's temporaries
    print(f"full fp32 {full / 2**20:.1f} MiB, NF4 model {m['model'] / 2**20:.1f} MiB, largest tensor "
          f"{largest / 2**20:.1f} MiB, peak growth while loading {grown / 2**20:.1f} MiB")
    assert grown <= m["model"] + largest + allowance
    assert grown < 0.4 * full
