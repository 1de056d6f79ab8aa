"""Preference data for DPO (litmodel/data/preference.py): TRL's record shapes, rendering identical to the SFT data,
answer-only labels, prompt-first truncation, pair batches, and one-line errors for bad records."""

import json
import logging

import pytest
import torch

from litmodel.data.preference import (
    PreferenceData,
    PreferenceDataset,
    collate_pairs,
    load_preference_records,
    truncate_pair,
)
from litmodel.data.prompts import alpaca_prompt
from litmodel.data.sft import JSONData
from litmodel.losses import IGNORE_INDEX
from litmodel.tokenizer import Tokenizer
from litmodel.utils import LitModelError

pytest.importorskip("transformers")
from test_sft_data import CHATML, _make_tokenizer_dir  # noqa: E402  (the SFT data tests' tiny BPE + ChatML)

PAIRS = [
    {"prompt": "What does the model learn?", "chosen": "It learns to answer questions.", "rejected": "Data."},
    {"prompt": [{"role": "system", "content": "You answer with short sentences."},
                {"role": "user", "content": "Read tokens"}],
     "chosen": {"role": "assistant", "content": "Tokens read."},
     "rejected": [{"role": "assistant", "content": "The model writes the output file then reads a list."}]},
]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"chat": Tokenizer(_make_tokenizer_dir(root / "chat", CHATML)),
            "base": Tokenizer(_make_tokenizer_dir(root / "base", None))}


def write(path, records):
    path.write_text(json.dumps(records))
    return path


def sft_example(tmp_path, tok, messages, prompt_style=None):
    data = JSONData(write(tmp_path / "sft.json", [{"messages": messages}]), val_split_fraction=0.0,
                    prompt_style=prompt_style)
    data.setup(tok, max_seq_length=512)
    return data.train_dataset[0]


def answer_tokens(labels):
    return [t for t in labels.tolist() if t != IGNORE_INDEX]


