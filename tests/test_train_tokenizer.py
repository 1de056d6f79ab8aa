"""scripts/train_tokenizer.py and litmodel.tokenizer_training.train_tokenizer (tiny corpora, no network)."""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from litmodel.tokenizer import Tokenizer
from litmodel.tokenizer_training import _read_texts, find_text_files, train_tokenizer
from litmodel.utils import LitModelError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_tokenizer.py"
ROUND_TRIP = [
    "Hello, world! The quick brown fox.",
    "Hello wörld 👋🏽 你好 — ‘quotes’\n\ttabs",
    "def f(x):\n    return {'a': [1, 2, 3]}  # naïve café\r\n",
    "  two leading spaces, trailing  ",
    "emoji 🤖🧠🇫🇷 👩‍👩‍👧 and unseen 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∮ E⋅da = Q",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyzäöü"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(300)]
    words += ["你好", "世界", "👋", "def", "return", "self", "    ", "(x)", "==", "42"]
    root = tmp_path_factory.mktemp("data")
    for i in range(6):
        sub = root / f"part{i % 2}" / f"deep{i}"
        sub.mkdir(parents=True)
        text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(500))
        (sub / f"f{i}.txt").write_text(text + "\n", encoding="utf-8")
    (root / "ignored.md").write_text("not matched by the glob", encoding="utf-8")
    (root / "part0" / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))  # not UTF-8: skipped
    return root


def test_find_text_files_and_max_bytes(data_dir):
    files = find_text_files(data_dir)
    assert len(files) == 7 and all(f.suffix == ".txt" for f in files)
    assert find_text_files([data_dir / "ignored.md", data_dir], glob="*.md") == [data_dir / "ignored.md"]
    texts = _read_texts(files, max_bytes=10_000, show_progress=False)
    assert 9_000 < sum(len(t.encode()) for t in texts) <= 10_000 and len(texts) < len(files)
    assert texts[-1].endswith("\n")  # cut at a line end
    with pytest.raises(LitModelError, match="does not exist"):
        find_text_files(data_dir / "nope")


def test_train_bpe(data_dir, tmp_path):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = train_tokenizer(data_dir, tmp_path / "bpe", kind="bpe", vocab_size=400, special_tokens=specials,
                          show_progress=False)
    assert sorted(p.name for p in (tmp_path / "bpe").iterdir()) == ["generation_config.json", "tokenizer.json",
                                                                   "tokenizer_config.json"]
    assert tok.vocab_size == 400
    assert [tok.token_to_id(t) for t in specials] == [0, 1, 2]
    assert tok.bos_id == tok.eos_id == 0 and tok.pad_id is None and not tok.add_bos and tok.stop_ids == {0}
    assert tok.encode("<|im_start|>user") [0] == 1
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text)) == text
    _check_transformers(tmp_path / "bpe", tok)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_sentencepiece(data_dir, tmp_path, model_type):
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>"]
    tok = train_tokenizer([data_dir / "part0", data_dir / "part1" / "deep1" / "f1.txt"], tmp_path / "sp",
                          kind="sentencepiece", sp_model_type=model_type, vocab_size=500, special_tokens=specials,
                          max_bytes=200_000, show_progress=False)
    assert tok.backend == "sentencepiece" and tok.vocab_size == 500
    assert [tok.token_to_id(t) for t in specials] == [0, 1, 2, 3, 4]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 3, True)
    ids = tok.encode("hi <|im_start|>x")
    assert ids[0] == 1 and 4 in ids and tok.decode(ids, skip_special_tokens=True) == "hi x"
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text, bos=False)) == text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    _check_transformers(tmp_path / "sp", tok)


def _check_transformers(path: Path, tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    assert len(hf) == tok.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for text in ROUND_TRIP[:-2]:  # (transformers drops SentencePiece's dummy prefix of text starting with a space)
        ids = tok.encode(text)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == text


def test_train_errors_in_process(data_dir, tmp_path):
    with pytest.raises(LitModelError, match="too small"):
        train_tokenizer(data_dir, tmp_path / "a", kind="sentencepiece", vocab_size=258, show_progress=False)
    with pytest.raises(LitModelError, match="SentencePiece training failed"):  # more pieces than the text has
        train_tokenizer(data_dir / "part0" / "deep0", tmp_path / "b", kind="sentencepiece", sp_model_type="unigram",
                        vocab_size=20000, show_progress=False)
    with pytest.raises(LitModelError, match="unknown tokenizer kind"):
        train_tokenizer(data_dir, tmp_path / "c", kind="wordpiece", show_progress=False)
    assert not any(tmp_path.iterdir())  # nothing written, no temporary directories left


def _load_script():
    spec = importlib.util.spec_from_file_location("train_tokenizer_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_in_process(data_dir, tmp_path, monkeypatch, capsys):
    script = _load_script()
    monkeypatch.setattr(sys, "argv", ["train_tokenizer.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        script.setup()
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(flag in out for flag in ("--data_dir", "--vocab_size", "--kind", "--glob", "--print_config"))

    config = tmp_path / "config.yaml"
    config.write_text(f"data_dir: {data_dir / 'part1'}\nvocab_size: 300\nspecial_tokens: ['<|endoftext|>', '<pad>']\n")
    argv = ["train_tokenizer.py", "--config", str(config), "--out_dir", "o", "--print_config"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        script.setup()
    out = capsys.readouterr().out
    assert "vocab_size: 300" in out and "kind: bpe" in out and not (tmp_path / "o").exists()

    monkeypatch.setattr(sys, "argv", ["train_tokenizer.py", "--config", str(config), "--out_dir", str(tmp_path / "ok"),
                                      "--max_bytes", "50000"])
    script.setup()
    tok = Tokenizer(tmp_path / "ok")
    assert tok.vocab_size <= 300 and tok.pad_id == tok.token_to_id("<pad>") == 1
    assert tok.decode(tok.encode("Hello wörld 👋")) == "Hello wörld 👋"
    assert "wrote a bpe tokenizer" in capsys.readouterr().err


def test_cli_bad_inputs(data_dir, tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("keep")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    cases = {  # the real CLI in subprocesses, all at once (each is mostly interpreter start-up)
        "no files matching '**/*.csv'": ["--data_dir", str(data_dir), "--glob", "**/*.csv", "--out_dir", "o1"],
        "--vocab_size 100 is too small": ["--data_dir", str(data_dir), "--vocab_size", "100", "--out_dir", "o2"],
        "exists and is not empty": ["--data_dir", str(data_dir), "--out_dir", str(existing)],
    }
    procs = {needle: subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE) for needle, args in cases.items()}
    for needle, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        lines = err.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, (needle, err)
        assert lines[0].startswith("error: ") and needle in lines[0], (needle, err)
    assert (existing / "keep.txt").read_text() == "keep" and len(list(existing.iterdir())) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]  # nothing written, no temporary directories
