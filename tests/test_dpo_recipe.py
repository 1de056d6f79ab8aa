"""End-to-end tests of the DPO recipe (finetune/dpo.py) through the real CLI, on a tiny random Llama with a tiny BPE
tokenizer and a ChatML template: it learns a preference (measured independently through transformers on the HF
export), 2 FSDP processes equal 1 process, a run killed from outside resumes to the same result, the reference
model variants agree, and bad input fails with one line."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from test_finetune import QA, ROOT, make_tokenizer, run_cli, tiny_checkpoint

transformers = pytest.importorskip("transformers")

MARKER = "Sure! "  # the style every chosen answer shares
TRAIN_Q = [q for q, _ in QA[:4]] + ["What is the cat?", "Which sky is blue?", "What do cows make?", "How many bees?",
                                    "What is blue?", "Which cat says moo?"]  # 8 train + 2 validation pairs
HELD_OUT_Q = [q for q, _ in QA[4:]] + ["What is the capital?", "Which animal has four legs?"]
ANSWERS = [a for _, a in QA]


def pairs(questions, seed):
    rng = random.Random(seed)
    out = []
    for q in questions:
        answer = rng.choice(ANSWERS)
        out.append({"prompt": q, "chosen": MARKER + answer, "rejected": answer})
    return out


COMMON = ["--precision", "32-true", "--accelerator", "cpu", "--eval.max_new_tokens", "0", "--data",
          "JSON", "--data.val_split_fraction", "0.2"]
LORA = ["--method", "lora", "--lora.r", "8", "--lora.alpha", "16", "--lora.dropout", "0.0",
        "--lora.targets", "query,value,mlp", "--train.lr", "0.003", "--train.min_lr", "0.0003",
        "--train.warmup_steps", "2", "--dpo.beta", "0.5"]
STEPS = ["--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.max_steps", "12",
         "--train.epochs", "6", "--train.save_interval", "2", "--eval.interval", "6"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    ckpt = tiny_checkpoint(root / "checkpoints" / "tiny-chat", make_tokenizer(root / "tokenizer"))
    (root / "train.json").write_text(json.dumps(pairs(TRAIN_Q, 0)))
    (root / "held_out.json").write_text(json.dumps(pairs(HELD_OUT_Q, 1)))
    return {"root": root, "ckpt": ckpt, "train": root / "train.json", "held_out": root / "held_out.json"}


def metrics(out_dir, key="loss"):
    """step -> logged row (floats) of the training steps (key="val_loss": of the validations); the last logged row
    wins after a resume."""
    with open(Path(out_dir) / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get(key)]
    return {int(r["step"]): {k: float(v) for k, v in r.items() if v not in ("", None)} for r in rows}


def read_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def hf_margins(hf_dir, records):
    """log p(chosen) - log p(rejected) of each pair's answer (up to <|im_end|>) under transformers, with the prompt
    rendered by transformers' own chat template code."""
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    out = []
    for rec in records:
        prompt = [{"role": "user", "content": rec["prompt"]}]
        n_prompt = len(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
        logps = []
        for answer in (rec["chosen"], rec["rejected"]):
            ids = tok.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=True,
                                          return_dict=False)
            end = ids.index(tok.convert_tokens_to_ids("<|im_end|>"), n_prompt) + 1
            x = torch.tensor([ids[:end]])
            with torch.no_grad():
                lp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
            logps.append(sum(lp[t - 1, ids[t]].item() for t in range(n_prompt, end)))
        out.append(logps[0] - logps[1])
    return out


