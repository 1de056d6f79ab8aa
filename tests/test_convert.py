"""Config translation, the registry, and checkpoint conversion both ways (streamed, sharded, bf16, .bin).

Bad inputs go through the real CLI in child processes: exit code 1, a one-line `error:` message and
nothing left behind.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from litmodel import build_model
from litmodel.checkpoint import load_model
from litmodel.config import Config
from litmodel.hf import convert_hf_checkpoint, convert_lit_checkpoint, parse_size, run_steps
from litmodel.hf_names import IGNORED_HF_SUFFIXES
from litmodel.safetensors_io import Step, TensorSource, write_safetensors_stream
from litmodel.utils import LitModelError, num_parameters
from tests.helpers import CLI_DRIVER, perturbed_hf_model

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 100


# ----------------------------------------------------------------------------- helpers
def tiny_hf(kind: str, seed: int = 0, **overrides):
    t = transformers
    llama = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, max_position_embeddings=128)
    cfg = {
        "gpt2": lambda: t.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0),
        "gpt_neox": lambda: t.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=64, rotary_pct=0.25,
                                            max_position_embeddings=64),
        "llama": lambda: t.LlamaConfig(**llama, tie_word_embeddings=True),
        "llama-untied": lambda: t.LlamaConfig(**llama, tie_word_embeddings=False),
        "mistral": lambda: t.MistralConfig(**llama, sliding_window=6),
        "qwen2": lambda: t.Qwen2Config(**llama),
    }[kind]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return perturbed_hf_model(cfg, seed)


def read_dir_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def canonical_hf(sd: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Name-canonicalised HF tensors: NeoX head under `embed_out`, no buffers, no stored tied head."""
    out = {}
    for k, v in sd.items():
        if k.endswith(IGNORED_HF_SUFFIXES):
            continue
        if k == "lm_head.weight" and "gpt_neox.embed_in.weight" in sd:
            k = "embed_out.weight"
        if tied and k in ("lm_head.weight", "embed_out.weight"):
            continue
        out[k] = v
    return out


@torch.no_grad()
def logits(model, idx):
    out = model(idx)
    return out.logits if hasattr(out, "logits") else out


