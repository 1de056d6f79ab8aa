"""The LoRA dir (litmodel.lora_checkpoint): saving and loading an adapter, and one-line errors for one that does not
fit the base model. Writing a finetuning run's out_dir/final and merging it: tests/test_finetune.py."""

import copy

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from litmodel import Config, build_model
from litmodel.lora import LoRAConfig, apply_lora, lora_modules, lora_state_dict
from litmodel.lora_checkpoint import load_lora, save_lora
from litmodel.utils import LitModelError
from tests.test_lora import TINY, idx, make, train_steps


@pytest.mark.parametrize("family", ["llama", "qwen2-tied", "gpt2"])
def test_save_load_roundtrip(tmp_path, family):
    base = make(family)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("query", "value", "mlp", "head"))
    model = train_steps(apply_lora(copy.deepcopy(base), **cfg.to_dict()))
    (tmp_path / "model.safetensors").write_bytes(b"keep me")  # a checkpoint dir's other files stay
    save_lora(tmp_path, model, cfg)
    assert (tmp_path / "model.safetensors").read_bytes() == b"keep me"
    saved = load_file(str(tmp_path / "lora.safetensors"))
    assert set(saved) == set(lora_state_dict(model))
    assert all(k.endswith((".lora_A", ".lora_B")) for k in saved)
    assert yaml.safe_load((tmp_path / "lora_config.yaml").read_text()) == dict(
        r=4, alpha=8, dropout=0.0, targets=["query", "value", "mlp", "head"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    fresh = load_lora(make(family), tmp_path).eval()
    x = idx()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_mismatched_lora_weights_raise_naming_the_tensor(tmp_path):
    cfg = LoRAConfig(r=4, alpha=8, targets=("query", "value"))
    model = apply_lora(make("llama"), **cfg.to_dict())
    save_lora(tmp_path, model, cfg)
    # another base model (wider): shapes do not fit
    other = Config(**{**TINY["llama"], "n_embd": 48, "n_head": 4})
    with pytest.raises(LitModelError, match=r"tensor 'blocks\.0\.attn\.qkv\.lora_A' has shape \(8, 32\)"):
        load_lora(build_model(other), tmp_path)
    # config says r=8 but the weights are rank 4
    (tmp_path / "lora_config.yaml").write_text(yaml.safe_dump(dict(cfg.to_dict(), r=8)))
    with pytest.raises(LitModelError, match=r"'blocks\.0\.attn\.qkv\.lora_A'.*needs \(16, 32\)") as err:
        load_lora(make("llama"), tmp_path)
    assert "\n" not in str(err.value)
    # targets disagree with the tensors: shapes / missing / unexpected tensors named
    (tmp_path / "lora_config.yaml").write_text(yaml.safe_dump(dict(cfg.to_dict(), targets=["query"])))
    with pytest.raises(LitModelError, match=r"tensor 'blocks\.0\.attn\.qkv\.lora_A' has shape \(8, 32\)"):
        load_lora(make("llama"), tmp_path)
    (tmp_path / "lora_config.yaml").write_text(yaml.safe_dump(dict(cfg.to_dict(), targets=["query", "value", "head"])))
    base = make("llama")
    with pytest.raises(LitModelError, match=r"tensor 'lm_head\.lora_A' is missing"):
        load_lora(base, tmp_path)
    assert not lora_modules(base)  # a failed load leaves the base model as it was
    (tmp_path / "lora_config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    sd = load_file(str(tmp_path / "lora.safetensors"))
    sd["blocks.9.attn.qkv.lora_A"] = torch.zeros(8, 32)
    save_file(sd, str(tmp_path / "lora.safetensors"))
    with pytest.raises(LitModelError, match=r"unexpected tensor 'blocks\.9\.attn\.qkv\.lora_A'"):
        load_lora(make("llama"), tmp_path)
    with pytest.raises(LitModelError, match="LoRA dir .*nope does not exist"):
        load_lora(make("llama"), tmp_path / "nope")
