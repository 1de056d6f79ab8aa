"""Evaluation: litmodel's lm-eval adapter against lm-eval's own Hugging Face backend (HFLM on the exported
HF dir), the rolling and sliding-window log-likelihoods against sums computed by hand with transformers,
batched against batch size 1, and scripts/evaluate.py end to end with its one-line errors.

Offline: small local tasks (task YAML + JSONL, passed as include_path) of every output type."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_chat_checkpoint
from litmodel import Config, build_model
from litmodel.checkpoint import load_model
from litmodel.scoring import perplexity, score_continuations, sliding_windows
from litmodel.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Hello world! How are you today? I am fine, thank you. "
        "Once upon a time there was a small model that generated text one token at a time. ") * 20
LONG = ("Once upon a time there was a small model that generated text one token at a time. The quick brown fox jumps "
        "over the lazy dog. Hello world! How are you today? I am fine, thank you very much, said the small model.")
TASKS = ["tiny_mc", "tiny_ppl", "tiny_gen", "tiny_gen_long"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_tasks(root: Path) -> Path:
    tasks = root / "tasks"
    tasks.mkdir()
    mc = [("The quick brown fox", ["jumps", "sleeps", "runs away"], 0),
          ("Hello world! How are", ["you", "they today"], 0),
          ("Once upon a", ["time", "model", "token at a"], 0),
          ("I am fine,", ["thank you.", "hello"], 1),
          ("The lazy", ["dog.", "fox.", "world"], 0),
          (LONG, ["time", "dog", "hello world"], 2)]  # longer than the context: truncated on the left
    docs = [LONG, "Hello world!", LONG[:90], "The quick brown fox jumps over the lazy dog."]
    gen = ["The quick brown", "Hello world! How", "Once upon a time there was", "I am", LONG[:150]]
    data = {"mc.jsonl": [{"question": q, "choices": c, "label": label} for q, c, label in mc],
            "docs.jsonl": [{"text": t} for t in docs], "gen.jsonl": [{"prompt": p, "answer": " fox"} for p in gen]}
    for name, rows in data.items():
        (tasks / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    def common(task: str, file: str) -> str:
        return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / file}\n"
                f"  cache_dir: {root / 'hf_datasets'}\ntest_split: test\n")

    (tasks / "tiny_mc.yaml").write_text(common("tiny_mc", "mc.jsonl") + (
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n'))
    (tasks / "tiny_ppl.yaml").write_text(common("tiny_ppl", "docs.jsonl") + (
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
        '  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n'))
    gen_common = 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
    metric = "metric_list:\n  - metric: exact_match\n"
    (tasks / "tiny_gen.yaml").write_text(common("tiny_gen", "gen.jsonl") + gen_common + metric + (
        'generation_kwargs:\n  until: [" ", "."]\n  max_gen_toks: 10\n  do_sample: false\n'))
    (tasks / "tiny_gen_long.yaml").write_text(common("tiny_gen_long", "gen.jsonl") + gen_common + metric + (
        'generation_kwargs:\n  until: ["\\n\\n\\n"]\n  max_gen_toks: 12\n  do_sample: false\n'))
    return tasks


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny Llama checkpoint (block_size 32) with a byte-level BPE tokenizer and a ChatML template, its HF
    export, the local tasks and their TaskManager."""
    from litmodel.evaluation import task_manager
    from litmodel.hf import convert_lit_checkpoint

    root = tmp_path_factory.mktemp("evaluate")
    ckpt = tiny_chat_checkpoint(root, TEXT, CHAT_TEMPLATE, name="tiny-eval", block_size=BLOCK)
    convert_lit_checkpoint(ckpt, root / "hf")
    tasks = _write_tasks(root)
    return {"root": root, "ckpt": ckpt, "hf": root / "hf", "tasks": tasks, "manager": task_manager(TASKS, tasks)}


def _lit_lm(env, batch_size: int):
    from litmodel.evaluation import LitLM

    return LitLM(load_model(env["ckpt"]), Tokenizer(env["ckpt"]), batch_size=batch_size, progress=False)


def _run(lm, env, tasks=TASKS, **kwargs) -> dict:
    from litmodel.evaluation import run_tasks

    return run_tasks(lm, tasks, manager=env["manager"], log_samples=True, bootstrap_iters=0, verbose=False, **kwargs)


