"""End-to-end tests of the finetuning recipes (finetune/lora.py, finetune/full.py, scripts/merge_lora.py)
through the real CLI, on a tiny random Llama with a tiny BPE tokenizer and a ChatML chat template."""

import csv
import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.helpers import run_and_kill

ROOT = Path(__file__).resolve().parents[1]

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QA = [
    ("What color is the sky?", "The sky is blue."),
    ("How many legs does a cat have?", "A cat has four legs."),
    ("What is the capital of France?", "Paris is the capital."),
    ("Which animal says moo?", "The cow says moo."),
    ("What do bees make?", "Bees make honey."),
    ("What is two plus two?", "Two plus two is four."),
]
TINY = dict(name="tiny-chat", model_type="llama", block_size=96, n_layer=2, n_head=4, n_query_groups=2, n_embd=64,
            intermediate_size=128)
# fast, high-LR settings under which the tiny model memorizes the pairs (6 train records, 1 step = 1 epoch)
COMMON = ["--precision", "32-true", "--accelerator", "cpu", "--train.global_batch_size", "6",
          "--train.micro_batch_size", "3", "--train.warmup_steps", "5", "--train.max_norm", "1.0",
          "--eval.interval", "1000", "--eval.max_new_tokens", "16", "--train.save_interval", "10"]
LORA = ["--lora.r", "16", "--lora.alpha", "32", "--lora.dropout", "0.0",
        "--lora.targets", "query,key,value,projection,mlp,head", "--train.lr", "0.01", "--train.min_lr", "0.001",
        "--train.epochs", "60"]
FULL = ["--train.lr", "0.01", "--train.min_lr", "0.001", "--train.epochs", "40", "--train.weight_decay", "0.0"]


