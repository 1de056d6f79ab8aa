"""Inference speed paths: the fast eager decode swap (same tokens and logits as the plain model, both
families, batched and left-padded), int4 weights (kernel == the packing format's reference, quality),
speculative decoding (greedy == plain greedy for k = 1..6; the sampled acceptance rule keeps the target
distribution) and their one-line errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from litmodel import Config, build_model
from litmodel import cpu_linear, fast_decode
from litmodel.cpu_linear import GemvLinear, PackedLinear
from litmodel.fast_decode import DecodeAttention, DecodeBlock, FusedRMSNorm, prepare_fast_decode
from litmodel.generate import generate, generate_batch
from litmodel.generation_cli import model_bytes
from litmodel.generation_setup import prepare_model
from litmodel.llama import Block
from litmodel import int4
from litmodel.int4 import Int4Linear, dequantize_int4, quantize_groupwise_int4, quantize_int4, unpack_int4
from litmodel.speculative import SpeculativeStats, accept_or_resample, check_draft, speculative_generate
from litmodel.utils import LitModelError


pytestmark = pytest.mark.usefixtures("one_thread")
NATIVE_PLAN = DecodeBlock.native_plan


@pytest.fixture(params=["c-layer", "c-kernels", "torch-only"])
def kernels(request, monkeypatch):
    """Run a test with litmodel's C kernels: each Llama layer one C call (`DecodeBlock.step_layer`), or a
    few (`GemvLinear`, `DecodeBlock.step_native`); and without them (oneDNN's `PackedLinear`,
    `DecodeBlock.step_one` in torch ops: what a machine without the built kernels gets)."""
    if request.param == "torch-only":
        monkeypatch.setattr(cpu_linear, "GEMV_KERNELS", {})
        monkeypatch.setattr(fast_decode, "kernels", None)
    elif not cpu_linear.GEMV_KERNELS:
        pytest.skip("litmodel's C kernels are not built (or not usable) here")
    elif request.param == "c-kernels":
        monkeypatch.setattr(DecodeBlock, "native_plan", lambda self, cache: None)
    return PackedLinear if request.param == "torch-only" else GemvLinear


def tiny(arch: str = "llama", std: float = 0.3, seed: int = 0, **kw):
    torch.manual_seed(seed)
    if arch == "llama":
        kw = {"n_query_groups": 2, **kw}
        cfg = Config(name="tiny", block_size=64, vocab_size=96, n_layer=2, n_head=4, n_embd=64, intermediate_size=128,
                     **kw)
    else:  # GPT-NeoX: partial rotary, parallel residual, biases, LayerNorm
        cfg = Config(name="tiny-neox", model_type="gpt_neox", block_size=64, vocab_size=96, n_layer=2, n_head=4,
                     n_embd=64, intermediate_size=128, bias=True, parallel_residual=True, rotary_percentage=0.25,
                     **kw)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, std)
            else:  # norm weights and biases away from 1 and 0
                p.add_(torch.randn_like(p) * 0.1)
    return model


# ---- fast eager decode ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("gpt", False)])
def test_fast_decode_same_tokens_and_logits(arch, tied, kernels):
    model = tiny(arch, tie_embeddings=tied)
    fast = prepare_fast_decode(copy.deepcopy(model))
    assert all(type(m) is not torch.nn.Linear for m in fast.modules())
    assert isinstance(fast.blocks[0].attn, DecodeAttention) and isinstance(fast.blocks[0].attn.qkv, kernels)
    assert isinstance(fast.lm_head, kernels)
    if kernels is GemvLinear:  # the head keeps the model's own weight: a tied one is still the embedding table
        assert (fast.lm_head.weight is fast.wte.weight) == tied
    if arch == "llama":
        assert isinstance(fast.blocks[0].norm_1, FusedRMSNorm)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]  # left-padded batch
    assert generate_batch(fast, prompts, 16, temperature=0) == generate_batch(model, prompts, 16, temperature=0)
    assert list(generate(fast, prompts[0], 16, temperature=0.9, top_k=20, seed=3)) == \
        list(generate(model, prompts[0], 16, temperature=0.9, top_k=20, seed=3))
    # logits of a prefill and of single-token decode steps (with per-row positions and a padding mask)
    from litmodel.generate import _positions, padding_mask

    for m in (model, fast):
        m.set_kv_cache(2, 24)
    idx = torch.randint(0, 96, (2, 6))
    pads = torch.tensor([0, 2])
    with torch.no_grad():
        slots = torch.arange(6)
        kw = dict(positions=_positions(pads, slots), mask=padding_mask(pads, 6, 24, slots))
        outs = [m(idx, slots, **kw) for m in (model, fast)]
        assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        for t in range(6, 10):
            tok = torch.randint(0, 96, (2, 1))
            pos = torch.tensor([t])
            kw = dict(positions=(pos - pads)[:, None], mask=padding_mask(pads, 1, 24, torch.tensor([-1])))
            a, b = (m(tok, pos, **kw) for m in (model, fast))
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()


def test_fast_decode_bf16_and_weight_sharing(kernels):
    model = tiny(tie_embeddings=True)
    fast = prepare_fast_decode(copy.deepcopy(model))
    assert fast.wte.weight is not None and model_bytes(fast) > 0
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    fast16 = prepare_fast_decode(copy.deepcopy(bf16))
    x = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        ref, a, b = model(x), bf16(x).float(), fast16(x).float()
    err_bf16 = ((a - ref).norm() / ref.norm()).item()
    assert ((b - ref).norm() / ref.norm()).item() < 1.5 * err_bf16  # bf16 rounding, in other places
    # int8 / int4 models: attention and norms are swapped, the quantized linears stay
    q = prepare_model(copy.deepcopy(model), quantize="int4", int4_group_size=32)
    assert isinstance(q.blocks[0].attn, DecodeAttention) and isinstance(q.blocks[0].attn.qkv, Int4Linear)


FUSED = {"gqa": {}, "mha": dict(n_query_groups=4), "mqa": dict(n_query_groups=1), "qkv-bias": dict(attn_bias=True),
         "bias": dict(bias=True), "tied": dict(tie_embeddings=True), "window": dict(sliding_window=5),
         "nope-layer": dict(nope_layers=[1]), "partial-rotary": dict(rotary_percentage=0.5),
         "rope-scaling": dict(rope_scaling=dict(rope_type="linear", factor=2.0))}
NOT_FUSED = {"qk-norm": dict(qk_norm="head"), "post-norm": dict(qk_norm="full", post_norm=True),
             "moe": dict(n_expert=4, n_expert_per_token=2)}


@pytest.mark.parametrize("variant", list(FUSED) + list(NOT_FUSED))
def test_decode_block_same_logits(variant, monkeypatch, kernels):
    """The fused one-token step of `DecodeBlock` (batch 1) gives the plain model's logits within float32
    rounding and its greedy tokens, for the Llama-family options it fuses (GQA/MQA, biases, a sliding window
    shorter than the sequence, layers without RoPE, partial rotary, RoPE scaling); blocks it does not fuse
    keep the swapped attention and norms and give the same results too."""
    model = tiny(**FUSED.get(variant, NOT_FUSED.get(variant)))
    fast = prepare_fast_decode(copy.deepcopy(model))
    fused = variant in FUSED
    assert all(isinstance(b, DecodeBlock) == fused for b in fast.blocks)
    prompt = [5, 3, 8, 1, 9, 2, 7]
    assert list(generate(fast, prompt, 20, temperature=0)) == list(generate(model, prompt, 20, temperature=0))
    general = []  # calls of the general block forward by the fast model's blocks during the one-token steps
    plain_forward = Block.forward
    for m in (model, fast):
        m.set_kv_cache(1, 40)
    with torch.no_grad():
        a, b = model(torch.tensor([prompt]), torch.arange(7)), fast(torch.tensor([prompt]), torch.arange(7))
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
        monkeypatch.setattr(Block, "forward", lambda self, *args: general.append(self in fast.blocks) or
                            plain_forward(self, *args))
        for t in range(7, 30):
            tok = torch.tensor([[(3 * t) % 96]])
            a, b = model(tok, torch.tensor([t])), fast(tok, torch.tensor([t]))
            assert (a - b).abs().max() <= 3e-5 * a.abs().max(), (t, (a - b).abs().max())  # fp32 rounding, 23 steps
    assert any(general) != fused


def test_decode_block_bf16_and_fallbacks(kernels):
    """bf16: the fused step's logits are as close to the float32 model's as the plain bf16 model's. A padded
    batch and a padding mask with one row take the general path (same results as before)."""
    model = tiny()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    fast16 = prepare_fast_decode(copy.deepcopy(bf16))
    for m in (model, bf16, fast16):
        m.set_kv_cache(1, 40)
    errs = {"plain": [], "fast": []}
    with torch.no_grad():
        for m in (model, bf16, fast16):
            m(torch.tensor([[5, 3, 8, 1, 9]]), torch.arange(5))
        for t in range(5, 25):
            tok = torch.tensor([[(7 * t) % 96]])
            ref, a, b = (m(tok, torch.tensor([t])).float() for m in (model, bf16, fast16))
            errs["plain"].append(((a - ref).norm() / ref.norm()).item())
            errs["fast"].append(((b - ref).norm() / ref.norm()).item())
    assert sum(errs["fast"]) < 1.5 * sum(errs["plain"]), errs
    # one row with a padding mask: the general path (the mask hides slot 0)
    fast = prepare_fast_decode(copy.deepcopy(model))
    from litmodel.generate import padding_mask

    prompts = [[0, 4, 5, 6]]
    for m in (model, fast):
        m.set_kv_cache(1, 16)
    with torch.no_grad():
        mask = padding_mask(torch.tensor([1]), 4, 16, torch.arange(4))
        pos = torch.arange(4)[None] - 1
        a, b = (m(torch.tensor(prompts), torch.arange(4), positions=pos.clamp(min=0), mask=mask) for m in (model, fast))
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
        step_mask = padding_mask(torch.tensor([1]), 1, 16, torch.tensor([-1]))
        a, b = (m(torch.tensor([[9]]), torch.tensor([4]), positions=torch.tensor([[3]]), mask=step_mask)
                for m in (model, fast))
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_decode_block_threads(kernels):
    """With several threads the fused step runs its small ops on one and its matrix products on all, and
    leaves the thread count as it found it (also when a step fails)."""
    model = tiny()
    fast = prepare_fast_decode(copy.deepcopy(model))
    for m in (model, fast):
        m.set_kv_cache(1, 16)
    torch.set_num_threads(2)  # the one_thread fixture restores the count after the test
    with torch.no_grad():
        for m in (model, fast):
            m(torch.tensor([[1, 2, 3]]), torch.arange(3))
        a, b = (m(torch.tensor([[4]]), torch.tensor([3])) for m in (model, fast))
        assert (a - b).abs().max() <= 1e-5 * a.abs().max() and torch.get_num_threads() == 2
        with pytest.raises(IndexError):
            fast(torch.tensor([[4]]), torch.tensor([99]))  # past the cache
        assert torch.get_num_threads() == 2


# ---- int4 --------------------------------------------------------------------------------------------------
@pytest.fixture(params=["litmodel", "torch-cpu"])
def int4_layout(request, monkeypatch):
    """Int4Linear with litmodel's layout and C kernel, and with torch's (the fallback without the C kernels)."""
    if request.param == "litmodel" and not int4.C_KERNEL:
        pytest.skip("litmodel's int4 kernel is not built or this CPU has no AVX512-BF16")
    monkeypatch.setattr(int4, "C_KERNEL", request.param == "litmodel")
    return request.param


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("in_features", [256, 320])
def test_int4_kernel_equals_the_packing_format(group_size, in_features, int4_layout):
    """The fused kernel computes x @ W^T for W = (q - 8) * scale + zero per group, in bf16 (`forward` for any
    rows; `decode`, the fused decode step's call, for 2-D bf16 rows; prompts of > 8 rows)."""
    if in_features % group_size:
        pytest.skip("in_features not a multiple of the group")
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_features, 48, bias=True)
    q, sz = quantize_groupwise_int4(lin.weight, group_size)
    assert q.min() >= 0 and q.max() <= 15 and sz.shape == (in_features // group_size, 48, 2)
    layer = Int4Linear(lin, group_size)
    assert layer.layout == (int4_layout if group_size >= 64 else "torch-cpu")
    if layer.layout == "litmodel":  # the codes as packed, read back by a plain reference of the layout
        assert layer.weight.dtype == torch.uint8 and torch.equal(unpack_int4(layer.weight), q)
        assert torch.equal(layer.scales_and_zeros.permute(2, 0, 1), sz.bfloat16())
    w_ref = dequantize_int4(q, sz.bfloat16(), group_size)  # scales/zeros rounded to bf16, as stored
    assert torch.allclose(layer.dequantized(), w_ref, rtol=1e-2, atol=1e-3)
    for rows in (1, 3, 8, 20):  # one pass of the one-row kernel up to 8 rows, longer prompts otherwise
        x = torch.randn(rows, in_features).bfloat16()
        ref = x.double() @ w_ref.double().t() + lin.bias.double()
        out = layer.decode(x)
        assert out.dtype == torch.float32  # the bias is float32 here
        assert ((out - ref).abs() <= 1e-2 * ref.abs() + 1e-2).all(), (out - ref).abs().max()
    # one-hot rows read single weights out of the packed matrix: the kernel's unpacking is the format's
    cols = (layer(torch.eye(in_features)) - layer.bias).float()
    assert torch.allclose(cols, w_ref.t().bfloat16().float(), rtol=1e-2, atol=1e-3)
    x = torch.randn(5, in_features)
    ref = x.bfloat16().float() @ w_ref.t() + lin.bias
    out = layer(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, rtol=2e-2, atol=2e-2), (out - ref).abs().max()
    # and the quantization is close to the float weights (at most half a step per group)
    step = sz[..., 0].t().repeat_interleave(group_size, dim=1)
    assert ((dequantize_int4(q, sz, group_size) - lin.weight).abs() <= step / 2 + 1e-6).all()


def test_a_copied_model_decodes_with_its_own_cache(kernels):
    """A deep copy of a fast model that has decoded (its blocks hold plans with the addresses of weights, caches
    and buffers) writes its own cache, not the original's, and gives the same next logits."""
    if kernels is PackedLinear:
        pytest.skip("oneDNN's packed weights cannot be copied")
    fast = prepare_fast_decode(tiny())
    fast.set_kv_cache(1, 16)
    with torch.no_grad():
        fast(torch.tensor([[1, 2, 3]]), torch.arange(3))
        fast(torch.tensor([[4]]), torch.tensor([3]))
        twin = copy.deepcopy(fast)
        before = fast.blocks[0].attn.kv_cache.k.clone()
        a = twin(torch.tensor([[5]]), torch.tensor([4]))
        assert torch.equal(fast.blocks[0].attn.kv_cache.k, before)
        assert torch.equal(a, fast(torch.tensor([[5]]), torch.tensor([4])))


def test_int4_model_fused_step_equals_unfused(kernels):
    """An int4 model (bf16 activations) decodes through the fused step (one C call per layer with litmodel's
    int4 kernel; `step_native`; `step_one`) as through its plain blocks: the same logits within bf16 rounding
    and the same greedy tokens."""
    model = tiny(std=0.1).to(torch.bfloat16)
    q = quantize_int4(copy.deepcopy(model), 64)
    fused = prepare_fast_decode(copy.deepcopy(q), pack_linears=False)
    plain = prepare_fast_decode(copy.deepcopy(q), pack_linears=False, fuse_blocks=False)
    assert type(fused.blocks[0]) is DecodeBlock and type(plain.blocks[0]) is Block
    prompt = [3, 14, 15, 92, 65, 35, 89]
    with torch.no_grad():
        for m in (fused, plain):
            m.set_kv_cache(1, 32, dtype=torch.bfloat16)  # the activations' dtype (the head's weight is int4)
            m(torch.tensor([prompt]), torch.arange(7))
        for pos in range(7, 12):
            a, b = (m(torch.tensor([[pos * 7 % 96]]), torch.tensor([pos])).float() for m in (fused, plain))
            assert (a - b).abs().max() <= 2e-2 * b.abs().max(), (a - b).abs().max()
        if kernels is GemvLinear and int4.C_KERNEL and DecodeBlock.native_plan is NATIVE_PLAN:
            assert all(b.cache_views[5] is not None for b in fused.blocks)  # one C call per layer
    assert list(generate(fused, prompt, 12, temperature=0)) == list(generate(plain, prompt, 12, temperature=0))


def test_int4_unsupported_widths_fall_back_with_a_log_line(caplog):
    torch.manual_seed(0)
    cfg = Config(name="odd", block_size=32, vocab_size=90, n_layer=1, n_head=2, n_embd=64, intermediate_size=96)
    model = build_model(cfg).eval()
    with caplog.at_level("WARNING"):
        quantize_int4(model, 64)
    # vocab 90 (not a multiple of 16) and the MLP's 96 input columns (not a multiple of 64) stay as they are
    assert type(model.lm_head) is torch.nn.Linear and type(model.blocks[0].mlp.proj) is torch.nn.Linear
    assert isinstance(model.blocks[0].attn.qkv, Int4Linear)
    assert "lm_head (90x64)" in caplog.text and "blocks.0.mlp.proj (64x96)" in caplog.text
    with pytest.raises(LitModelError, match="int4_group_size"):
        quantize_int4(model, 48)


def _train_briefly(model, data, steps=120, lr=3e-3, bs=8, T=32):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(0, len(data) - T - 1, (bs,), generator=g)
        x = torch.stack([data[j:j + T] for j in i])
        y = torch.stack([data[j + 1:j + T + 1] for j in i])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _perplexity(model, data, T=32):
    n = (len(data) - 1) // T * T
    x, y = data[:n].view(-1, T), data[1:n + 1].view(-1, T)
    with torch.no_grad():
        return math.exp(torch.nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).item())


