"""Pretraining data pipeline: token shards, prepare_corpus, sources, loaders, prepare_* scripts."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from litmodel.data import (
    PretrainDataLoader,
    TokenShards,
    ValDataLoader,
    assign_splits,
    prepare_corpus,
    read_index,
    stdlib_corpus,
    text_dir_corpus,
    tokenizer_hash,
)
from litmodel.data.sources import stdlib_dir
from litmodel.utils import LitModelError

ROOT = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
WORDS = ("the quick brown fox jumps over lazy dog alpha beta gamma delta def class return import yield lambda "
         "tokens shard memory map loader epoch rank world batch window seed über café naïve 東京 ✓").split()


def make_docs(n: int, seed: int = 0, max_words: int = 60) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
                 for _ in range(rng.randint(1, max_words // 6))]
        docs.append((f"doc/{i:03d}.txt", "\n".join(lines) + ("\n" if i % 2 else "")))
    return docs


def write_tokenizer_config(out: Path) -> None:
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": EOS, "eos_token": EOS}))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A byte-level BPE (a few hundred ids) trained on a few KB of text, like GPT-2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text for _, text in make_docs(60, seed=123)], trainer)
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_config(out)
    return out


@pytest.fixture(scope="module")
def big_tok_dir(tmp_path_factory) -> Path:
    """A word-level tokenizer with 70,002 ids: more than uint16 holds."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    out = tmp_path_factory.mktemp("bigtok")
    vocab = {EOS: 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOS])
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_config(out)
    return out


def load_tok(path):
    from litmodel.tokenizer import Tokenizer

    return Tokenizer(path)


def expected_tokens(tok, docs, val_fraction, seed) -> dict[str, np.ndarray]:
    docs = [(i, t) for i, t in docs if t]
    splits = assign_splits([i for i, _ in docs], val_fraction, seed)
    out = {"train": [], "val": []}
    for (_, text), split in zip(docs, splits):
        out[split] += tok.encode(text, bos=False, eos=False) + [tok.eos_id]
    return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