@pytest.fixture(scope="module")
def lora_run(base):
    out = base["root"] / "lora"
    r = run_cli("finetune/dpo.py", ["--checkpoint_dir", base["ckpt"], "--out_dir", out, *COMMON,
                                    "--data.json_path", base["train"], *LORA, *STEPS])
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_lora_dpo_raises_the_held_out_margin_measured_by_transformers(base, lora_run, tmp_path):
    from litmodel.hf import convert_lit_checkpoint

    out, r = lora_run
    final = out / "final"
    assert {"lora.safetensors", "lora_config.yaml", "model.safetensors", "model_config.yaml",
            "tokenizer.json"} <= {p.name for p in final.iterdir()}
    logged = metrics(out)
    assert sorted(logged) == list(range(1, 13))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert key in logged[1], sorted(logged[1])
    # the first step starts at the reference: loss log 2, zero rewards; then the margin grows
    assert logged[1]["loss"] == pytest.approx(0.6931, abs=1e-3) and abs(logged[1]["rewards/margins"]) < 1e-4
    assert logged[12]["loss"] < 0.6 and logged[12]["rewards/accuracies"] == 1.0 and logged[12]["rewards/margins"] > 0.2
    assert "reference: base with adapters disabled" in r.stdout
    assert "8 train / 2 val preference pairs" in r.stdout
    assert "| rewards/accuracies 1.0000 | rewards/margins" in r.stdout  # shown on the step line
    val = metrics(out, "val_loss")
    assert sorted(val) == [6, 12] and "step 12: val loss" in r.stdout and "val rewards/margins" in r.stdout
    assert "val ppl" not in r.stdout  # no perplexity of a per-pair loss
    assert val[12]["val_rewards/margins"] > val[6]["val_rewards/margins"] > 0 and val[12]["val_loss"] < 0.69

    convert_lit_checkpoint(base["ckpt"], tmp_path / "hf_base")
    convert_lit_checkpoint(final, tmp_path / "hf_dpo")
    held_out = json.loads(base["held_out"].read_text())
    before, after = hf_margins(tmp_path / "hf_base", held_out), hf_margins(tmp_path / "hf_dpo", held_out)
    gains = [b - a for a, b in zip(before, after)]
    assert all(g > 0 for g in gains), gains
    assert sum(gains) / len(gains) > 2.0, gains  # nats, on prompts never trained on


@pytest.mark.slow
def test_fsdp_lora_killed_and_resumed_equals_one_uninterrupted_process(base, lora_run, tmp_path):
    """LoRA DPO on 2 FSDP (gloo) processes (the reference: adapters disabled inside the sharded model), SIGKILLed
    from outside (the whole process group) once a checkpoint has appeared, then resumed with --resume auto: the
    same per-step loss and metrics and the same adapter as the uninterrupted 1-process run at the same global
    batch (1 process accumulates 2 micro-batches of 2 pairs; 2 processes take one each)."""
    out = tmp_path / "killed"
    args = ["--checkpoint_dir", base["ckpt"], "--out_dir", out, *COMMON, "--data.json_path", base["train"], *LORA,
            *STEPS, "--devices", "2", "--strategy", "fsdp"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "finetune/dpo.py"), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 280
    while not (out / "step-000004.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers, as a lost node would
    proc.wait()
    assert not (out / "final").exists(), "the run ended before it was killed"
    r = run_cli("finetune/dpo.py", [*args, "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    a, b = metrics(lora_run[0]), metrics(out)
    assert a.keys() == b.keys()
    for step in a:
        for key in ("loss", "rewards/margins", "rewards/chosen", "logps/rejected"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)
    want, got = read_tensors(lora_run[0] / "final" / "lora.safetensors"), read_tensors(out / "final" / "lora.safetensors")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp_two_processes_equal_one(base, tmp_path):
    """Full DPO at a global batch of 4 pairs: 1 process (2 accumulated micro-batches of 2, frozen reference copy)
    equals 2 FSDP (gloo) processes with the frozen copy sharded (1 micro-batch of 2 each) and 2 FSDP processes with
    the reference log-probs precomputed, split over the processes (2 accumulated micro-batches of 1 each)."""
    common = ["--checkpoint_dir", base["ckpt"], *COMMON, "--data.json_path", base["train"], "--method", "full",
              "--train.lr", "0.001", "--train.warmup_steps", "0", "--train.global_batch_size", "4",
              "--train.max_steps", "3", "--train.epochs", "2",
              "--eval.interval", "1000", "--dpo.beta", "0.5"]
    runs = {"one": [*common, "--out_dir", tmp_path / "one", "--train.micro_batch_size", "2"],
            "fsdp": [*common, "--out_dir", tmp_path / "fsdp", "--devices", "2", "--strategy", "fsdp",
                     "--train.micro_batch_size", "2"],
            "precomputed": [*common, "--out_dir", tmp_path / "pre", "--devices", "2", "--strategy", "fsdp",
                            "--train.micro_batch_size", "1", "--dpo.precompute_reference", "true"]}
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(runs, pool.map(lambda a: run_cli("finetune/dpo.py", a), runs.values())))
    for name, r in results.items():
        assert r.returncode == 0, (name, r.stderr[-3000:])
    assert "reference: frozen copy" in results["fsdp"].stdout
    assert "reference log-probs precomputed for 8 train / 2 val pairs" in results["precomputed"].stdout
    one = metrics(tmp_path / "one")
    for name, d in (("fsdp", "fsdp"), ("precomputed", "pre")):
        other = metrics(tmp_path / d)
        assert one.keys() == other.keys() == {1, 2, 3}
        for step in one:
            for key in ("loss", "rewards/margins", "logps/chosen"):
                assert other[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-5), (name, step, key)
        want, got = read_tensors(tmp_path / "one" / "final" / "model.safetensors"), \
            read_tensors(tmp_path / d / "final" / "model.safetensors")
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_bad_input_fails_with_one_line_and_writes_nothing(base, tmp_path):
    root = tmp_path
    (root / "missing.json").write_text(json.dumps(pairs(TRAIN_Q[:2], 0) + [{"prompt": "q", "chosen": "a"}]))
    (root / "empty.jsonl").write_text("")
    cases = {
        "missing": (["--data.json_path", root / "missing.json"], "record 2 is missing key 'rejected'"),
        "empty": (["--data.json_path", root / "empty.jsonl"], "contains no records"),
        "beta": (["--data.json_path", base["train"], "--dpo.beta", "0"], "--dpo.beta must be > 0"),
    }
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(cases, pool.map(
            lambda c: run_cli("finetune/dpo.py", ["--checkpoint_dir", base["ckpt"], "--out_dir", root / "out",
                                                  *COMMON, *c[0], "--train.max_steps", "1"]), cases.values())))
    for name, (_, fragment) in cases.items():
        r = results[name]
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], \
            (name, r.stderr[-2000:])
    assert not (root / "out").exists()