# ----------------------------------------------------------------------------- Config.from_hf_config dialects
LLAMA_V4 = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}}
LLAMA_V5 = {k: v for k, v in LLAMA_V4.items() if k not in ("rope_theta", "rope_scaling")}
LLAMA_V5["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_from_hf_config_llama_both_dialects():
    v4, v5 = Config.from_hf_config(LLAMA_V4), Config.from_hf_config(LLAMA_V5)
    assert v4 == v5
    assert v4.rope_base == 500000.0 and v4.n_query_groups == 2 and v4.tie_embeddings and v4.norm_eps == 1e-5
    assert v4.rope_scaling == {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_seq_len": 8192}
    # 4.x without scaling, and the old `type` key
    plain = Config.from_hf_config({**LLAMA_V4, "rope_scaling": None, "rope_theta": 10000.0})
    assert plain.rope_scaling is None and plain.rope_base == 10000.0
    old_key = Config.from_hf_config({**LLAMA_V4, "rope_scaling": {**LLAMA_V4["rope_scaling"], "type": "llama3"}})
    assert old_key.rope_scaling == v4.rope_scaling


def test_from_hf_config_neox_both_dialects():
    base = {"model_type": "gpt_neox", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 128,
            "layer_norm_eps": 1e-5, "use_parallel_residual": False, "hidden_act": "gelu"}
    v4 = Config.from_hf_config({**base, "rotary_pct": 0.5, "rotary_emb_base": 20000})
    v5 = Config.from_hf_config({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 20000.0,
                                                            "partial_rotary_factor": 0.5}})
    assert v4 == v5
    assert v4.rotary_percentage == 0.5 and v4.rope_base == 20000 and not v4.parallel_residual and v4.bias
    assert v4.rope_n_elem == 8
    assert Config.from_hf_config(base).rotary_percentage == 0.25  # GPT-NeoX's default


def test_from_hf_config_other_families():
    gpt2 = Config.from_hf_config({"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768,
                                  "n_layer": 12, "n_head": 12, "activation_function": "gelu_new"})
    assert gpt2 == Config.from_name("gpt2").replace(name="custom", hf_repo_id=None)
    mistral = Config.from_hf_config({**LLAMA_V5, "model_type": "mistral", "sliding_window": 4096})
    assert mistral.sliding_window == 4096
    qwen = Config.from_hf_config({**LLAMA_V5, "model_type": "qwen2", "sliding_window": 4096,
                                  "use_sliding_window": False})
    assert qwen.sliding_window is None and qwen.attn_bias
    named = Config.from_hf_config({**LLAMA_V5, "_name_or_path": "meta-llama/Llama-3.2-1B"})
    assert (named.name, named.hf_repo_id) == ("Llama-3.2-1B", "meta-llama/Llama-3.2-1B")
    with pytest.raises(LitModelError, match=r"unsupported model_type 'bert'.*supported: gpt2, gpt_neox, llama"):
        Config.from_hf_config({"model_type": "bert"})


# ----------------------------------------------------------------------------- registry
def test_registry_names_and_errors(tmp_path):
    assert Config.from_name("pythia-70m") == Config.from_name("EleutherAI/pythia-70m")
    assert Config.from_name("SmolLM2-135M").hf_repo_id == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(LitModelError, match="did you mean.*pythia-70m"):
        Config.from_name("pythia-70")
    cfg = Config.from_name("Llama-3.2-1B")
    cfg.to_yaml(tmp_path / "c.yaml")
    assert Config.from_yaml(tmp_path / "c.yaml") == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["rope_scaling"]["factor"] == 32.0


@pytest.mark.parametrize("name, expected", [("SmolLM2-135M", 134_515_008), ("Llama-3.2-1B", 1_235_814_400),
                                            ("pythia-70m", 70_426_624), ("Qwen2.5-0.5B", 494_032_768)])
def test_registry_parameter_counts(name, expected):
    with torch.device("meta"):
        model = build_model(Config.from_name(name))
    assert abs(num_parameters(model) - expected) / expected < 1e-3


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "llama", "llama-untied", "mistral", "qwen2"])
def test_hf_lit_hf_round_trip_is_bit_identical(kind, tmp_path):
    hf = tiny_hf(kind)
    hf.save_pretrained(tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "lit")
    convert_lit_checkpoint(tmp_path / "lit", tmp_path / "back")
    tied = hf.config.tie_word_embeddings
    src = canonical_hf(read_dir_tensors(tmp_path / "hf"), tied)
    back = canonical_hf(read_dir_tensors(tmp_path / "back"), tied)
    assert sorted(src) == sorted(back)
    for k in src:
        assert src[k].dtype == back[k].dtype and torch.equal(src[k], back[k]), k
    # the exported dir loads in transformers with identical logits
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    idx = torch.randint(0, VOCAB, (2, 12))
    assert torch.equal(logits(reloaded, idx), logits(hf, idx))
    assert (tmp_path / "back" / "generation_config.json").is_file()


def test_sharded_input_and_sharded_export(tmp_path):
    hf = tiny_hf("qwen2")
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    convert_hf_checkpoint(tmp_path / "single", tmp_path / "a")
    convert_hf_checkpoint(tmp_path / "sharded", tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    convert_lit_checkpoint(tmp_path / "b", tmp_path / "export", max_shard_size="50KB")
    index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and sorted(p.name for p in (tmp_path / "export").glob("model-*.safetensors")) == files
    for f in files:
        assert (tmp_path / "export" / f).stat().st_size <= 50_000 + 100_000  # one oversized tensor at most per file
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in read_dir_tensors(tmp_path / "export").values())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager")
    idx = torch.randint(0, VOCAB, (1, 10))
    assert torch.equal(logits(reloaded.eval(), idx), logits(hf, idx))
    # re-exporting unsharded into the same dir replaces the shards instead of mixing old and new files
    convert_lit_checkpoint(tmp_path / "b", tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "generation_config.json",
                                                                        "model.safetensors"]