def test_chat_pairs_render_exactly_like_the_sft_data(tmp_path, toks):
    """Each row is the SFT data's rendering of prompt + answer, cut after the answer's end-of-turn token, with the
    same labels: the answer (and <|im_end|>) only."""
    tok = toks["chat"]
    ds = PreferenceDataset(PAIRS, tok, max_seq_length=512)
    assert len(ds) == 2 and ds.prompt_style == "chat" and ds.stats["truncated"] == 0
    for i, rec in enumerate(PAIRS):
        prompt = [{"role": "user", "content": rec["prompt"]}] if isinstance(rec["prompt"], str) else rec["prompt"]
        item = ds[i]
        for side in ("chosen", "rejected"):
            answer = rec[side] if isinstance(rec[side], str) else \
                (rec[side]["content"] if isinstance(rec[side], dict) else rec[side][0]["content"])
            ex = sft_example(tmp_path, tok, prompt + [{"role": "assistant", "content": answer}])
            x, y = item[f"{side}_input_ids"], item[f"{side}_labels"]
            n = len(x)
            assert x.tolist() == ex["input_ids"][:n].tolist() and y.tolist() == ex["labels"][:n].tolist()
            assert answer_tokens(ex["labels"]) == answer_tokens(y)  # nothing learned was cut
            assert tok.decode(answer_tokens(y)) == answer + "<|im_end|>"
            n_prompt = len(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
            assert (y[: n_prompt - 1] == IGNORE_INDEX).all() and (y[n_prompt - 1:] != IGNORE_INDEX).all()
        # both rows share the prompt tokens
        n_prompt = int((item["chosen_labels"] == IGNORE_INDEX).sum()) + 1
        assert item["chosen_input_ids"][:n_prompt].tolist() == item["rejected_input_ids"][:n_prompt].tolist()


def test_record_shapes_give_the_same_pair(toks):
    """String prompt vs user message, string vs assistant message vs list of one, implicit prompt: one pair."""
    tok = toks["chat"]
    user = [{"role": "user", "content": "Read tokens"}]
    shapes = [
        {"prompt": "Read tokens", "chosen": "Tokens read.", "rejected": "No."},
        {"prompt": user, "chosen": {"role": "assistant", "content": "Tokens read."},
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"chosen": user + [{"role": "assistant", "content": "Tokens read."}],
         "rejected": user + [{"role": "assistant", "content": "No."}]},
    ]
    ds = PreferenceDataset(shapes, tok, max_seq_length=512)
    for i in (1, 2):
        for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
            assert torch.equal(ds[i][key], ds[0][key]), (i, key)


def test_alpaca_style_pairs(toks):
    tok = toks["base"]
    ds = PreferenceDataset(PAIRS[:1], tok, max_seq_length=512)
    assert ds.prompt_style == "alpaca"
    item = ds[0]
    prompt_ids = tok.encode(alpaca_prompt(PAIRS[0]["prompt"]))
    for side in ("chosen", "rejected"):
        answer = tok.encode(PAIRS[0][side], bos=False) + [tok.eos_id]
        assert item[f"{side}_input_ids"].tolist() == (prompt_ids + answer)[:-1]
        assert answer_tokens(item[f"{side}_labels"]) == answer


def test_truncation_cuts_the_prompt_first_and_is_counted(toks):
    assert truncate_pair([1, 2, 3, 4], [5, 6], [7], 4) == ([2, 3, 4], [5, 6], [7], True)
    assert truncate_pair([1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [7], 4) == ([4], [5, 6, 7, 8], [7], True)
    assert truncate_pair([1, 2], [5], [7], 4) == ([1, 2], [5], [7], False)
    tok = toks["chat"]
    whole = PreferenceDataset(PAIRS, tok, max_seq_length=512)
    longest_answer = max(int((whole[i][f"{s}_labels"] != IGNORE_INDEX).sum()) for i in range(2)
                         for s in ("chosen", "rejected"))
    n = longest_answer + 3
    ds = PreferenceDataset(PAIRS, tok, max_seq_length=n)
    assert ds.stats["truncated"] == 2
    for i in range(2):
        for side in ("chosen", "rejected"):
            x, y = ds[i][f"{side}_input_ids"], ds[i][f"{side}_labels"]
            full_x, full_y = whole[i][f"{side}_input_ids"], whole[i][f"{side}_labels"]
            assert len(x) <= n
            assert answer_tokens(y) == answer_tokens(full_y)  # the answers are whole ...
            assert x.tolist() == full_x[len(full_x) - len(x):].tolist()  # ... the prompts lost their start
        assert len(ds[i]["chosen_input_ids"]) == n or len(ds[i]["rejected_input_ids"]) == n
    # answers that differ only beyond max_seq_length carry no signal: skipped as identical
    same_start = {"prompt": "Read tokens", "chosen": "Tokens read. The model", "rejected": "Tokens read. A list"}
    ds = PreferenceDataset([same_start], tok, max_seq_length=4)
    assert len(ds) == 0 and ds.stats["identical"] == 1


def test_collate_puts_chosen_rows_first(toks):
    ds = PreferenceDataset(PAIRS, toks["chat"], max_seq_length=512)
    ds.reference = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    batch = collate_pairs([ds[0], ds[1]], pad_id=7)
    T = batch["input_ids"].shape[1]
    assert batch["input_ids"].shape == batch["labels"].shape == (4, T)
    rows = [ds[0]["chosen_input_ids"], ds[1]["chosen_input_ids"], ds[0]["rejected_input_ids"],
            ds[1]["rejected_input_ids"]]
    for row, x, y in zip(rows, batch["input_ids"], batch["labels"]):
        assert x[: len(row)].tolist() == row.tolist() and (x[len(row):] == 7).all()
        assert (y[len(row):] == IGNORE_INDEX).all()
    assert batch["ref_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]
    assert batch["index"].tolist() == [0, 1] and int(batch["n_tokens"]) == sum(len(r) for r in rows)


def test_data_module_split_and_loaders(tmp_path, toks):
    records = [{"prompt": f"Question {i} about data", "chosen": "Short clear sentences.", "rejected": f"No {i}."}
               for i in range(10)]
    data = PreferenceData(write(tmp_path / "p.json", records), val_split_fraction=0.2)
    data.setup(toks["chat"], max_seq_length=64)
    assert len(data.train_dataset) == 8 and len(data.val_dataset) == 2
    assert "8 train / 2 val preference pairs" in data.describe()
    batch = next(iter(data.train_dataloader(4)))
    assert batch["input_ids"].shape[0] == 8
    assert len(list(data.val_dataloader(4))) == 1
    prompt = data.format_prompt("Question 0 about data")
    assert toks["chat"].decode(prompt).endswith("<|im_start|>assistant\n")


def test_identical_answers_are_skipped_with_a_warning(tmp_path, toks, caplog):
    records = PAIRS + [{"prompt": "Same", "chosen": "Tokens read.", "rejected": "Tokens read."}] * 2
    with caplog.at_level(logging.WARNING):
        data = PreferenceData(write(tmp_path / "p.json", records), val_split_fraction=0.0)
        data.setup(toks["chat"], max_seq_length=64)
    assert len(data.train_dataset) == 2 and data.stats["train"]["identical"] == 2
    assert "2 record(s) have a chosen answer identical to the rejected one" in caplog.text
    assert "identical=2 (skipped)" in data.describe()
    only_identical = PreferenceData(write(tmp_path / "q.json", records[2:]), val_split_fraction=0.0)
    with pytest.raises(LitModelError, match="no usable training pair"):
        only_identical.setup(toks["chat"], max_seq_length=64)


@pytest.mark.parametrize("records, match", [
    ([PAIRS[0], {"prompt": "x", "chosen": "y"}], r"record 1 is missing key 'rejected'"),
    ([{"prompt": "x", "rejected": "y"}], r"record 0 is missing key 'chosen'"),
    ([], "contains no records; add records with prompt, chosen and rejected"),
    ([{"prompt": 3, "chosen": "a", "rejected": "b"}], "'prompt' must be a string or a list of chat messages"),
    ([{"prompt": "x", "chosen": ["a"], "rejected": "b"}], r"record 0: chosen\[0\] is not an object"),
    ([{"prompt": "x", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}],
     "'chosen' must be a string, an assistant message"),
    ([{"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}],
     "has no 'prompt'"),
    ([{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
       "rejected": "b"}], "'prompt' ends with an assistant message"),
])
def test_bad_records_fail_with_one_line_naming_the_record(tmp_path, records, match):
    with pytest.raises(LitModelError, match=match) as err:
        load_preference_records(write(tmp_path / "bad.json", records))
    assert "\n" not in str(err.value)