def test_identical_pairs_skipped_truncation_counted_ipo_precomputed(base, tmp_path):
    records = pairs(TRAIN_Q[:4], 0) + [{"prompt": "q", "chosen": "Same.", "rejected": "Same."}] * 3
    (tmp_path / "p.json").write_text(json.dumps(records))
    r = run_cli("finetune/dpo.py", ["--checkpoint_dir", base["ckpt"], "--out_dir", tmp_path / "out", *COMMON,
                                    "--data.json_path", tmp_path / "p.json", "--train.global_batch_size", "2",
                                    "--train.micro_batch_size", "2", "--train.max_steps", "1",
                                    "--train.max_seq_length", "12", "--method", "full", "--dpo.precompute_reference",
                                    "true", "--dpo.loss", "ipo", "--dpo.beta", "0.1", "--data.val_split_fraction", "0"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 record(s) have a chosen answer identical to the rejected one" in r.stderr
    assert "4 train / 0 val preference pairs" in r.stdout and "identical=3 (skipped)" in r.stdout
    assert "example(s) longer than max_seq_length=12 were truncated, prompt first" in r.stdout
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
    # IPO at the reference: h = 0, so the loss is (1 / (2 beta))^2 = 25
    assert metrics(tmp_path / "out")[1]["loss"] == pytest.approx(25.0, rel=1e-6)


def test_data_json_short_name_resolves_for_both_recipes(base):
    """--data JSON is the preference data for finetune/dpo.py and the SFT data for finetune/lora.py, also with both
    modules imported in one process."""
    from litmodel.data.preference import PreferenceData
    from litmodel.data.sft import JSONData
    from litmodel.finetune import finetune_lora
    from litmodel.finetune_args import parse_args
    from litmodel.finetune_dpo import finetune_dpo

    argv = ["--checkpoint_dir", str(base["ckpt"]), "--data", "JSON", "--data.json_path", "x.json"]
    dpo = parse_args(finetune_dpo, [*argv, "--dpo.beta", "0.3", "--method", "full"])
    assert isinstance(dpo["data"], PreferenceData) and dpo["dpo"].beta == 0.3 and dpo["method"] == "full"
    sft = parse_args(finetune_lora, argv)
    assert isinstance(sft["data"], JSONData) and not isinstance(sft["data"], PreferenceData)