@pytest.fixture(scope="module")
def hf_model(env):
    return transformers.AutoModelForCausalLM.from_pretrained(env["hf"], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hflm_results(env, hf_model):
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(1)
    lm = HFLM(pretrained=str(env["hf"]), batch_size=1, device="cpu", dtype="float32")
    return _run(lm, env)


@pytest.fixture(scope="module")
def lit_results(env):
    torch.set_num_threads(1)
    return {bs: _run(_lit_lm(env, bs), env) for bs in (1, 4)}


def _responses(results: dict, task: str) -> list:
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def _flat_loglikelihoods(results: dict, task: str) -> list[tuple[float, bool | None]]:
    out = []
    for resps in _responses(results, task):
        for (r,) in resps:
            out.append((r[0], r[1]) if isinstance(r, (list, tuple)) else (r, None))
    return out


@pytest.mark.parametrize("task", ["tiny_mc", "tiny_ppl"])
def test_loglikelihoods_and_metrics_equal_lm_eval_hf_backend(hflm_results, lit_results, task):
    ref = _flat_loglikelihoods(hflm_results, task)
    for bs, results in lit_results.items():
        ours = _flat_loglikelihoods(results, task)
        assert len(ours) == len(ref) > 0
        for (lp, greedy), (ref_lp, ref_greedy) in zip(ours, ref):
            assert lp == pytest.approx(ref_lp, abs=1e-4), bs
            assert greedy == ref_greedy
        ref_metrics = {k: v for k, v in hflm_results["results"][task].items() if k != "alias"}
        metrics = {k: v for k, v in results["results"][task].items() if k != "alias"}
        assert metrics.keys() == ref_metrics.keys()
        for k, v in ref_metrics.items():
            if isinstance(v, float):
                assert metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (task, k)
    # the arguments the harness sent (tokenization-independent strings) are the same too
    assert [s["arguments"] for s in lit_results[4]["samples"][task]] == \
        [s["arguments"] for s in hflm_results["samples"][task]]


def test_batched_scoring_equals_batch_size_one(lit_results):
    for task in ("tiny_mc", "tiny_ppl"):
        a, b = _flat_loglikelihoods(lit_results[1], task), _flat_loglikelihoods(lit_results[4], task)
        assert [g for _, g in a] == [g for _, g in b]
        assert [lp for lp, _ in a] == pytest.approx([lp for lp, _ in b], abs=1e-5)
    for task in ("tiny_gen", "tiny_gen_long"):
        assert _responses(lit_results[1], task) == _responses(lit_results[4], task)


@pytest.mark.parametrize("task", ["tiny_gen", "tiny_gen_long"])
def test_generate_until_equals_lm_eval_hf_backend(hflm_results, lit_results, task):
    ref = _responses(hflm_results, task)
    assert _responses(lit_results[4], task) == ref
    assert lit_results[4]["results"][task]["exact_match,none"] == hflm_results["results"][task]["exact_match,none"]
    if task == "tiny_gen":  # the stop strings cut some generations short
        full = _responses(hflm_results, "tiny_gen_long")
        assert any(len(r[0][0]) < len(f[0][0]) for r, f in zip(ref, full))


def test_rolling_loglikelihood_is_the_sliding_window_sum(env, hf_model):
    """A document of several context windows: the harness's windows (every token predicted once, the first
    from the prefix token, later windows with a full context) summed by hand with the transformers model."""
    from lm_eval.api.instance import Instance

    lm = _lit_lm(env, 3)
    hf_tok = transformers.AutoTokenizer.from_pretrained(env["hf"])
    text = LONG + " " + LONG
    ids = hf_tok(text)["input_ids"]
    n = len(ids)
    assert n > 3 * BLOCK and ids == lm.tok_encode(text)
    prefix = hf_tok.bos_token_id
    total = 0.0
    with torch.no_grad():
        for start in range(0, n, BLOCK):  # predict tokens [start, end) from a window of BLOCK inputs ending at end-1
            end = min(start + BLOCK, n)
            inputs = [prefix] + ids[:end - 1] if end <= BLOCK else ids[end - 1 - BLOCK:end - 1]
            assert len(inputs) <= BLOCK
            logp = torch.log_softmax(hf_model(torch.tensor([inputs])).logits[0].float(), -1)
            targets = torch.tensor(ids[start:end])
            total += float(logp[-len(targets):].gather(-1, targets[:, None]).sum())
    (ours,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert ours == pytest.approx(total, abs=1e-4)


def test_text_perplexity_equals_transformers_nll(env, hf_model):
    model = load_model(env["ckpt"])
    tok = Tokenizer(env["ckpt"])
    ids = [tok.bos_id] + tok.encode(LONG + " " + LONG, bos=False)
    N, stride = 16, 5
    # the Hugging Face perplexity guide's loop: labels of tokens already scored are -100
    nll_sum, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + N, len(ids))
            trg_len = end - prev_end
            window = torch.tensor([ids[begin:end]])
            labels = window.clone()
            labels[:, :-trg_len] = -100
            logits = hf_model(window).logits[0, :-1].float()
            target = labels[0, 1:]
            valid = target != -100
            nll_sum += float(torch.nn.functional.cross_entropy(logits[valid], target[valid], reduction="sum"))
            count += int(valid.sum())
            prev_end = end
            if end == len(ids):
                break
    ppl = perplexity(model, ids, N, stride, batch_size=3, n_bytes=1000)
    assert count == len(ids) - 1 == ppl.tokens
    assert ppl.perplexity == pytest.approx(math.exp(nll_sum / count), rel=1e-5)
    assert ppl.bits_per_byte == pytest.approx(nll_sum / math.log(2) / 1000, rel=1e-5)
    # one window: plain exp(mean NLL) of every token after the first
    short = ids[:N]
    with torch.no_grad():
        logits = hf_model(torch.tensor([short])).logits[0, :-1].float()
    ref = float(torch.nn.functional.cross_entropy(logits, torch.tensor(short[1:])))
    assert perplexity(model, short, N, N - 1).perplexity == pytest.approx(math.exp(ref), rel=1e-5)
    # each token is scored once, with at most N-1 tokens of context
    seen = []
    for begin, first, end in sliding_windows(100, 10, 3):
        assert begin < first and end - begin <= 10
        seen += range(first, end)
    assert seen == list(range(1, 100))


def test_score_continuations_batched_equals_one_by_one(env):
    model = load_model(env["ckpt"])
    g = torch.Generator().manual_seed(1)
    reqs = []
    for _ in range(11):
        ctx = torch.randint(0, 200, (int(torch.randint(1, 45, (1,), generator=g)),), generator=g).tolist()
        cont = torch.randint(0, 200, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        reqs.append((ctx, cont))
    reqs.append((reqs[0][0], [7]))  # the same context with one-token continuations: one row
    reqs.append((reqs[0][0], [9]))
    short = reqs[1][0][:6]  # multiple choice: continuations packed after one copy of the context (and a 2nd row
    reqs += [(short, [5, 6, 7, 8, 9, 10, 11, 12][:k]) for k in range(1, 9)]  # when they do not fit in BLOCK)
    reqs.append((short, [5, 6, 7]))  # a duplicate
    one = [score_continuations(model, [r], BLOCK, pack=False)[0] for r in reqs]
    for pack in (False, True):
        batched = score_continuations(model, reqs, BLOCK, batch_size=5, pack=pack)
        assert [g for _, g in one] == [g for _, g in batched]
        assert [lp for lp, _ in one] == pytest.approx([lp for lp, _ in batched], abs=1e-5)
    from litmodel.scoring import _plan_rows

    rows = [r for r in _plan_rows(reqs, BLOCK, pack=True) if r.tokens[:6] == short and max(r.segments) > 0]
    assert len(rows) == 2 and all(len(r.tokens) <= BLOCK for r in rows)
    # reference: full logits of the truncated input, no head trick, no batching
    ctx, cont = reqs[3]
    inp = (ctx + cont)[-(BLOCK + 1):][:-1]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([inp]))[0], -1)[-len(cont):]
    assert one[3][0] == pytest.approx(float(logp.gather(-1, torch.tensor(cont)[:, None]).sum()), abs=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "mistral"])
