"""Both model families against transformers, through the real conversion path, and their KV cache.

Each tiny random HF model is saved with `save_pretrained`, converted by scripts/convert_hf_checkpoint.py
and loaded with `litmodel.checkpoint.load_model`; logits must equal transformers' to 1e-5 (fp32).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from litmodel.checkpoint import load_model  # noqa: E402
from tests.helpers import perturbed_hf_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 100
SEQ = 24  # longer than the Mistral window below
ATOL = 1e-5


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hf_config(kind: str):
    t = transformers
    llama = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, max_position_embeddings=128)
    if kind == "gpt2":
        return t.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                            eos_token_id=0)
    if kind == "neox-parallel":
        return t.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, rotary_pct=0.25, max_position_embeddings=64,
                               use_parallel_residual=True)
    if kind == "neox-sequential":
        return t.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, rotary_pct=0.5, max_position_embeddings=64,
                               use_parallel_residual=False)
    if kind == "llama3-tied":
        return t.LlamaConfig(**llama, tie_word_embeddings=True, rope_theta=500000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if kind == "llama-untied":
        return t.LlamaConfig(**llama, tie_word_embeddings=False)
    if kind == "mistral-window":
        return t.MistralConfig(**llama, sliding_window=6)
    if kind == "qwen2":
        return t.Qwen2Config(**llama, tie_word_embeddings=False)
    raise ValueError(kind)


KINDS = ["gpt2", "neox-parallel", "neox-sequential", "llama3-tied", "llama-untied", "mistral-window", "qwen2"]


def make_hf_model(kind: str, seed: int = 0):
    return perturbed_hf_model(hf_config(kind), seed)


@pytest.fixture(scope="module", params=KINDS)
def converted(request, tmp_path_factory):
    """(kind, HF model, litmodel model converted by scripts/convert_hf_checkpoint.py main())."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    hf = make_hf_model(kind)
    hf.save_pretrained(tmp / "hf")
    load_script("convert_hf_checkpoint").main(checkpoint_dir=tmp / "hf", out_dir=tmp / "lit")
    return kind, hf, load_model(tmp / "lit")


@torch.no_grad()
def test_logits_match_transformers(converted):
    kind, hf, lit = converted
    idx = torch.randint(0, VOCAB, (2, SEQ))
    ref = hf(idx).logits
    out = lit(idx)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= ATOL, kind


@torch.no_grad()
def test_kv_cache_matches_full_forward(converted):
    kind, hf, lit = converted
    idx = torch.randint(0, VOCAB, (2, SEQ))
    full = lit(idx)
    lit.set_kv_cache(2, SEQ + 4)
    try:
        outs, t = [], 0
        for chunk in (5, 3, 1, 4) + (1,) * (SEQ - 13):  # prefill, then mixed chunk sizes, then token by token
            outs.append(lit(idx[:, t : t + chunk], torch.arange(t, t + chunk)))
            t += chunk
        assert t == SEQ
        incremental = torch.cat(outs, dim=1)
    finally:
        lit.clear_kv_cache()
    assert (incremental - full).abs().max().item() <= ATOL, kind
    # also equal to transformers' full forward (the window is shorter than SEQ for Mistral)
    assert (incremental - hf(idx).logits).abs().max().item() <= ATOL, kind


@torch.no_grad()
def test_batched_left_padded_decoding_matches_per_row(converted):
    """Left-padded batch with `positions` and `mask`: prefill + decode equal each row run alone."""
    kind, _, lit = converted
    lengths = [SEQ - 4, SEQ - 11, SEQ - 4 - 6]
    prompts = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    n_new = 4
    cont = torch.randint(0, VOCAB, (len(prompts), n_new))  # tokens fed while decoding (teacher forcing)
    B, P = len(prompts), max(lengths)
    pads = [P - n for n in lengths]
    idx = torch.zeros(B, P, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, pads[b]:] = p
    S = P + n_new
    pad = torch.tensor(pads)
    slots = torch.arange(S)
    key_ok = slots[None, :] >= pad[:, None]  # (B, S)

    lit.set_kv_cache(B, S)
    try:
        q = torch.arange(P)
        mask = (key_ok[:, None, :] | (slots[None, None, :] == q[None, :, None]))[:, None]  # (B, 1, P, S)
        positions = (q[None, :] - pad[:, None]).clamp(min=0)
        batched = [lit(idx, q, positions=positions, mask=mask)]
        for i in range(n_new):
            t = P + i
            step_pos = (torch.full((B, 1), t) - pad[:, None])
            batched.append(lit(cont[:, i : i + 1], torch.tensor([t]), positions=step_pos,
                               mask=key_ok[:, None, None, :]))
    finally:
        lit.clear_kv_cache()
    batched = torch.cat(batched, dim=1)  # (B, P + n_new, V)
    for b in range(B):
        alone = lit(torch.cat([prompts[b], cont[b]])[None])[0]  # (len + n_new, V)
        got = batched[b, pads[b]:]
        assert (got - alone).abs().max().item() <= ATOL, (kind, b)


@torch.no_grad()
def test_conversion_through_subprocess(tmp_path):
    """The real CLI in a child process (GPT-NeoX, sharded input, explicit float32)."""
    hf = make_hf_model("neox-parallel", seed=1)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path / "hf"),
                           "--out_dir", str(tmp_path / "lit"), "--dtype", "float32"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "lit").iterdir()) == ["generation_config.json", "model.safetensors",
                                                                     "model_config.yaml"]
    lit = load_model(tmp_path / "lit")
    idx = torch.randint(0, VOCAB, (1, 16))
    assert (lit(idx) - hf(idx).logits).abs().max().item() <= ATOL


def test_build_meta_model_skips_init_without_patching_torch():
    from litmodel import Config, build_meta_model

    init_fns = {n: getattr(torch.nn.init, n) for n in ("normal_", "uniform_", "kaiming_uniform_")}
    config = Config(name="tiny", block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16, intermediate_size=32,
                    tie_embeddings=True)
    model = build_meta_model(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.lm_head.weight is model.wte.weight  # ties survive
    assert {n: getattr(torch.nn.init, n) for n in init_fns} == init_fns  # nothing was replaced
    t = torch.nn.init.normal_(torch.zeros(1000))  # and init still works outside the block
    assert t.std() > 0.5