def assert_split_holds(split_dir: Path, expected: np.ndarray) -> None:
    shards = TokenShards(split_dir)
    assert len(shards) == len(expected)
    np.testing.assert_array_equal(shards[:].astype(np.int64), expected)
    index = read_index(split_dir)
    assert sum(s["num_tokens"] for s in index["shards"]) == index["num_tokens"] == len(expected)
    for s in index["shards"]:
        assert (split_dir / s["file"]).stat().st_size == s["num_tokens"] * np.dtype(index["dtype"]).itemsize


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def no_leftovers(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ------------------------------------------------------------------------------------------------
# shards and prepare_corpus
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_shards_hold_exactly_the_corpus_tokens(tmp_path, tok_dir, dtype):
    docs = make_docs(40) + [("empty", "")]
    indexes = prepare_corpus(docs, tok_dir, tmp_path / "data", val_fraction=0.2, dtype=dtype, shard_tokens=97,
                             num_workers=1, seed=7, progress=False)
    tok = load_tok(tok_dir)
    expected = expected_tokens(tok, docs, 0.2, 7)
    assert len(expected["val"]) > 0 and len(expected["train"]) > 0
    for split in ("train", "val"):
        split_dir = tmp_path / "data" / split
        assert_split_holds(split_dir, expected[split])
        index = indexes[split]
        assert index == read_index(split_dir)
        assert index["dtype"] == dtype and index["split"] == split
        assert index["vocab_size"] == tok.vocab_size and index["eos_id"] == tok.eos_id
        assert index["tokenizer_hash"] == tokenizer_hash(tok_dir)
    assert len(indexes["train"]["shards"]) > 3  # the documents cross shard boundaries
    assert indexes["train"]["num_documents"] + indexes["val"]["num_documents"] == 40  # the empty one is skipped

    # slices across shard boundaries read the virtual array
    shards, full = TokenShards(tmp_path / "data" / "train"), expected["train"]
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = sorted(rng.integers(0, len(full) + 1, size=2))
        np.testing.assert_array_equal(shards[a:b].astype(np.int64), full[a:b])
    assert shards[-1] == full[-1] == tok.eos_id and shards[96] == full[96] and shards[97] == full[97]


def test_split_is_deterministic_and_independent_of_workers(tmp_path, tok_dir):
    docs = make_docs(120, seed=1)
    trees = []
    for run, workers in enumerate([1, 2, 2]):
        out = tmp_path / f"run{run}"
        prepare_corpus(docs, tok_dir, out, val_fraction=0.1, shard_tokens=500, num_workers=workers,
                       source="test docs", progress=False)
        trees.append(tree_bytes(out))
    assert trees[0] == trees[1] == trees[2]
    val = read_index(tmp_path / "run0" / "val")
    assert 0 < val["num_documents"] < 40
    # another seed gives another split
    prepare_corpus(docs, tok_dir, tmp_path / "seed", val_fraction=0.1, seed=1, num_workers=1, progress=False)
    assert read_index(tmp_path / "seed" / "val")["num_tokens"] != val["num_tokens"]


def test_split_fixups_keep_val_and_train_non_empty(tmp_path, tok_dir):
    assert assign_splits(["a", "b"], val_fraction=1e-9) == ["train", "val"]
    assert assign_splits(["a"], val_fraction=1e-9) == ["train"]
    assert assign_splits(["a", "b", "c"], val_fraction=0.0) == ["train"] * 3
    assert assign_splits(["a", "b", "c"], val_fraction=0.999999) == ["val", "val", "train"]
    docs = [("first", "hello world"), ("second", "the quick brown fox")]
    indexes = prepare_corpus(docs, tok_dir, tmp_path / "d", val_fraction=1e-9, num_workers=1, progress=False)
    assert (indexes["train"]["num_documents"], indexes["val"]["num_documents"]) == (1, 1)
    assert_split_holds(tmp_path / "d" / "val", expected_tokens(load_tok(tok_dir), docs, 1e-9, 42)["val"])


def test_vocab_over_uint16_uses_uint32(tmp_path, big_tok_dir):
    docs = [("a", "w1 w65534 w65535 w69999 w7"), ("b", "w3 w66000 nope"), ("c", "w4")]
    indexes = prepare_corpus(docs, big_tok_dir, tmp_path / "d", val_fraction=0.3, num_workers=1, progress=False)
    assert indexes["train"]["dtype"] == "uint32" and indexes["train"]["vocab_size"] > 65536
    tok = load_tok(big_tok_dir)
    expected = expected_tokens(tok, docs, 0.3, 42)
    assert expected["train"].max() > 65535 or expected["val"].max() > 65535
    for split in ("train", "val"):
        assert_split_holds(tmp_path / "d" / split, expected[split])
    with pytest.raises(LitModelError, match="more than uint16 can hold.*--dtype uint32"):
        prepare_corpus(docs, big_tok_dir, tmp_path / "e", dtype="uint16", progress=False)
    assert no_leftovers(tmp_path, "e")


def test_interrupted_prep_leaves_no_output_and_keeps_previous(tmp_path, tok_dir):
    def broken_docs():
        yield from make_docs(80)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare_corpus(broken_docs(), tok_dir, tmp_path / "d", num_workers=1, progress=False)
    assert no_leftovers(tmp_path, "d")
    prepare_corpus(make_docs(10), tok_dir, tmp_path / "d", num_workers=1, progress=False)
    before = tree_bytes(tmp_path / "d")
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare_corpus(broken_docs(), tok_dir, tmp_path / "d", num_workers=2, progress=False)
    assert tree_bytes(tmp_path / "d") == before
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
    # a directory that is not a prepared data dir is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(LitModelError, match="not a prepared data dir"):
        prepare_corpus(make_docs(3), tok_dir, tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_sources_are_deterministic(tmp_path):
    for rel in ["b/z.txt", "a.md", "b/a.txt", "c.bin", ".hidden/x.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    corpus = text_dir_corpus(tmp_path)
    assert [d for d, _ in corpus] == ["a.md", "b/a.txt", "b/z.txt"] and corpus.num_documents == 3
    assert [t for _, t in corpus] == ["a.md", "b/a.txt", "b/z.txt"]
    assert [d for d, _ in text_dir_corpus(tmp_path, [".txt"], max_files=1)] == ["b/a.txt"]
    with pytest.raises(LitModelError, match="no files found"):
        text_dir_corpus(tmp_path, [".rst"])
    std = stdlib_corpus(max_files=2000)
    ids = [p.relative_to(stdlib_dir()).as_posix() for p in std.files]
    assert ids == sorted(ids) and "json/decoder.py" in ids
    assert not any(part in ("site-packages", "test", "tests") for i in ids for part in i.split("/"))
    assert len(stdlib_corpus(max_bytes=1).files) == 1


# ------------------------------------------------------------------------------------------------
# loaders
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tok_dir) -> Path:
    out = tmp_path_factory.mktemp("loader") / "data"
    prepare_corpus(make_docs(60, seed=5), tok_dir, out, val_fraction=0.2, shard_tokens=300, num_workers=1,
                   progress=False)
    return out


def test_loader_shapes_targets_and_epochs(data_dir):
    tokens = TokenShards(data_dir / "train")[:].astype(np.int64)
    bs, mbs = 16, 4
    loader = PretrainDataLoader(data_dir / "train", block_size=bs, micro_batch_size=mbs, seed=3)
    n = loader.num_windows
    assert n == (len(tokens) - 1) // bs and n > 20
    seen = []
    for step in range(3):
        x, y = next(loader)
        assert x.shape == y.shape == (mbs, bs) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in range(mbs):
            w = loader.window_at(step * mbs + row)
            seen.append(w)
            assert torch.equal(x[row], torch.from_numpy(tokens[w * bs:w * bs + bs]))
            assert torch.equal(y[row], torch.from_numpy(tokens[w * bs + 1:w * bs + bs + 1]))
    assert len(set(seen)) == len(seen)
    e0, e1 = loader.epoch_order(0), loader.epoch_order(1)
    assert sorted(e0) == sorted(e1) == list(range(n)) and not np.array_equal(e0, e1)
    same = PretrainDataLoader(data_dir / "train", bs, mbs, seed=3)
    other = PretrainDataLoader(data_dir / "train", bs, mbs, seed=4)
    assert np.array_equal(same.epoch_order(1), e1) and not np.array_equal(other.epoch_order(0), e0)
    seq = PretrainDataLoader(data_dir / "train", bs, 2, shuffle=False)
    x, _ = next(seq)
    assert torch.equal(x[1], torch.from_numpy(tokens[bs:2 * bs]))


def test_loader_exact_resume_across_epochs(data_dir):
    def make():
        return PretrainDataLoader(data_dir / "train", block_size=8, micro_batch_size=3, seed=11)

    reference = make()
    n_windows = reference.num_windows
    steps = n_windows // 3 + 5  # past the first epoch boundary
    ref_batches = [next(reference) for _ in range(steps + 4)]
    first = make()
    for _ in range(steps):
        next(first)
    state = first.state_dict()
    assert state["windows_consumed"] == steps * 3 and state["epoch"] == 1
    assert state["index"] == steps * 3 - n_windows and state["seed"] == 11
    resumed = PretrainDataLoader(data_dir / "train", block_size=8, micro_batch_size=3, seed=999)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for x_ref, y_ref in ref_batches[steps:]:
        x, y = next(resumed)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    with pytest.raises(LitModelError, match="same data dir and block_size"):
        PretrainDataLoader(data_dir / "train", block_size=9, micro_batch_size=3).load_state_dict(state)


def test_ranks_partition_the_global_batch(data_dir):
    split = data_dir / "train"
    single = PretrainDataLoader(split, block_size=8, micro_batch_size=4, seed=2)
    ranks = [PretrainDataLoader(split, block_size=8, micro_batch_size=2, rank=r, world_size=2, seed=2) for r in (0, 1)]
    accum = PretrainDataLoader(split, block_size=8, micro_batch_size=2, seed=2)  # 1 process, 2 micro-steps
    for _ in range(single.num_windows // 4 + 3):  # crosses an epoch boundary
        x, y = next(single)
        (x0, y0), (x1, y1) = next(ranks[0]), next(ranks[1])
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        (a0, _), (a1, _) = next(accum), next(accum)
        assert torch.equal(torch.cat([a0, a1]), x)
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_val_loader_is_fixed_and_sequential(data_dir):
    tokens = TokenShards(data_dir / "val")[:].astype(np.int64)
    val = ValDataLoader(data_dir / "val", block_size=8, micro_batch_size=2, max_batches=3)
    first, second = list(val), list(val)
    assert len(val) == len(first) == 3
    for (x, y), (x2, y2) in zip(first, second):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(first[1][0][1], torch.from_numpy(tokens[3 * 8:4 * 8]))
    r1 = list(ValDataLoader(data_dir / "val", block_size=8, micro_batch_size=1, rank=1, world_size=2, max_batches=3))
    assert torch.equal(r1[1][0][0], first[1][0][1])


def test_loader_errors(tmp_path, data_dir, big_tok_dir, tok_dir):
    with pytest.raises(LitModelError, match=r"no prepared token data.*python scripts/prepare_stdlib\.py"):
        PretrainDataLoader(tmp_path / "nowhere" / "train", block_size=8, micro_batch_size=2)
    with pytest.raises(LitModelError, match="is a data dir, not a split dir"):
        PretrainDataLoader(data_dir, block_size=8, micro_batch_size=2)
    n = read_index(data_dir / "train")["num_tokens"]
    with pytest.raises(LitModelError, match=f"too small: {n} tokens.*block_size \\+ 1 = {n + 1} tokens"):
        PretrainDataLoader(data_dir / "train", block_size=n, micro_batch_size=2)
    with pytest.raises(LitModelError, match="prepared with a different tokenizer.*hash"):
        PretrainDataLoader(data_dir / "train", block_size=8, micro_batch_size=2, tokenizer_dir=big_tok_dir)
    PretrainDataLoader(data_dir / "train", block_size=8, micro_batch_size=2, tokenizer_dir=tok_dir)
    with pytest.raises(LitModelError, match="too small for one evaluation batch"):
        ValDataLoader(data_dir / "val", block_size=8, micro_batch_size=10_000)
    with pytest.raises(LitModelError, match="train_tokenizer.py"):
        prepare_corpus(make_docs(3), tmp_path / "no-tokenizer", tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------------------
# scripts through the real CLI
# ------------------------------------------------------------------------------------------------
def cli_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def run_scripts(*commands, env=None) -> list[subprocess.CompletedProcess]:
    """Run ``(script, args)`` commands, each in its own process, concurrently (each costs ~2 s of imports)."""
    procs = [subprocess.Popen([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], cwd=ROOT,
                              env=env or cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for script, args in commands]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


# Runs scripts one after the other in ONE subprocess, each exactly as `python scripts/<script> <args>` would
# (runpy as __main__ with that argv, so through cli_main and its sys.exit), to pay torch's import once.
DRIVER = r"""
import contextlib, io, json, runpy, sys
results = []
for script, args in json.loads(sys.argv[1]):
    sys.argv = [script, *args]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    results.append({"rc": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def run_scripts_in_one_process(*commands, env=None) -> list[subprocess.CompletedProcess]:
    spec = [[str(ROOT / "scripts" / script), [str(a) for a in args]] for script, args in commands]
    res = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(spec)], cwd=ROOT, env=env or cli_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return [subprocess.CompletedProcess(cmd, r["rc"], r["stdout"], r["stderr"])
            for cmd, r in zip(commands, json.loads(res.stdout.splitlines()[-1]))]


def make_hub_cache(hf_home: Path, repo_id: str, files: dict[str, str]) -> None:
    """The huggingface_hub cache layout snapshot_download resolves offline:
    hub/datasets--org--name/refs/main (the commit) + snapshots/<commit>/<repo files>."""
    repo = hf_home / "hub" / ("datasets--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for rel, text in files.items():
        path = repo / "snapshots" / commit / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_scripts_help():
    scripts = ("prepare_text.py", "prepare_stdlib.py", "prepare_hub.py")
    results = run_scripts_in_one_process(*[(s, ["--help"]) for s in scripts])
    for res, script in zip(results, ("text", "stdlib", "hub")):
        assert res.returncode == 0, res.stderr
        assert "--tokenizer_dir" in res.stdout and "--print_config" in res.stdout and "--val_fraction" in res.stdout
        assert {"text": "--input_dir", "stdlib": "--exclude_tests", "hub": "--text_key"}[script] in res.stdout


def test_scripts_prepare(tmp_path, tok_dir):
    text_dir = tmp_path / "texts"
    docs = make_docs(12, seed=9)
    for doc_id, text in docs:
        (text_dir / doc_id).parent.mkdir(parents=True, exist_ok=True)
        (text_dir / doc_id).write_text(text)
    hf_home = tmp_path / "hf"
    records = [{"text": t, "meta": i} for i, (_, t) in enumerate(docs[:5])]
    make_hub_cache(hf_home, "org/tiny", {
        "data/part-0.jsonl": "\n".join(json.dumps(r) for r in records) + "\n",
        "data/extra.json": json.dumps([{"text": "a json record"}, {"text": "another one"}]),
        "README.txt": "a text file is one document",
        "data/skip.csv": "ignored,by,patterns",
    })
    config = tmp_path / "stdlib.yaml"
    config.write_text(f"tokenizer_dir: {tok_dir}\nout_dir: {tmp_path / 'stdlib'}\nmax_files: 6\n")
    text_res, std_res, hub_res = run_scripts(
        ("prepare_text.py", ["--input_dir", text_dir, "--tokenizer_dir", tok_dir, "--out_dir", tmp_path / "text",
                             "--shard_tokens", 50, "--val_fraction", 0.2]),
        ("prepare_stdlib.py", ["--config", config, "--num_workers", 2]),
        ("prepare_hub.py", ["--repo_id", "org/tiny", "--tokenizer_dir", tok_dir, "--out_dir", tmp_path / "hub",
                            "--patterns", '["*.jsonl", "*.json", "*.txt"]', "--num_workers", 1]),
        env=cli_env(HF_HOME=str(hf_home)),
    )
    for res in (text_res, std_res, hub_res):
        assert res.returncode == 0, res.stderr
        assert "train:" in res.stdout and "val:" in res.stdout
    tok = load_tok(tok_dir)
    expected = expected_tokens(tok, docs, 0.2, 42)
    for split in ("train", "val"):
        assert_split_holds(tmp_path / "text" / split, expected[split])
    assert "text files under" in read_index(tmp_path / "text" / "train")["source"]

    std = [read_index(tmp_path / "stdlib" / s) for s in ("train", "val")]
    assert std[0]["num_documents"] + std[1]["num_documents"] == 6 and std[1]["num_documents"] >= 1
    assert "standard library" in std[0]["source"]
    corpus = stdlib_corpus(max_files=6)
    expected = expected_tokens(tok, list(corpus), 0.05, 42)
    assert_split_holds(tmp_path / "stdlib" / "train", expected["train"])

    hub_docs = [(f"data/extra.json:{i}", t) for i, t in enumerate(["a json record", "another one"])]
    hub_docs += [(f"data/part-0.jsonl:{i + 1}", r["text"]) for i, r in enumerate(records)]
    hub_docs += [("README.txt", "a text file is one document")]
    hub_docs.sort(key=lambda d: d[0].split(":")[0])
    expected = expected_tokens(tok, hub_docs, 0.05, 42)
    for split in ("train", "val"):
        assert_split_holds(tmp_path / "hub" / split, expected[split])
    assert "Hub dataset org/tiny" in read_index(tmp_path / "hub" / "train")["source"]


def test_scripts_bad_input(tmp_path, tok_dir, big_tok_dir):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("hello world, a tiny corpus")
    (texts / "b.txt").write_text("and a second document")
    empty = tmp_path / "empty"
    empty.mkdir()
    hf_home = tmp_path / "hf"
    make_hub_cache(hf_home, "org/parq", {"data/train.parquet": "not really parquet", "data/x.jsonl": '{"t": "x"}\n'})
    out = tmp_path / "outs"
    out.mkdir()
    cases = [
        ("prepare_text.py", ["--input_dir", texts, "--tokenizer_dir", tmp_path / "no-tok", "--out_dir", out / "a"],
         r"tokenizer dir .*no-tok does not exist; train a tokenizer with `python scripts/train_tokenizer.py"),
        ("prepare_text.py", ["--input_dir", empty, "--tokenizer_dir", tok_dir, "--out_dir", out / "b"],
         "no files found"),
        ("prepare_text.py", ["--input_dir", texts, "--tokenizer_dir", big_tok_dir, "--out_dir", out / "c",
                             "--dtype", "uint16"], "more than uint16 can hold.*use --dtype uint32"),
        ("prepare_text.py", ["--input_dir", texts, "--tokenizer_dir", tok_dir, "--out_dir", out / "d",
                             "--block_size", 4096], r"too small.*has \d+ tokens.*block_size \+ 1 = 4097 tokens"),
        ("prepare_hub.py", ["--repo_id", "org/absent", "--tokenizer_dir", tok_dir, "--out_dir", out / "e"],
         "not in the local Hub cache and HF_HUB_OFFLINE is set"),
        ("prepare_hub.py", ["--repo_id", "org/parq", "--tokenizer_dir", tok_dir, "--out_dir", out / "f",
                            "--text_key", "text", "--patterns", '["*.jsonl"]'], "no 'text' field.*--text_key"),
    ]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        cases.append(("prepare_hub.py", ["--repo_id", "org/parq", "--tokenizer_dir", tok_dir, "--out_dir", out / "g"],
                      "pyarrow is not installed"))
    results = run_scripts_in_one_process(*[(s, a) for s, a, _ in cases], env=cli_env(HF_HOME=str(hf_home)))
    for (script, args, pattern), res in zip(cases, results):
        assert res.returncode == 1, (args, res.stderr)
        lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and re.search(pattern, lines[0]), res.stderr
        assert "Traceback" not in res.stderr
    assert list(out.iterdir()) == []  # nothing left behind, not even temp dirs


def test_sentencepiece_tokenizer_from_train_tokenizer(tmp_path):
    from litmodel.tokenizer_training import train_tokenizer

    docs = make_docs(30, seed=4)
    (tmp_path / "texts").mkdir()
    for i, (_, text) in enumerate(docs):
        (tmp_path / "texts" / f"{i}.txt").write_text(text)
    tok = train_tokenizer(tmp_path / "texts", tmp_path / "sp", kind="sentencepiece", vocab_size=320,
                          show_progress=False)
    assert (tmp_path / "sp" / "tokenizer.model").is_file()
    indexes = prepare_corpus(docs, tmp_path / "sp", tmp_path / "d", val_fraction=0.2, shard_tokens=64,
                             num_workers=2, progress=False)
    assert indexes["train"]["tokenizer_hash"] == tokenizer_hash(tmp_path / "sp")
    expected = expected_tokens(tok, docs, 0.2, 42)
    for split in ("train", "val"):
        assert_split_holds(tmp_path / "d" / split, expected[split])
    # this tokenizer adds BOS by default, but documents get no BOS, only the EOS separator
    assert tok.add_bos and tok.bos_id != tok.eos_id
    assert tok.bos_id not in TokenShards(tmp_path / "d" / "train")[:]


def test_ensure_prepared_reprepares_only_when_needed(tmp_path, tok_dir, big_tok_dir):
    from litmodel.data import ensure_prepared, is_prepared

    calls = []

    def corpus():
        calls.append(1)
        return make_docs(10) + [("w", "w1 w2 w70000")]

    assert ensure_prepared(tmp_path / "d", tok_dir, corpus, num_workers=1, progress=False)
    assert is_prepared(tmp_path / "d", tok_dir) and not is_prepared(tmp_path / "d", big_tok_dir)
    assert not ensure_prepared(tmp_path / "d", tok_dir, corpus, num_workers=1, progress=False)
    assert ensure_prepared(tmp_path / "d", big_tok_dir, corpus, num_workers=1, progress=False)
    assert len(calls) == 2 and read_index(tmp_path / "d" / "train")["dtype"] == "uint32"