def test_packed_rows_equal_separate_rows_for_other_families(family):
    """Packing gives each continuation the positions it would have alone: learned positions (GPT-2), partial
    rotary + parallel residual (GPT-NeoX); a sliding-window model (Mistral) is scored on plain rows."""
    extra = {"gpt2": dict(learned_pos_emb=True, rotary_percentage=0.0, bias=True, tie_embeddings=True),
             "gpt_neox": dict(parallel_residual=True, rotary_percentage=0.25, bias=True),
             "mistral": dict(sliding_window=8)}[family]
    torch.manual_seed(0)
    model = build_model(Config(model_type=family, block_size=BLOCK, vocab_size=64, n_layer=2, n_head=4, n_embd=32,
                               intermediate_size=64, **extra)).eval()
    ctx = [3, 1, 4, 1, 5, 9, 2, 6]
    reqs = [(ctx, [5, 3, 5]), (ctx, [8]), (ctx, [9, 7, 9, 3, 2]), (ctx[:3], [1, 4]), (ctx[:3], [2, 2, 2])]
    one = [score_continuations(model, [r], BLOCK, pack=False)[0][0] for r in reqs]
    packed = [lp for lp, _ in score_continuations(model, reqs, BLOCK, batch_size=2, pack=True)]
    assert packed == pytest.approx(one, abs=1e-5)


