"""End-to-end tests of the pretraining recipe through the real CLI (tiny debug recipe)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "configs" / "pretrain" / "debug.yaml"

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "while True:\n    break\n",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny tokenizer and train/val shards, made with the real data-prep code."""
    from litmodel.data import corpus_from_documents, prepare_corpus
    from litmodel.tokenizer_training import train_tokenizer

    root = tmp_path_factory.mktemp("pretrain_data")
    texts = root / "texts"
    texts.mkdir()
    for i in range(40):
        (texts / f"doc{i:02d}.txt").write_text(CORPUS[i % len(CORPUS)] * (1 + i % 3) + f"# file {i}\n")
    tok_dir = root / "tokenizer"
    train_tokenizer(texts, tok_dir, vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    docs = [(p.name, p.read_text()) for p in sorted(texts.iterdir())]
    prepare_corpus(corpus_from_documents(docs, "test corpus"), tok_dir, root / "shards", val_fraction=0.2, num_workers=1,
                   progress=False)
    return root / "shards", tok_dir


def run_cli(args, env=None, script="pretrain/gpt.py", timeout=240):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=timeout)


def debug_args(prepared, out_dir, *extra, config=DEBUG):
    shards, tok = prepared
    return ["--config", config, "--data.data_dir", shards, "--data.tokenizer_dir", tok, "--out_dir", out_dir, *extra]


def losses(out_dir):
    with open(Path(out_dir) / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")}


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_single_process_learns_and_output_loads_in_generate(prepared, tmp_path, family):
    out = tmp_path / "run"
    config = DEBUG if family == "gpt" else ROOT / "configs" / "pretrain" / "llama-debug.yaml"
    result = run_cli(debug_args(prepared, out, config=config), script=f"pretrain/{family}.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val loss" in result.stdout and "sample:" in result.stdout
    assert f"loss curve: {out / 'loss.png'}" in result.stdout
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    per_step = losses(out)
    assert sorted(per_step) == list(range(1, 13))
    assert per_step[12] < per_step[1] - 0.5, per_step

    from litmodel.checkpoint import load_model
    from litmodel.generate import generate
    from litmodel.tokenizer import Tokenizer

    model = load_model(out / "final")
    tok = Tokenizer(out / "final")
    ids = tok.encode("def ")
    new = list(generate(model, ids, 5, temperature=0))
    assert len(new) == 5
    assert (out / "logs" / "metrics.csv").is_file() and not (out / "tensorboard").exists()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(prepared, tmp_path, strategy):
    """The same global batch on 2 gloo processes gives the same losses as on one process.

    Both start from the same initial checkpoint dir (FSDP initialises each rank's shards itself,
    so a from-scratch init would differ)."""
    from litmodel import Config, build_model
    from litmodel.checkpoint import save_checkpoint_dir

    single, double, init = tmp_path / "one", tmp_path / "two", tmp_path / "init"
    config = Config(name="init", model_type="gpt2", block_size=32, vocab_size=300, padded_vocab_size=320, n_layer=2,
                    n_head=2, n_embd=32, bias=True, tie_embeddings=True, learned_pos_emb=True, rotary_percentage=0.0)
    model = build_model(config)
    model.init_weights()
    save_checkpoint_dir(init, model, config, prepared[1])
    common = ["--train.max_steps", 4, "--sample.max_new_tokens", 0, "--initial_checkpoint_dir", init]
    r1 = run_cli(debug_args(prepared, single, *common))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_cli(debug_args(prepared, double, *common, "--devices", 2, "--strategy", strategy,
                            "--train.micro_batch_size", 2, "--sample.max_new_tokens", 4))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("sample:") == 1  # every rank generates (FSDP gathers shards), rank 0 prints
    a, b = losses(single), losses(double)
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])
    from safetensors.torch import load_file

    w0, w1, w2 = (load_file(str(d / "model.safetensors")) for d in (init, single / "final", double / "final"))
    diff = sum(float((w2[k] - w1[k]).double().pow(2).sum()) for k in w1) ** 0.5
    update = sum(float((w1[k] - w0[k]).double().pow(2).sum()) for k in w1) ** 0.5
    assert diff / update < 1e-4, diff / update  # the same weights, up to float rounding


def test_resume_after_kill_continues_the_same_run(prepared, tmp_path):
    from tests.helpers import run_and_kill

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    common = ["--train.max_steps", 10, "--train.save_interval", 3, "--sample.max_new_tokens", 0]
    r = run_cli(debug_args(prepared, straight, *common))
    assert r.returncode == 0, r.stderr[-3000:]
    # SIGKILLed from outside as soon as the first checkpoint (step 3) is complete
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = run_and_kill([sys.executable, str(ROOT / "pretrain/gpt.py"), *map(str, debug_args(prepared, crashed, *common))],
                     crashed / "step-000003.pt", cwd=ROOT, env=env)
    assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
    assert (crashed / "step-000003.pt").is_file() and not (crashed / "final").exists()
    # a new run into the same out_dir without --resume is refused
    r = run_cli(debug_args(prepared, crashed, *common))
    assert r.returncode == 1 and "already holds a run" in r.stderr and "--resume auto" in r.stderr
    r = run_cli(debug_args(prepared, crashed, *common, "--resume", "auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    a, b = losses(straight), losses(crashed)
    for step in range(1, 11):
        assert a[step] == pytest.approx(b[step], abs=1e-6), (step, a[step], b[step])
    sa = torch.load(straight / "step-000010.pt", weights_only=True)["model"]
    sb = torch.load(crashed / "step-000010.pt", weights_only=True)["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6)


def test_bad_inputs_fail_with_one_line(prepared, tmp_path):
    shards, tok = prepared
    cases = [
        (["--data.data_dir", tmp_path / "nope"], "scripts/prepare_text.py"),
        (["--data.tokenizer_dir", tmp_path / "notok"], "tokenizer"),
        (["--train.global_batch_size", 6], "not divisible"),
        (["--precision", "fp8"], "unknown precision"),
        (["--model_name", "Llama-3.2-1B"], "pretrain/llama.py"),
        (["--model_config.block_size", 4096, "--train.max_seq_length", 4096], "too small"),
    ]
    for extra, message in cases:
        out = tmp_path / f"out{len(extra)}{message[:4]}"
        r = run_cli(debug_args(prepared, out, *extra))
        assert r.returncode == 1, (extra, r.stderr[-2000:])
        lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
        assert lines[-1].startswith("error:") and message in lines[-1], (extra, lines[-3:])
        assert not (out / "final").exists()
