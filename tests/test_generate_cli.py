"""generate/base.py and generate/chat.py end to end on a tiny checkpoint with a tiny BPE tokenizer:
streaming output, seeds, the exact chat prompt tokens, stopping at end-of-turn, context overflow, LoRA
dirs and the one-line errors for bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_chat_checkpoint
from litmodel import Config, build_model
from litmodel.checkpoint import save_checkpoint_dir, load_model
from litmodel.generate import generate

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Hello world! How are you today? I am fine, thank you. "
        "Once upon a time there was a small model that generated text one token at a time. ") * 20
EOT_BOOST = 10.0  # makes <|im_end|> likely enough that sampled replies end after a few tokens


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_litmodel_generate_{name}", ROOT / "generate" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint dir with a byte-level BPE tokenizer and a ChatML chat template.

    Dimension 0 of the residual stream is held constant and only <|im_end|>'s output row reads it,
    so sampling ends a reply with <|im_end|> after a few tokens."""
    def steer_to_im_end(model, tk):
        eot = tk.token_to_id("<|im_end|>")
        model.wte.weight[:, 0] = 3.0
        for block in model.blocks:
            block.attn.proj.weight[0] = 0
            block.mlp.proj.weight[0] = 0
        model.lm_head.weight[:, 0] = 0
        model.lm_head.weight[eot, 0] = EOT_BOOST

    return tiny_chat_checkpoint(tmp_path_factory.mktemp("gen_cli"), TEXT, CHAT_TEMPLATE, name="tiny-chat",
                                block_size=128, vocab_size=320, adjust=steer_to_im_end)