def test_sampled_generation_is_seeded_and_top_k_1_is_greedy(env):
    from lm_eval.api.instance import Instance

    def gen(kwargs, seed=3):
        lm = _lit_lm(env, 2)
        lm._generator = torch.Generator().manual_seed(seed)
        reqs = [Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in
                enumerate(["The quick brown", "Hello world! How", "Once upon a"])]
        return lm.generate_until(reqs)

    greedy = gen({"until": ["\n\n\n"], "max_gen_toks": 8, "do_sample": False})
    sampled = gen({"until": ["\n\n\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0})
    assert sampled == gen({"until": ["\n\n\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0})
    assert sampled != greedy
    assert gen({"until": ["\n\n\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0, "top_k": 1}) == greedy


def test_chat_template_prompts_equal_lm_eval_hf_backend(env, hf_model):
    from lm_eval.models.huggingface import HFLM

    kwargs = dict(tasks=["tiny_mc", "tiny_gen"], apply_chat_template=True, num_fewshot=1, limit=3)
    ref = _run(HFLM(pretrained=str(env["hf"]), batch_size=1, device="cpu", dtype="float32"), env, **kwargs)
    ours = _run(_lit_lm(env, 4), env, **kwargs)
    for task in ("tiny_mc", "tiny_gen"):
        args = [s["arguments"] for s in ours["samples"][task]]
        assert args == [s["arguments"] for s in ref["samples"][task]]
        assert all("<|im_start|>assistant\n" in pair[0] for sample in args for pair in sample)
    for (lp, greedy), (ref_lp, ref_greedy) in zip(_flat_loglikelihoods(ours, "tiny_mc"),
                                                  _flat_loglikelihoods(ref, "tiny_mc")):
        assert lp == pytest.approx(ref_lp, abs=1e-4) and greedy == ref_greedy
    assert _responses(ours, "tiny_gen") == _responses(ref, "tiny_gen")


# ---- the script --------------------------------------------------------------------------------------------
def _load_script():
    spec = importlib.util.spec_from_file_location("_litmodel_scripts_evaluate", ROOT / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    from litmodel.cli import cli_main

    code = 0
    try:
        cli_main(_load_script().setup)(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_end_to_end(env, lit_results, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text(LONG + "\n" + LONG, encoding="utf-8")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "scripts/evaluate.py", "--checkpoint_dir", str(env["ckpt"]),
                          "--tasks", "tiny_mc,tiny_ppl", "--include_path", str(env["tasks"]), "--batch_size", "4",
                          "--text_file", str(text), "--max_seq_length", "16", "--stride", "8", "--out_dir", str(out),
                          "--precision", "32-true", "--device", "cpu"],
                         capture_output=True, text=True, cwd=ROOT, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "|tiny_mc" in res.stdout and "bits per byte" in res.stdout
    results = json.loads((out / "results.json").read_text())
    # --max_seq_length 16 applies to the harness too: the truncated long question changes, the others do not
    assert results["results"]["tiny_mc"].keys() == lit_results[4]["results"]["tiny_mc"].keys()
    ppl = json.loads((out / "perplexity.json").read_text())
    tok = Tokenizer(env["ckpt"])
    ids = [tok.bos_id] + tok.encode(text.read_text(), bos=False)
    expected = perplexity(load_model(env["ckpt"]), ids, 16, 8)
    assert ppl["perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)
    assert ppl["tokens"] == len(ids) - 1 and ppl["bytes"] == len(text.read_bytes())


def test_cli_bad_input_one_line_nothing_written(env, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    base = ["--checkpoint_dir", str(env["ckpt"]), "--include_path", str(env["tasks"]), "--out_dir", str(out)]
    code, _, err = call([*base, "--tasks", "tiny_mcc"], capsys)
    assert code == 1 and err.count("\n") == 1 and "unknown task 'tiny_mcc'" in err and "tiny_mc" in err
    code, _, err = call([*base, "--tasks", "tiny_mc", "--limit", "0"], capsys)
    assert code == 1 and "--limit must be > 0" in err
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("model.safetensors", "model_config.yaml"):
        (no_tok / f).write_bytes((env["ckpt"] / f).read_bytes())
    code, _, err = call(["--checkpoint_dir", str(no_tok), "--tasks", "tiny_mc", "--out_dir", str(out)], capsys)
    assert code == 1 and "has no tokenizer" in err
    code, _, err = call([*base, "--text_file", str(tmp_path / "missing.txt")], capsys)
    assert code == 1 and "does not exist" in err
    # without the [eval] extra
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "litmodel.evaluation", raising=False)
    import litmodel

    monkeypatch.delattr(litmodel, "evaluation", raising=False)
    code, _, err = call([*base, "--tasks", "tiny_mc"], capsys)
    assert code == 1 and 'pip install -e ".[eval]"' in err and err.count("\n") == 1
    assert not out.exists()


# ---- evals during training ---------------------------------------------------------------------------------
def test_finetuning_logs_harness_metrics_next_to_val_loss(env, tmp_path, capsys):
    """--eval.tasks runs the local tasks at each validation; the last logged value is what the harness gives
    for the final checkpoint."""
    import csv

    from litmodel.finetune import setup

    qa = [("Hi", "Hello world!"), ("Fox?", "The quick fox."), ("Dog?", "The lazy dog."), ("Once", "upon a time")] * 2
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                for q, a in qa]))
    out = tmp_path / "ft"
    setup("full", ["--checkpoint_dir", str(env["ckpt"]), "--data", "JSON", "--data.json_path", str(data),
                   "--data.val_split_fraction", "0.25", "--out_dir", str(out), "--precision", "32-true",
                   "--accelerator", "cpu", "--logger", "csv", "--train.global_batch_size", "2",
                   "--train.micro_batch_size", "2", "--train.epochs", "1", "--train.max_steps", "2",
                   "--train.lr", "0.01", "--train.warmup_steps", "0", "--eval.interval", "1", "--eval.max_iters", "1",
                   "--eval.max_new_tokens", "0", "--eval.tasks", "tiny_mc,tiny_ppl", "--eval.limit", "3",
                   "--eval.include_path", str(env["tasks"])])
    printed = capsys.readouterr().out
    assert "val loss" in printed and "tiny ppl/bits per byte" in printed, printed
    with open(out / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("tiny_ppl/bits_per_byte")]
    assert [int(r["step"]) for r in rows][:2] == [1, 2]
    assert all(r["val_loss"] and r["tiny_mc/acc"] for r in rows)
    lm = _lit_lm({"ckpt": out / "final"}, 2)
    final = _run(lm, env, tasks=["tiny_mc", "tiny_ppl"], limit=3)["results"]
    assert float(rows[-1]["tiny_ppl/bits_per_byte"]) == pytest.approx(final["tiny_ppl"]["bits_per_byte,none"], rel=1e-5)
    assert float(rows[-1]["tiny_mc/acc"]) == pytest.approx(final["tiny_mc"]["acc,none"])
    assert float(rows[0]["tiny_ppl/bits_per_byte"]) != float(rows[-1]["tiny_ppl/bits_per_byte"])  # it trained


def test_harness_evaluator_keeps_the_training_rng_and_runs_on_rank_zero(env):
    import contextlib
    import random

    from litmodel.evaluation import harness_evaluator

    class FakeFabric:
        def __init__(self, strategy: str, rank: int):
            self.strategy, self.is_global_zero = strategy, rank == 0

        autocast = staticmethod(contextlib.nullcontext)

    evaluate = harness_evaluator("tiny_ppl", Tokenizer(env["ckpt"]), limit=2, include_path=env["tasks"])
    model = load_model(env["ckpt"])
    torch.manual_seed(5)
    random.seed(5)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(5)
    random.seed(5)
    out = evaluate(FakeFabric("ddp", 0), model, 1)
    after = (torch.rand(3), random.random())
    assert torch.equal(after[0], expected[0]) and after[1] == expected[1]  # lm-eval reseeded; we put it back
    assert set(out) == {"tiny_ppl/word_perplexity", "tiny_ppl/byte_perplexity", "tiny_ppl/bits_per_byte"}
    assert evaluate(FakeFabric("ddp", 1), model, 1) == {}  # only rank 0 runs it outside FSDP


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory) -> tuple[Path, Path]:
    """Token shards and a tokenizer made with the real data-prep code from English text."""
    from litmodel.data import corpus_from_documents, prepare_corpus
    from litmodel.tokenizer_training import train_tokenizer

    root = tmp_path_factory.mktemp("pretrain_data")
    docs = [(f"doc{i}.txt", (TEXT[i * 40:i * 40 + 400] + "\n") * 2) for i in range(30)]
    (root / "texts").mkdir()
    for name, text in docs:
        (root / "texts" / name).write_text(text)
    train_tokenizer(root / "texts", root / "tok", vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    prepare_corpus(corpus_from_documents(docs, "test"), root / "tok", root / "shards", val_fraction=0.2,
                   num_workers=1, progress=False)
    return root / "shards", root / "tok"


def _pretrain_args(env, data, out: Path) -> list[str]:
    return ["--config", str(ROOT / "configs" / "pretrain" / "llama-debug.yaml"), "--data.data_dir", str(data[0]),
            "--data.tokenizer_dir", str(data[1]), "--out_dir", str(out), "--train.max_steps", "4",
            "--eval.interval", "2", "--eval.tasks", "tiny_ppl", "--eval.limit", "2",
            "--eval.include_path", str(env["tasks"]), "--sample.max_new_tokens", "0"]


def _harness_rows(out: Path) -> list[dict]:
    import csv

    with open(out / "logs" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("tiny_ppl/bits_per_byte")]


def test_pretraining_logs_harness_metrics_next_to_val_loss(env, pretrain_data, tmp_path, capsys):
    """The pretraining recipe (tiny debug config, in-process) with --eval.tasks: a rolling-loglikelihood task at
    each validation, logged in the same rows as the validation loss."""
    from litmodel.pretrain import setup

    setup("llama", None, _pretrain_args(env, pretrain_data, tmp_path / "pre"))
    assert "tiny ppl/bits per byte" in capsys.readouterr().out
    rows = _harness_rows(tmp_path / "pre")
    assert [int(r["step"]) for r in rows] == [2, 4] and all(r["val_loss"] for r in rows)
    assert float(rows[1]["tiny_ppl/bits_per_byte"]) < float(rows[0]["tiny_ppl/bits_per_byte"])  # it learns English


@pytest.mark.slow
def test_pretraining_harness_metrics_with_two_fsdp_processes(env, pretrain_data, tmp_path):
    """Under FSDP every rank runs the requests (each forward gathers the shards); rank 0 logs them."""
    out = tmp_path / "fsdp"
    res = subprocess.run([sys.executable, "pretrain/llama.py", *_pretrain_args(env, pretrain_data, out),
                          "--devices", "2", "--strategy", "fsdp", "--accelerator", "cpu"],
                         capture_output=True, text=True, cwd=ROOT, timeout=280,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _harness_rows(out)
    assert [int(r["step"]) for r in rows] == [2, 4] and all(r["val_loss"] for r in rows)