def test_int4_perplexity_close_to_float():
    """A small Llama trained briefly on a synthetic language with structure (a noisy Markov chain), then
    quantized: int4 (group 32) perplexity on held-out text within 5% of the float32 and bf16 models'."""
    torch.manual_seed(0)
    V = 64
    trans = torch.softmax(torch.randn(V, V) * 3, dim=-1)  # peaked next-token distributions
    seq = [0]
    g = torch.Generator().manual_seed(1)
    for _ in range(12000):
        seq.append(int(torch.multinomial(trans[seq[-1]], 1, generator=g)))
    data = torch.tensor(seq)
    train, held_out = data[:10000], data[10000:]
    cfg = Config(name="ppl", block_size=64, vocab_size=V, n_layer=2, n_head=4, n_query_groups=2, n_embd=64,
                 intermediate_size=128)
    model = build_model(cfg)
    model.init_weights()
    _train_briefly(model, train)
    ppl32 = _perplexity(model, held_out)
    ppl16 = _perplexity(copy.deepcopy(model).to(torch.bfloat16), held_out)
    ppl4 = _perplexity(quantize_int4(copy.deepcopy(model), 32), held_out)
    print(f"\nheld-out perplexity: fp32 {ppl32:.3f}, bf16 {ppl16:.3f}, int4 g32 {ppl4:.3f} "
          f"({100 * (ppl4 / ppl32 - 1):+.2f}% vs fp32)")
    assert ppl32 < 0.6 * V  # it learned something
    assert ppl4 < 1.05 * ppl32 and ppl4 < 1.05 * ppl16


