import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from litmodel import Config, build_model
from litmodel.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
)
from litmodel.lora_checkpoint import save_lora
from litmodel.utils import LitModelError

TINY = {
    "llama": dict(model_type="llama", block_size=32, vocab_size=64, n_layer=2, n_head=4, n_query_groups=2,
                  n_embd=32, intermediate_size=40),
    "qwen2-tied": dict(model_type="qwen2", block_size=32, vocab_size=64, n_layer=2, n_head=4, n_query_groups=1,
                       n_embd=32, intermediate_size=40, attn_bias=True, tie_embeddings=True),
    "gpt2": dict(model_type="gpt2", block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32, bias=True,
                 tie_embeddings=True, learned_pos_emb=True, gelu_approximate="tanh", rotary_percentage=0.0),
    "neox": dict(model_type="gpt_neox", block_size=32, vocab_size=64, n_layer=2, n_head=4, n_embd=32, bias=True,
                 parallel_residual=True, rotary_percentage=0.25),
}
TARGET_SETS = [("query", "value"), ("key",), ("query", "key", "value", "projection", "mlp", "head"), ("mlp", "head")]


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(Config(**TINY[name]))
    model.init_weights()
    return model


def idx(B=2, T=12, seed=1):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def train_steps(model, steps=4):
    mark_only_lora_as_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for s in range(steps):
        x = idx(seed=100 + s)
        y = torch.roll(x, -1, 1)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.parametrize("targets", TARGET_SETS, ids=",".join)
def test_lora_model_equals_base_before_training(family, targets):
    base = make(family).eval()
    lora = apply_lora(copy.deepcopy(base), targets=targets, r=4, alpha=8).eval()
    assert lora_state_dict(lora)
    x = idx()
    with torch.no_grad():
        assert torch.equal(base(x), lora(x))
    # base parameter names unchanged; LoRA adds only lora_A / lora_B
    extra = set(lora.state_dict()) - set(base.state_dict())
    assert set(base.state_dict()) <= set(lora.state_dict())
    assert extra and all(k.endswith((".lora_A", ".lora_B")) for k in extra)


@pytest.mark.parametrize("family", list(TINY))
def test_train_only_lora_then_merge_equals_unmerged(family):
    base = make(family)
    wte_before = base.wte.weight.detach().clone()
    model = apply_lora(copy.deepcopy(base), targets=TARGETS_ALL, r=4, alpha=8, dropout=0.1)
    base_sd = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    mark_only_lora_as_trainable(model)
    x = idx()
    y = torch.roll(x, -1, 1)
    F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    model.zero_grad()
    train_steps(model)
    # base weights (and a tied embedding) untouched by training
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base_sd[k]), k
    assert any(v.abs().sum() > 0 for k, v in lora_state_dict(model).items() if k.endswith("lora_B"))
    with torch.no_grad():
        unmerged = model(x)
        assert (unmerged - base.eval()(x)).abs().max() > 1e-4  # training changed the output
        merged_model = merge_lora(model)
        merged = merged_model(x)
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert not any(isinstance(m, LoRALinear) for m in merged_model.modules())
    assert set(merged_model.state_dict()) == set(base.state_dict())
    assert torch.equal(merged_model.wte.weight, wte_before)  # LoRA on a tied head never changes the embedding
    if base.config.tie_embeddings:
        assert merged_model.lm_head.weight is not merged_model.wte.weight
        assert merged_model.config.tie_embeddings is False and base.config.tie_embeddings is True


TARGETS_ALL = ("query", "key", "value", "projection", "mlp", "head")


def test_qkv_slices_only_touch_enabled_rows():
    model = make("llama")  # n_head 4, n_query_groups 2, head_size 8: q 32 rows, k 16, v 16
    apply_lora(model, targets=("query", "value"), r=2, alpha=4)
    qkv = model.blocks[0].attn.qkv
    assert isinstance(qkv, LoRALinear)
    assert qkv.lora_A.shape == (2 * 2, 32) and qkv.lora_B.shape == (32 + 16, 2)  # B only makes enabled rows
    with torch.no_grad():
        qkv.lora_B.normal_()
    delta = qkv.delta_weight()
    assert delta[32:48].abs().sum() == 0  # key rows untouched
    assert delta[:32].abs().sum() > 0 and delta[48:].abs().sum() > 0
    x = torch.randn(3, 5, 32)
    ref = F.linear(x, qkv.weight + delta, qkv.bias)
    assert (qkv(x) - ref).abs().max() < 1e-5
    # the Llama SwiGLU fc gets one rank-r update for gate and one for up
    apply_lora(model, targets="mlp", r=2, alpha=4)
    fc = model.blocks[0].mlp.fc
    assert fc.segments == [(40, True), (40, True)] and fc.lora_A.shape == (4, 32) and fc.lora_B.shape == (80, 2)


def test_bf16_base_weights():
    model = apply_lora(make("llama").to(torch.bfloat16), targets=TARGETS_ALL, r=4, alpha=8)
    assert all(p.dtype == torch.bfloat16 for p in lora_state_dict(model).values())
    mark_only_lora_as_trainable(model)
    out = model(idx())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model.blocks[0].attn.qkv.lora_B.grad is not None
    merged = merge_lora(model)
    assert merged.blocks[0].attn.qkv.weight.dtype == torch.bfloat16


def test_bad_arguments():
    with pytest.raises(LitModelError, match="unknown LoRA target 'querry'"):
        apply_lora(make("llama"), targets=("querry",))
    with pytest.raises(LitModelError, match="rank r"):
        apply_lora(make("llama"), r=0)
    model = apply_lora(make("llama"))
    with pytest.raises(LitModelError, match="already has LoRA"):
        apply_lora(model)
    with pytest.raises(LitModelError, match="no LoRA layers"):
        mark_only_lora_as_trainable(make("llama"))
    with pytest.raises(LitModelError, match="r=4"):
        save_lora("/tmp/unused", model, LoRAConfig(r=4))


def test_torch_compile_traces_without_graph_breaks():
    model = apply_lora(make("llama"), targets=TARGETS_ALL, r=2, alpha=4).eval()
    x = idx()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x))