def test_bfloat16_conversion(tmp_path):
    hf = tiny_hf("llama-untied")
    hf.save_pretrained(tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "f32")
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "bf16", dtype="bfloat16")
    f32, bf16 = (load_file(tmp_path / d / "model.safetensors") for d in ("f32", "bf16"))
    assert all(t.dtype == torch.float32 for t in f32.values())
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, f32[k].to(torch.bfloat16)) for k, t in bf16.items())
    # a bf16 HF checkpoint keeps its dtype by default, and exports back to bf16 bit-identically
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf_bf16")
    convert_hf_checkpoint(tmp_path / "hf_bf16", tmp_path / "keep")
    keep = load_file(tmp_path / "keep" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, bf16[k]) for k, t in keep.items())
    convert_lit_checkpoint(tmp_path / "keep", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    src, back = read_dir_tensors(tmp_path / "hf_bf16"), read_dir_tensors(tmp_path / "back")
    assert src.keys() == back.keys() and all(torch.equal(src[k], back[k]) for k in src)
    model = load_model(tmp_path / "keep")
    assert model.lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin_fallback(tmp_path, sharded):
    hf = tiny_hf("gpt_neox")
    d = tmp_path / "hf"
    hf.save_pretrained(d)
    (d / "model.safetensors").unlink()
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    if sharded:
        names = sorted(sd)
        parts = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                 "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
        for fname, keys in parts.items():
            torch.save({k: sd[k] for k in keys}, d / fname)
        weight_map = {k: f for f, keys in parts.items() for k in keys}
        (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        torch.save(sd, d / "pytorch_model.bin")
    convert_hf_checkpoint(d, tmp_path / "lit")
    lit = load_model(tmp_path / "lit")
    idx = torch.randint(0, VOCAB, (2, 12))
    assert (logits(lit, idx) - logits(hf, idx)).abs().max().item() <= 1e-5


def test_hub_checkpoint_quirks(tmp_path):
    """GPT-2 Hub files lack the `transformer.` prefix and carry `attn.bias` buffers; some tied models
    store `lm_head.weight` anyway; older Llama files carry `rotary_emb.inv_freq`."""
    gpt2 = tiny_hf("gpt2")
    gpt2.save_pretrained(tmp_path / "gpt2")
    sd = load_file(tmp_path / "gpt2" / "model.safetensors")
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    sd.update({f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64) for i in range(2)})
    save_file(sd, tmp_path / "gpt2" / "model.safetensors", metadata={"format": "pt"})
    llama = tiny_hf("llama")
    llama.save_pretrained(tmp_path / "llama")
    sd = load_file(tmp_path / "llama" / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(sd, tmp_path / "llama" / "model.safetensors", metadata={"format": "pt"})
    idx = torch.randint(0, VOCAB, (2, 12))
    for name, hf in (("gpt2", gpt2), ("llama", llama)):
        convert_hf_checkpoint(tmp_path / name, tmp_path / f"{name}_lit")
        lit = load_model(tmp_path / f"{name}_lit")
        assert (logits(lit, idx) - logits(hf, idx)).abs().max().item() <= 1e-5, name


def test_in_place_conversion_is_the_default(tmp_path):
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("_convert_hf", ROOT / "scripts" / "convert_hf_checkpoint.py")
    script = module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(checkpoint_dir=tmp_path / "hf")
    assert not list((tmp_path / "hf").glob(".*tmp"))
    lit = load_model(tmp_path / "hf")
    idx = torch.randint(0, VOCAB, (1, 12))
    assert (logits(lit, idx) - logits(hf, idx)).abs().max().item() <= 1e-5
    script.main(checkpoint_dir=tmp_path / "hf")  # again: still reads the HF shards
    # a single-file HF dir converted in place has litmodel names in model.safetensors afterwards
    hf.save_pretrained(tmp_path / "single")
    script.main(checkpoint_dir=tmp_path / "single")
    assert (logits(load_model(tmp_path / "single"), idx) - logits(hf, idx)).abs().max().item() <= 1e-5
    with pytest.raises(LitModelError, match="already converted in place"):
        script.main(checkpoint_dir=tmp_path / "single")


def test_streaming_writer_output_is_standard_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).bfloat16(),
               "empty": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "src.safetensors")
    source = TensorSource.from_safetensors_files([tmp_path / "src.safetensors"], "src")
    steps = [Step(k, [k], (lambda t: t.t().contiguous()) if k == "a" else (lambda t: t),
                  tuple(reversed(v.shape)) if k == "a" else tuple(v.shape), v.dtype) for k, v in tensors.items()]
    write_safetensors_stream(tmp_path / "out.safetensors", steps, run_steps(steps, source))
    source.close()
    with open(tmp_path / "out.safetensors", "rb") as f:
        assert int.from_bytes(f.read(8), "little") % 8 == 0
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["a"], tensors["a"].t()) and torch.equal(out["b"], tensors["b"])
    assert torch.equal(out["c"], tensors["c"]) and out["empty"].shape == (0, 4)
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000 and parse_size("500MB") == 500_000_000
    assert parse_size("2GiB") == 2 * 1024**3 and parse_size(1234) == 1234
    with pytest.raises(LitModelError):
        parse_size("lots")


