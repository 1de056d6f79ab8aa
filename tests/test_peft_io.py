"""LoRA adapters in PEFT's format, both ways, checked against `peft` itself on tiny random Hugging Face models."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from litmodel.checkpoint import load_model
from litmodel.hf import convert_hf_checkpoint
from litmodel.lora import LoRAConfig, apply_lora, lora_state_dict
from litmodel.lora_checkpoint import load_lora, write_lora_checkpoint
from litmodel.peft_io import export_peft, import_peft, peft_to_lora
from litmodel.utils import LitModelError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 96


def tiny_hf(kind: str):
    t = transformers
    cfg = {
        "llama": lambda: t.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
                                       tie_word_embeddings=False),
        "gpt2": lambda: t.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4),
        "gpt_neox": lambda: t.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=64, rotary_pct=0.25,
                                            max_position_embeddings=64),
    }[kind]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt_neox"])
def base(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"peft-{request.param}")
    hf = tiny_hf(request.param)
    hf.save_pretrained(root / "hf")
    convert_hf_checkpoint(root / "hf", root / "lit")
    return request.param, root, root / "lit"


IDX = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def hf_logits(model):
    return model(IDX).logits


@torch.no_grad()
def lit_logits(model):
    return model(IDX)


def hf_base(root):
    return transformers.AutoModelForCausalLM.from_pretrained(root / "hf", attn_implementation="eager").eval()


def random_lora(model, seed=1):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("targets", ["query,value", "query,key,value,projection,mlp,head", "key,mlp"])
def test_export_loads_in_peft_with_equal_logits_and_imports_back(base, targets, tmp_path):
    kind, root, lit = base
    if kind != "llama" and targets != "query,key,value,projection,mlp,head":
        pytest.skip("the fused families need one (the widest) target set")
    model = load_model(lit)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets)
    apply_lora(model, **cfg.to_dict())
    random_lora(model)
    expected = lit_logits(model)
    write_lora_checkpoint(tmp_path / "lora", lora_state_dict(model), cfg, lit, merge=False)
    out = export_peft(tmp_path / "lora", tmp_path / "peft")
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and adapter["peft_type"] == "LORA"
    peft_model = peft.PeftModel.from_pretrained(hf_base(root), str(out)).eval()
    torch.testing.assert_close(hf_logits(peft_model), expected, rtol=1e-5, atol=1e-5)
    # and back: the imported adapter gives the same model
    imported = import_peft(out, lit, tmp_path / "back", merge=False)
    back = load_lora(load_model(lit), imported)
    torch.testing.assert_close(lit_logits(back), expected, rtol=1e-5, atol=1e-5)
    if kind == "llama":  # split projections map one to one: the very same tensors
        got = lora_state_dict(back)
        for k, v in lora_state_dict(model).items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0)


PEFT_TARGETS = {"llama": ["q_proj", "v_proj", "gate_proj", "down_proj", "lm_head"],
                "gpt2": ["c_attn", "mlp.c_proj"], "gpt_neox": ["query_key_value", "dense_4h_to_h", "lm_head"]}


def test_import_of_an_adapter_made_by_peft_equals_it(base, tmp_path):
    kind, root, lit = base
    config = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.1, target_modules=PEFT_TARGETS[kind],
                             init_lora_weights=False, layers_to_transform=[1] if kind == "llama" else None,
                             rank_pattern={"v_proj": 2} if kind == "llama" else {},
                             alpha_pattern={"down_proj": 3} if kind == "llama" else {},
                             fan_in_fan_out=kind == "gpt2")
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(hf_base(root), config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    expected = hf_logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    out = import_peft(tmp_path / "adapter", lit, tmp_path / "lit-lora", merge=True)
    lora_cfg = LoRAConfig.from_yaml(out / "lora_config.yaml")
    assert lora_cfg.dropout == 0.1 and lora_cfg.base_checkpoint_dir == str(lit)
    torch.testing.assert_close(lit_logits(load_lora(load_model(lit), out)), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lit_logits(load_model(out)), expected, rtol=1e-5, atol=1e-5)  # the merged model


def test_bad_adapters_fail_with_one_line(base, tmp_path):
    kind, root, lit = base
    if kind != "llama":
        pytest.skip("one family is enough")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(hf_base(root), config).save_pretrained(tmp_path / "adapter")
    other = tmp_path / "other-hf"
    small = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(small).save_pretrained(other)
    convert_hf_checkpoint(other, tmp_path / "other-lit")
    with pytest.raises(LitModelError, match="q_proj.*lora_A .*trained for another base model"):
        peft_to_lora(tmp_path / "adapter", load_model(tmp_path / "other-lit").config)
    # a target the base has no layer for
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    tensors = {k.replace("q_proj", "q_proj_x"): v for k, v in tensors.items()}
    (tmp_path / "renamed").mkdir()
    save_file(tensors, tmp_path / "renamed" / "adapter_model.safetensors")
    (tmp_path / "renamed" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LitModelError, match="q_proj_x.*has no adaptable linear layer"):
        peft_to_lora(tmp_path / "renamed", load_model(lit).config)
    (tmp_path / "dora").mkdir()
    save_file(load_file(tmp_path / "adapter" / "adapter_model.safetensors"), tmp_path / "dora" / "adapter_model.safetensors")
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LitModelError, match="DoRA"):
        peft_to_lora(tmp_path / "dora", load_model(lit).config)


def run_script(script, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=240, cwd=ROOT)


def test_cli_export_and_import(base, tmp_path):
    kind, root, lit = base
    if kind != "llama":
        pytest.skip("one family is enough")
    model = load_model(lit)
    cfg = LoRAConfig(r=4, alpha=8, targets="query,value,mlp")
    apply_lora(model, **cfg.to_dict())
    random_lora(model)
    write_lora_checkpoint(tmp_path / "lora", lora_state_dict(model), cfg, lit, merge=False)
    export_peft(tmp_path / "lora", tmp_path / "peft-in-process")
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "keep.txt").write_text("x")
    jobs = {
        "export": ("scripts/convert_lit_checkpoint.py", "--checkpoint_dir", tmp_path / "lora", "--out_dir",
                   tmp_path / "peft", "--format", "peft"),
        "import": ("scripts/convert_hf_checkpoint.py", "--peft_adapter", tmp_path / "peft-in-process",
                   "--base_checkpoint_dir", lit, "--out_dir", tmp_path / "imported"),
        "bad": ("scripts/convert_hf_checkpoint.py", "--peft_adapter", tmp_path / "lora", "--base_checkpoint_dir", lit,
                "--out_dir", tmp_path / "occupied"),
    }
    with ThreadPoolExecutor(3) as pool:
        results = dict(zip(jobs, pool.map(lambda a: run_script(*a), jobs.values())))
    for name in ("export", "import"):
        assert results[name].returncode == 0, results[name].stderr[-2000:]
    bad = results["bad"]
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "adapter_config.json" in bad.stderr
    assert (tmp_path / "occupied" / "keep.txt").read_text() == "x"
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(
        tmp_path / "peft-in-process" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(lit_logits(load_model(tmp_path / "imported")), lit_logits(model), rtol=1e-5, atol=1e-5)