def run(script: str, *args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "generate" / f"{script}.py"), *args], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def call(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a script's CLI in-process (argument parsing, main, the one-line error wrapper)."""
    from litmodel.cli import cli_main

    module = _load_script(script)
    code = 0
    try:
        cli_main(module.setup)(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_base_streams_the_greedy_continuation(ckpt, tmp_path):
    from litmodel.tokenizer import Tokenizer

    prompt = "Hello world! How are"
    dump = tmp_path / "ids.jsonl"
    # the prompt comes from stdin here (no --prompt)
    res = run("base", "--checkpoint_dir", str(ckpt), "--max_new_tokens", "12", "--temperature", "0",
              "--precision", "32-true", stdin=prompt + "\n", env={"LITMODEL_DUMP_PROMPT_IDS": str(dump)})
    assert res.returncode == 0, res.stderr
    tok = Tokenizer(ckpt)
    ids = tok.encode(prompt)
    assert json.loads(dump.read_text())["ids"] == ids
    model = load_model(ckpt)
    expected = list(generate(model, ids, 12, temperature=0, stop_tokens=tok.stop_ids))
    assert res.stdout == tok.decode(expected) + "\n"
    for what in ("time to first token", "tokens/s", "peak memory"):
        assert what in res.stderr


def test_base_same_seed_same_text(ckpt, capsys):
    args = ["--checkpoint_dir", str(ckpt), "--prompt", "Once upon", "--max_new_tokens", "10", "--temperature", "1.5",
            "--top_k", "100", "--num_samples", "2"]
    code, a, _ = call("base", [*args, "--seed", "7"], capsys)
    code2, b, _ = call("base", [*args, "--seed", "7"], capsys)
    code3, c, _ = call("base", [*args, "--seed", "8"], capsys)
    assert code == code2 == code3 == 0
    assert a == b and a != c
    assert len(a.splitlines()) >= 2 and a.splitlines()[0] != a.splitlines()[1]  # samples differ from each other


def test_base_int8_and_bf16_and_lora_dir(ckpt, tmp_path, capsys):
    lora_dir = tmp_path / "merged"
    shutil.copytree(ckpt, lora_dir)
    (lora_dir / "lora.safetensors").write_bytes(b"not read")
    (lora_dir / "lora_config.yaml").write_text("r: 8\n")
    base = ["--prompt", "The quick", "--max_new_tokens", "8", "--temperature", "0"]
    code, fp32, _ = call("base", ["--checkpoint_dir", str(ckpt), *base, "--precision", "32-true"], capsys)
    code2, merged, _ = call("base", ["--checkpoint_dir", str(lora_dir), *base, "--precision", "32-true"], capsys)
    code3, q, err = call("base", ["--checkpoint_dir", str(ckpt), *base, "--precision", "bf16-true",
                                  "--quantize", "int8"], capsys)
    assert code == code2 == code3 == 0, err
    assert fp32 == merged and fp32.strip()
    assert "int8" in err and q.endswith("\n")


def test_chat_sends_the_chat_template_tokens_and_stops_at_end_of_turn(ckpt, tmp_path):
    dump = tmp_path / "chat.jsonl"
    lines = ["Hello world!", "How are you today?", "!reset", "Once upon a time", "!exit", "never sent"]
    res = run("chat", "--checkpoint_dir", str(ckpt), "--system", "You are tiny.", "--max_new_tokens", "30",
              "--temperature", "1.0", "--seed", "3", "--precision", "32-true",
              stdin="\n".join(lines) + "\n", env={"LITMODEL_DUMP_PROMPT_IDS": str(dump)})
    assert res.returncode == 0, res.stderr
    turns = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(turns) == 3
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    for turn in turns:
        expected = hf_tok.apply_chat_template(turn["messages"], add_generation_prompt=True, tokenize=True)
        if isinstance(expected, dict) or hasattr(expected, "input_ids"):
            expected = expected["input_ids"]
        assert turn["ids"] == list(expected)
    assert "dropped" not in res.stderr, res.stderr
    system = {"role": "system", "content": "You are tiny."}
    assert turns[0]["messages"] == [system, {"role": "user", "content": "Hello world!"}]
    first_reply = turns[1]["messages"][2]
    assert turns[1]["messages"][:2] == turns[0]["messages"] and first_reply["role"] == "assistant"
    assert turns[1]["messages"][3] == {"role": "user", "content": "How are you today?"}
    assert turns[2]["messages"] == [system, {"role": "user", "content": "Once upon a time"}]  # after !reset
    assert res.stdout.startswith(first_reply["content"] + "\n")
    # every reply ended at <|im_end|> well before --max_new_tokens
    counts = [int(line.split("(")[1].split(" tokens")[0]) for line in res.stderr.splitlines() if " tokens in " in line]
    assert len(counts) == 3 and all(n < 30 for n in counts), res.stderr
    assert "<|im_end|>" not in res.stdout


def test_chat_drops_the_oldest_turns_when_the_context_is_full(ckpt, tmp_path, capsys, monkeypatch):
    import io

    dump = tmp_path / "overflow.jsonl"
    monkeypatch.setenv("LITMODEL_DUMP_PROMPT_IDS", str(dump))
    msgs = ["Hello world! How are you today? I am fine, thank you.", "The quick brown fox jumps over the lazy dog.",
            "Once upon a time there was a small model.", "x" * 400]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(msgs) + "\n"))
    code, out, err = call("chat", ["--checkpoint_dir", str(ckpt), "--system", "Be brief.", "--max_new_tokens", "50",
                                   "--temperature", "0", "--precision", "32-true"], capsys)
    assert code == 0, err
    turns = [json.loads(line) for line in dump.read_text().splitlines()]
    assert all(len(t["ids"]) + 50 <= 128 for t in turns)
    assert "dropped" in err and "system message is kept" in err
    assert all(t["messages"][0] == {"role": "system", "content": "Be brief."} for t in turns)
    assert turns[-1]["messages"][-1]["content"] == msgs[2]
    assert len(turns[-1]["messages"]) < 6  # older turns are gone
    assert "too long" not in err and "skipped" in err  # the 400-character message alone does not fit