def make_tokenizer(path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = " ".join(q + " " + a for q, a in QA) + " user assistant system"
    tk.train_from_iterator([text] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=None, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    fast.chat_template = CHATML
    fast.save_pretrained(str(path))
    return path


def tiny_checkpoint(out_dir: Path, tok_dir: Path) -> Path:
    """A random (seed 0, GPT-2 init) TINY Llama with ``tok_dir``'s tokenizer, saved as a checkpoint dir."""
    from litmodel import Config, build_model
    from litmodel.checkpoint import save_checkpoint_dir
    from litmodel.tokenizer import Tokenizer

    vocab = Tokenizer(tok_dir).vocab_size
    config = Config(**TINY, vocab_size=vocab, padded_vocab_size=(vocab + 63) // 64 * 64)
    torch.manual_seed(0)
    model = build_model(config)
    model.init_weights()
    return save_checkpoint_dir(out_dir, model, config, tok_dir)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny Llama saved as a checkpoint dir (as scripts/download.py would write it) + the data files."""
    root = tmp_path_factory.mktemp("finetune")
    ckpt = tiny_checkpoint(root / "checkpoints" / "test" / "tiny-chat", make_tokenizer(root / "tokenizer"))
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    (root / "train.json").write_text(json.dumps(records))
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    # the same + an Alpaca record placed where --data.val_split_fraction 0.15 (seed 42) picks the validation record
    order = list(range(len(records) + 1))
    random.Random(42).shuffle(order)
    with_val = records[:order[0]] + [{"instruction": "What is the cat?", "output": "A cat."}] + records[order[0]:]
    (root / "with_val.json").write_text(json.dumps(with_val))
    return {"root": root, "ckpt": ckpt, "json": root / "train.json", "jsonl": root / "train.jsonl",
            "with_val": root / "with_val.json"}


def run_cli(script, args, env=None, timeout=300):
    # one torch thread per process: faster for these tiny models, and immune to the barrier stalls that two
    # OpenMP threads suffer when other jobs share the 2 cores
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=timeout)


def data_args(path, *extra):
    return ["--data", "JSON", "--data.json_path", path, "--data.val_split_fraction", "0", *extra]


def losses(out_dir):
    with open(Path(out_dir) / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss")]
    return {int(r["step"]): float(r["loss"]) for r in rows}  # a re-logged step (after a resume) keeps the last


def answers(checkpoint_dir):
    """Greedy answers of a checkpoint dir to every question, as the generate scripts would load it."""
    from litmodel.checkpoint import load_model
    from litmodel.generate import generate
    from litmodel.tokenizer import Tokenizer

    model = load_model(checkpoint_dir)
    tok = Tokenizer(checkpoint_dir)
    out = []
    for q, _ in QA:
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        ids = list(generate(model, prompt, 16, temperature=0, stop_tokens=tok.end_of_turn_ids))
        out.append(tok.decode(ids))
    return out


def read_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def lora_run(base):
    """A LoRA run through the CLI, memorizing the pairs (the reference for resume and merge tests)."""
    out = base["root"] / "lora"
    r = run_cli("finetune/lora.py", ["--checkpoint_dir", base["ckpt"], "--out_dir", out, *data_args(base["json"]),
                                     *COMMON, *LORA])
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_lora_cli_learns_the_answers(base, lora_run):
    out, r = lora_run
    final = out / "final"
    assert {"lora.safetensors", "lora_config.yaml", "model.safetensors", "model_config.yaml",
            "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert answers(final) == [a for _, a in QA]
    per_step = losses(out)
    assert sorted(per_step) == list(range(1, 61)) and per_step[60] < 0.02 * per_step[1], per_step
    assert "step 60 sample" in r.stdout and "The sky is blue." in r.stdout  # the sample answer is printed
    import yaml

    cfg = yaml.safe_load((final / "lora_config.yaml").read_text())
    assert cfg["r"] == 16 and Path(cfg["base_checkpoint_dir"]) == base["ckpt"]
    lora = read_tensors(final / "lora.safetensors")
    assert lora and all(k.endswith((".lora_A", ".lora_B")) for k in lora)
    # the resumable state holds only the trainable weights
    state = torch.load(out / "step-000060.pt", weights_only=True)
    assert set(state["lora_state"]) == set(lora) and "model" not in state


def test_merged_output_converts_to_hf_with_the_same_logits(lora_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    if not (ROOT / "scripts" / "convert_lit_checkpoint.py").is_file():
        pytest.skip("scripts/convert_lit_checkpoint.py is not there yet")
    from litmodel.checkpoint import load_model

    final = lora_run[0] / "final"
    r = run_cli("scripts/convert_lit_checkpoint.py", ["--checkpoint_dir", final, "--out_dir", tmp_path / "hf"])
    assert r.returncode == 0, r.stderr[-3000:]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    lit = load_model(final)
    idx = torch.randint(0, lit.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = lit(idx)[..., : lit.config.vocab_size]
        got = hf(idx).logits[..., : lit.config.vocab_size]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_resume_after_kill_and_merge_on_demand(base, lora_run, tmp_path):
    """Killed from outside once the step-20 checkpoint exists, resumed with --resume auto: the same losses and weights
    as the uninterrupted run. --merge false keeps only the adapter; merge_lora.py then writes exactly the
    merged model the uninterrupted run wrote, and what an in-process merge gives."""
    straight = lora_run[0]
    out = tmp_path / "crashed"
    args = ["--checkpoint_dir", base["ckpt"], "--out_dir", out, *data_args(base["jsonl"]), *COMMON, *LORA,
            "--merge", "false"]
    # SIGKILLed from outside as soon as the step-20 checkpoint is complete
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    r = run_and_kill([sys.executable, str(ROOT / "finetune/lora.py"), *map(str, args)], out / "step-000020.pt",
                     cwd=ROOT, env=env)
    assert r.returncode == -9 and (out / "step-000020.pt").is_file() and not (out / "final").exists()
    r = run_cli("finetune/lora.py", args)  # no --resume: refused, nothing touched
    assert r.returncode == 1 and "already holds a run" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("finetune/lora.py", [*args, "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    a, b = losses(straight), losses(out)
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a[step], b[step])
    final = out / "final"
    assert sorted(p.name for p in final.iterdir()) == ["lora.safetensors", "lora_config.yaml"]
    lora_a, lora_b = read_tensors(straight / "final" / "lora.safetensors"), read_tensors(final / "lora.safetensors")
    for k in lora_a:
        torch.testing.assert_close(lora_b[k], lora_a[k], rtol=1e-5, atol=1e-6)

    # merge on demand, in place (the base comes from lora_config.yaml)
    r = run_cli("scripts/merge_lora.py", ["--checkpoint_dir", final])
    assert r.returncode == 0, r.stderr[-3000:]
    assert {"lora.safetensors", "lora_config.yaml", "model.safetensors", "model_config.yaml"} <= \
        {p.name for p in final.iterdir()}
    merged = read_tensors(final / "model.safetensors")

    # the in-process merge with the plain LoRA API
    from litmodel.checkpoint import load_model
    from litmodel.lora import LoRAConfig, apply_lora, merge_lora, lora_state_dict
    import yaml

    model = load_model(base["ckpt"])
    cfg = yaml.safe_load((final / "lora_config.yaml").read_text())
    cfg.pop("base_checkpoint_dir")
    apply_lora(model, **LoRAConfig(**cfg).to_dict())
    assert set(lora_state_dict(model)) == set(lora_b)
    model.load_state_dict(lora_b, strict=False)
    merge_lora(model)
    sd = {k: v for k, v in model.state_dict().items()}
    for k, v in merged.items():
        assert torch.equal(v, sd[k]), k
    # and the uninterrupted run's merged output (written by the same code at the end of training)
    for k, v in read_tensors(straight / "final" / "model.safetensors").items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-5)
    assert answers(final) == [a for _, a in QA]


def test_full_finetuning_cli_learns_the_answers_packed(base, tmp_path):
    out = tmp_path / "full"
    r = run_cli("finetune/full.py", ["--checkpoint_dir", base["ckpt"], "--out_dir", out,
                                     *data_args(base["json"], "--data.packed", "true"), *COMMON, *FULL,
                                     "--train.global_batch_size", "2", "--train.micro_batch_size", "1",
                                     "--train.max_seq_length", "96"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "packed=True" in r.stdout
    final = out / "final"
    assert not (final / "lora.safetensors").exists()
    assert answers(final) == [a for _, a in QA]


@pytest.mark.slow
def test_lora_fsdp_two_processes(base, tmp_path):
    """2 gloo processes with FSDP (and activation checkpointing): the same answers, a validation split, and a
    resumable state that holds the gathered LoRA weights."""
    out = tmp_path / "fsdp"
    r = run_cli("finetune/lora.py", ["--checkpoint_dir", base["ckpt"], "--out_dir", out,
                                     "--data", "JSON", "--data.json_path", base["with_val"], *COMMON, *LORA,
                                     "--data.val_split_fraction", "0.15", "--devices", "2", "--strategy", "fsdp",
                                     "--train.activation_checkpointing", "true", "--eval.interval", "40",
                                     "--train.epochs", "80"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 40 sample" in r.stdout and "val loss" in r.stdout and "1 val examples" in r.stdout
    assert answers(out / "final") == [a for _, a in QA]
    state = torch.load(out / "step-000080.pt", weights_only=True)
    assert all(k.endswith(("lora_A", "lora_B")) for k in state["lora_state"])


def test_data_json_short_name_resolves(base):
    from litmodel.data.sft import JSONData
    from litmodel.finetune import finetune_lora
    from litmodel.finetune_args import parse_args

    for argv in (["--data", "JSON", "--data.json_path", "x.json"], ["--data.json_path", "x.json"],
                 ["--data", "JSONData", "--data.json_path", "x.json", "--data.packed", "true"]):
        kwargs = parse_args(finetune_lora, ["--checkpoint_dir", str(base["ckpt"]), *argv])
        assert isinstance(kwargs["data"], JSONData) and str(kwargs["data"].json_path) == "x.json"
    assert kwargs["data"].packed and kwargs["lora"].r == 8


def _bad_cases(base, root: Path) -> dict:
    """name -> (script, args, expected fragment of the one-line error, path that must stay untouched)."""
    import shutil

    from litmodel import Config, build_model
    from litmodel.checkpoint import save_checkpoint_dir

    (root / "missing_key.json").write_text(json.dumps([{"instruction": "hi", "output": "yo"}, {"instruction": "x"}]))
    (root / "empty.json").write_text("[]")
    hf_dir = root / "hf_dir"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    # another run's out_dir
    taken = root / "taken"
    (taken / "final").mkdir(parents=True)
    (taken / "final" / "model.safetensors").write_text("keep")
    # an adapter whose base does not fit it (other width)
    other = build_model(Config(**{**TINY, "n_embd": 32}, vocab_size=300, padded_vocab_size=320))
    other_ckpt = save_checkpoint_dir(root / "other", other, other.config, base["ckpt"])
    adapter = root / "adapter"
    adapter.mkdir()
    from litmodel.lora_checkpoint import write_lora_config
    from litmodel.lora import LoRAConfig, apply_lora, lora_state_dict
    from litmodel.checkpoint import load_model
    from litmodel.safetensors_io import save_safetensors

    m = apply_lora(load_model(base["ckpt"]), r=2, alpha=4)
    save_safetensors(lora_state_dict(m), adapter / "lora.safetensors")
    write_lora_config(adapter, LoRAConfig(r=2, alpha=4), other_ckpt)
    shutil.copy(adapter / "lora.safetensors", root / "adapter_before.safetensors")

    ft = ["--checkpoint_dir", base["ckpt"], *COMMON, "--train.max_steps", "1"]
    return {
        "missing_key": ("finetune/lora.py", [*ft, "--out_dir", root / "o1", *data_args(root / "missing_key.json")],
                        "record 1 is missing key 'output'", root / "o1"),
        "empty": ("finetune/full.py", [*ft, "--out_dir", root / "o2", *data_args(root / "empty.json")],
                  "contains no records", root / "o2"),
        "unconverted": ("finetune/lora.py", ["--checkpoint_dir", hf_dir, "--out_dir", root / "o3",
                                             *data_args(base["json"])], "convert_hf_checkpoint.py", root / "o3"),
        "taken_out_dir": ("finetune/lora.py", [*ft, "--out_dir", taken, *data_args(base["json"])],
                          "already holds a run; pass --resume auto", None),
        "adapter_mismatch": ("scripts/merge_lora.py", ["--checkpoint_dir", adapter], "has shape", None),
        "unknown_quantize": ("finetune/lora.py", [*ft, "--out_dir", root / "o4", *data_args(base["json"]),
                                                  "--quantize", "int3"], "unknown --quantize 'int3'", root / "o4"),
        "full_quantize": ("finetune/full.py", [*ft, "--out_dir", root / "o5", *data_args(base["json"]),
                                               "--quantize", "nf4"], "use finetune/lora.py --quantize nf4", root / "o5"),
    }


def test_bad_inputs_fail_with_one_line(base, tmp_path):
    cases = _bad_cases(base, tmp_path)
    with ThreadPoolExecutor(3) as pool:
        results = dict(zip(cases, pool.map(lambda c: run_cli(c[0], c[1]), cases.values())))
    for name, (_, _, fragment, untouched) in cases.items():
        r = results[name]
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1, (name, r.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], (name, r.stderr[-2000:])
        assert untouched is None or not untouched.exists(), name
    assert (tmp_path / "taken" / "final" / "model.safetensors").read_text() == "keep"
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["lora.safetensors", "lora_config.yaml"]
    assert (tmp_path / "adapter" / "lora.safetensors").read_bytes() == \
        (tmp_path / "adapter_before.safetensors").read_bytes()


def test_trainable_state_is_only_lora_with_a_tied_head(base):
    """The resumable LoRA state holds only LoRA weights, also when the tied output head is adapted (torch's
    get_model_state_dict(ignore_frozen_params=True) alone keeps the frozen tied lm_head.weight)."""
    from litmodel.checkpoint import load_config
    from litmodel.fabric import Fabric
    from litmodel.training_state import trainable_state
    from litmodel.lora import apply_lora, mark_only_lora_as_trainable

    from litmodel import build_model

    model = build_model(load_config(base["ckpt"]).replace(tie_embeddings=True))
    assert model.lm_head.weight is model.wte.weight
    mark_only_lora_as_trainable(apply_lora(model, targets="query,value,head", r=2, alpha=4))
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    fabric.launch()
    state = trainable_state(fabric.setup(model))
    assert state and all(k.endswith((".lora_A", ".lora_B")) for k in state), sorted(state)
    assert "lm_head.lora_A" in state