# ---- speculative decoding ------------------------------------------------------------------------------
def _perturbed(model, scale, seed=1):
    d = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
    return d


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_speculative_greedy_equals_plain_greedy(k):
    target = tiny(std=0.3)
    prompt = [3, 1, 4, 1, 5]
    ref = list(generate(target, prompt, 24, temperature=0))
    often = _perturbed(target, 0.02)  # agrees on most tokens
    never = tiny(std=0.3, seed=7)  # an unrelated model
    rates = {}
    for name, draft in (("often", often), ("never", never), ("self", target)):
        stats = SpeculativeStats()
        out = list(speculative_generate(target, copy.deepcopy(draft) if draft is target else draft, prompt, 24,
                                        k=k, temperature=0, stats=stats))
        assert out == ref, name
        rates[name] = stats.acceptance_rate
    print(k, rates)
    assert rates["self"] == 1.0 and rates["often"] > 0.4 and rates["never"] < rates["often"]
    # a never-agreeing draft: force it by a draft that always proposes the same token
    const = copy.deepcopy(target)
    with torch.no_grad():
        const.lm_head.weight.zero_()
        const.lm_head.weight[95] = 0  # all logits equal -> argmax 0; target's greedy tokens avoid 0 below
    stats = SpeculativeStats()
    assert list(speculative_generate(target, const, prompt, 24, k=k, temperature=0, stats=stats)) == ref
    if 0 not in ref:
        assert stats.accepted == 0