# ----------------------------------------------------------------------------- bad input through the CLI
def _bad_inputs(root: Path) -> dict[str, tuple[list[str], str, Path]]:
    """case -> (argv, expected message fragment, output path that must not appear)."""
    hf = tiny_hf("llama")
    good = root / "good"
    hf.save_pretrained(good)
    cases: dict[str, tuple[list[str], str, Path]] = {}

    def hf_case(name, d, fragment):
        out = root / "out" / name
        cases[name] = (["scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(d), "--out_dir", str(out)],
                       fragment, out)

    hf_case("missing_dir", root / "nope", "does not exist")
    (root / "empty").mkdir()
    hf_case("empty_dir", root / "empty", "is empty")
    (root / "noconfig").mkdir()
    save_file({"x": torch.zeros(2)}, root / "noconfig" / "model.safetensors")
    hf_case("no_config_json", root / "noconfig", "has no config.json")
    bert = root / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    hf_case("unsupported_model_type", bert,
            "unsupported model_type 'bert'.*supported: gpt2, gpt_neox, llama, mistral, qwen2")
    trunc = root / "truncated"
    trunc.mkdir()
    (trunc / "config.json").write_bytes((good / "config.json").read_bytes())
    data = (good / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) - 1000])
    hf_case("truncated_safetensors", trunc, "is truncated")
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_bytes((good / "config.json").read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:200])
    hf_case("corrupt_safetensors", corrupt, "not a valid safetensors file")
    mismatch = root / "mismatch"
    mismatch.mkdir()
    cfg = json.loads((good / "config.json").read_text())
    (mismatch / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    (mismatch / "model.safetensors").write_bytes(data)
    hf_case("mismatched_tensors", mismatch,
            r"tensor 'model.layers.0.mlp.down_proj.weight' has shape \(64, 96\) but config.json needs \(64, 128\)")
    fewer = root / "fewer_layers"
    fewer.mkdir()
    (fewer / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    (fewer / "model.safetensors").write_bytes(data)
    hf_case("missing_tensor", fewer, r"tensor 'model.layers.2.input_layernorm.weight' is missing")

    # litmodel -> HF
    convert_hf_checkpoint(good, root / "lit")
    out = root / "out" / "export_of_hf_dir"
    cases["export_of_hf_dir"] = (["scripts/convert_lit_checkpoint.py", "--checkpoint_dir", str(good), "--out_dir",
                                  str(out)], "is a Hugging Face dir, not a litmodel checkpoint", out)
    bad_lit = root / "bad_lit"
    bad_lit.mkdir()
    (bad_lit / "model.safetensors").write_bytes((root / "lit" / "model.safetensors").read_bytes())
    Config.from_yaml(root / "lit" / "model_config.yaml", n_embd=32, head_size=None).to_yaml(
        bad_lit / "model_config.yaml")
    out = root / "out" / "export_mismatch"
    cases["export_mismatch"] = (["scripts/convert_lit_checkpoint.py", "--checkpoint_dir", str(bad_lit), "--out_dir",
                                 str(out)], r"tensor 'wte.weight' has shape \(100, 64\) but model_config.yaml needs "
                                            r"\(100, 32\)", out)
    return cases


def run_cli_cases(cases: dict[str, list[str]], separate: tuple[str, ...] = ()) -> dict[str, tuple[int, str, str]]:
    """{case: (exit code, stdout, stderr)} of `python <argv...>` run from the repo root."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def one(argv):
        p = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        return p.returncode, p.stdout, p.stderr

    def driver(batch):
        p = subprocess.run([sys.executable, "-c", CLI_DRIVER, json.dumps(batch)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        return {k: tuple(v) for k, v in json.loads(p.stdout.splitlines()[-1]).items()}

    with ThreadPoolExecutor(2) as pool:
        together = pool.submit(driver, {k: v for k, v in cases.items() if k not in separate})
        alone = {k: pool.submit(one, cases[k]) for k in separate}
        results = together.result()
        results.update({k: f.result() for k, f in alone.items()})
    return results


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    cases = _bad_inputs(root)
    results = run_cli_cases({k: v[0] for k, v in cases.items()}, separate=("missing_dir", "mismatched_tensors"))
    return root, cases, results


BAD_CASES = ["missing_dir", "empty_dir", "no_config_json", "unsupported_model_type", "truncated_safetensors",
             "corrupt_safetensors", "mismatched_tensors", "missing_tensor", "export_of_hf_dir", "export_mismatch"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_cleanly(bad_input_runs, case):
    import re

    root, cases, results = bad_input_runs
    assert sorted(cases) == sorted(BAD_CASES)
    _, fragment, out = cases[case]
    code, stdout, stderr = results[case]
    assert code == 1, (stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert re.search(fragment, lines[0]), lines[0]
    assert not out.exists()
    leftovers = [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers and not (root / "out").exists()