@pytest.mark.parametrize("args, message", [
    (["--top_p", "0"], "--top_p must be in (0, 1]"),
    (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--max_new_tokens", "500"], "--max_new_tokens 500 does not fit the model's context of 128"),
    (["--max_new_tokens", "100", "--prompt", "Hello world! How are you today? " * 3], "exceed the model's context of 128"),
    (["--prompt", "Hello world! How are you today? " * 30], "more than the model's context of 128 tokens"),
    (["--quantize", "int2"], "quantize"),
    (["--precision", "64-true"], "precision"),
])
def test_base_bad_input_one_line_error(ckpt, args, message, capsys):
    argv = ["--checkpoint_dir", str(ckpt), "--prompt", "Hello", "--max_new_tokens", "5", *args]
    code, out, err = call("base", argv, capsys)
    assert code != 0
    assert message in err, err
    if "--quantize" not in args and "--precision" not in args:  # those two are rejected by the argument parser
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_bad_checkpoint_dirs(ckpt, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    code, _, err = call("base", ["--checkpoint_dir", str(hf_dir), "--prompt", "hi"], capsys)
    assert code == 1 and "convert it with" in err and len(err.strip().splitlines()) == 1
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("model.safetensors", "model_config.yaml"):
        shutil.copy(ckpt / f, no_tok / f)
    code, _, err = call("chat", ["--checkpoint_dir", str(no_tok)], capsys)
    assert code == 1 and "no tokenizer" in err and len(err.strip().splitlines()) == 1


def test_bad_input_through_a_subprocess(ckpt):
    res = run("base", "--checkpoint_dir", str(ckpt), "--prompt", "hi", "--top_p", "0")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == ["error: --top_p must be in (0, 1], got 0.0"]
    assert res.stdout == ""


def test_help_explains_every_flag(capsys):
    for script, flags in [("base", ["--prompt", "--num_samples", "--max_new_tokens", "--temperature", "--top_k",
                                    "--top_p", "--seed", "--precision", "--compile", "--quantize", "--device",
                                    "--accelerator", "--config", "--print_config"]),
                          ("chat", ["--system", "--max_new_tokens", "--compile", "--quantize", "--seed"])]:
        code, out, _ = call(script, ["--help"], capsys)
        assert code == 0
        for flag in flags:
            assert flag in out, (script, flag)
        assert "Sampling temperature" in out


# ---- speed paths: int4, speculative decoding (issue 18) -------------------------------------------------------
def test_base_int4_and_speculative_decoding(ckpt, tmp_path, capsys):
    """--quantize int4 runs; --draft_checkpoint_dir (also an int4 draft) gives exactly the target's greedy text
    and prints the acceptance rate; bad drafts and --speculative_k 0 are one-line errors."""
    base = ["--prompt", "The quick", "--max_new_tokens", "12", "--temperature", "0", "--precision", "32-true"]
    code, plain, err = call("base", ["--checkpoint_dir", str(ckpt), *base], capsys)
    assert code == 0, err
    code, spec, err = call("base", ["--checkpoint_dir", str(ckpt), *base, "--draft_checkpoint_dir", str(ckpt),
                                    "--speculative_k", "3"], capsys)
    assert code == 0, err
    assert spec == plain and "draft tokens accepted (100%)" in err and "x the target alone" in err
    code, q, err = call("base", ["--checkpoint_dir", str(ckpt), *base, "--quantize", "int4",
                                 "--int4_group_size", "32"], capsys)
    assert code == 0 and q.strip() and "int4" in err, err
    # an int4 draft for the float32 target: still exactly the target's greedy text
    code, spec4, err = call("base", ["--checkpoint_dir", str(ckpt), *base, "--draft_checkpoint_dir", str(ckpt),
                                     "--draft_quantize", "int4", "--int4_group_size", "32"], capsys)
    assert code == 0 and spec4 == plain and "draft tokens accepted" in err, err
    code, _, err = call("base", ["--checkpoint_dir", str(ckpt), *base, "--draft_checkpoint_dir", str(ckpt),
                                 "--speculative_k", "0"], capsys)
    assert code != 0 and err.startswith("error: ") and "--speculative_k must be >= 1" in err
    # a draft with another vocabulary (same tokenizer files, a bigger embedding)
    from litmodel.checkpoint import load_config

    cfg = load_config(ckpt)
    other_cfg = Config(**{**cfg.to_dict(), "vocab_size": cfg.vocab_size + 16, "padded_vocab_size": None})
    other = save_checkpoint_dir(tmp_path / "other", build_model(other_cfg).eval(), other_cfg, tokenizer_dir=ckpt)
    code, _, err = call("base", ["--checkpoint_dir", str(ckpt), *base, "--draft_checkpoint_dir", str(other)], capsys)
    assert code != 0 and err.startswith("error: ") and "vocabulary" in err and len(err.strip().splitlines()) == 1