def test_speculative_stops_and_fast_models():
    target = tiny(std=0.3)
    prompt = [3, 1, 4, 1, 5]
    ref = list(generate(target, prompt, 20, temperature=0))
    stop = ref[7]
    want = ref[:ref.index(stop)]
    fast_t = prepare_fast_decode(copy.deepcopy(target))
    fast_d = prepare_fast_decode(_perturbed(target, 0.05))
    assert list(speculative_generate(fast_t, fast_d, prompt, 20, k=4, temperature=0, stop_tokens=[stop])) == want
    # sampling with a seed is reproducible
    a = list(speculative_generate(target, fast_d, prompt, 20, k=3, temperature=1.0, top_k=30,
                                  generator=torch.Generator().manual_seed(5)))
    b = list(speculative_generate(target, fast_d, prompt, 20, k=3, temperature=1.0, top_k=30,
                                  generator=torch.Generator().manual_seed(5)))
    assert a == b and len(a) == 20


def test_acceptance_rule_keeps_the_target_distribution():
    """The first and second emitted tokens of a round follow p (total variation within sampling noise over
    20k rounds on a 6-token vocabulary), for a draft distribution q far from p."""
    g = torch.Generator().manual_seed(0)
    V, k, N = 6, 2, 20000
    p = torch.softmax(torch.randn(k + 1, V, generator=g) * 1.5, -1)
    q = torch.softmax(p.log()[:k] + torch.randn(k, V, generator=g), -1)
    drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(k)], 1)
    first = torch.zeros(V)
    second = torch.zeros(V)
    for d in drafts:
        n, nxt = accept_or_resample(p, q, d, g)
        emitted = d[:n].tolist() + [nxt]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    tv1 = 0.5 * (first / first.sum() - p[0]).abs().sum().item()
    tv2 = 0.5 * (second / second.sum() - p[1]).abs().sum().item()
    tv_q = 0.5 * (q[0] - p[0]).abs().sum().item()
    print(f"\nTV(first, p0) {tv1:.4f} over {N}, TV(second, p1) {tv2:.4f} over {int(second.sum())}; TV(q0, p0) {tv_q:.3f}")
    # sampling noise: E[TV] ~ 0.4 * sum sqrt(p(1-p)/n) ~ 0.005 for n = 20k, ~0.01 for the second token
    assert tv_q > 0.15 and tv1 < 0.015 and tv2 < 0.025


def test_speculative_bad_input():
    target = tiny()
    with pytest.raises(LitModelError, match="speculative_k"):
        check_draft(target.config, target.config, 0)
    other = Config(name="x", block_size=64, vocab_size=128, n_layer=1, n_head=2, n_embd=32)
    with pytest.raises(LitModelError, match="vocabulary"):
        check_draft(target.config, other, 4)
    with pytest.raises(LitModelError, match="speculative_k"):
        list(speculative_generate(target, target, [1, 2], 4, k=0))


def test_no_silent_compile_and_a_persistent_compile_cache(tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config

    from litmodel.decode_step import enable_compile_cache, make_decode_step

    model = prepare_model(tiny())
    step = make_decode_step(model)  # the default: a plain function, nothing compiled
    assert not hasattr(step, "_torchdynamo_orig_callable") and step.__name__ == "step"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    assert enable_compile_cache() == tmp_path / "inductor" and (tmp_path / "inductor").is_dir()
    assert inductor_config.fx_graph_cache
