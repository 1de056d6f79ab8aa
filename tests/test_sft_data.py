import json
import logging
import random

import pytest
import torch
import torch.nn.functional as F

from litmodel import Config, build_model
from litmodel.data.prompts import alpaca_prompt, record_to_messages
from litmodel.data.records import load_records
from litmodel.data.sft import (
    IGNORE_INDEX,
    JSONData,
    PackedBatches,
    SFTDataset,
    collate_fn,
    pack_examples,
    sft_loss,
)
from litmodel.tokenizer import Tokenizer
from litmodel.utils import LitModelError

transformers = pytest.importorskip("transformers")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# renders a header only for conversations longer than two messages: prefixes of those are not prefix-stable
UNSTABLE = "{% if messages|length > 2 %}{{ 'LONG\n' }}{% endif %}" + CHATML
WORDS = ("the a model learns to answer questions about data and code with short clear sentences while "
         "training on small examples each step reads tokens from a list then writes the output file").split()


def _text(n_words=1500, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 10):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + ".")
    return "\n".join(lines) + "\n### Instruction:\n### Input:\n### Response:\nBelow is an instruction\n"


def _make_tokenizer_dir(path, chat_template):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([_text()], trainer)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", additional_special_tokens=specials[3:])
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {name: _make_tokenizer_dir(root / name, tpl)
            for name, tpl in (("chat", CHATML), ("base", None))}


ALPACA = [
    {"instruction": "Answer the question about data", "input": "the model reads tokens", "output": "It learns."},
    {"instruction": "Write short clear sentences", "output": "Each step reads a list."},
    {"instruction": "Explain code", "input": None, "output": "The output file."},
]
CHATS = [
    {"messages": [{"role": "system", "content": "You answer with short sentences."},
                  {"role": "user", "content": "What does the model learn?"},
                  {"role": "assistant", "content": "It learns to answer questions."},
                  {"role": "user", "content": "And then?"},
                  {"role": "assistant", "content": "Then it writes the output file."}]},
    {"messages": [{"role": "user", "content": "Read tokens"}, {"role": "assistant", "content": "Tokens read."}]},
]


def write(path, records, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return path


def full_ids(ex):
    return ex["input_ids"].tolist() + [ex["labels"][-1].item()]


def learned_mask(ex):
    """learn flag per token of the full sequence (token 0 never learned)."""
    return [False] + [v != IGNORE_INDEX for v in ex["labels"].tolist()]


def test_alpaca_labels_mask_exactly_the_prompt(tmp_path, tok_dirs):
    tok = Tokenizer(tok_dirs["base"])
    data = JSONData(write(tmp_path / "a.jsonl", ALPACA, jsonl=True), val_split_fraction=0.0)
    data.setup(tok, max_seq_length=512)
    assert data.prompt_style == "alpaca"  # no chat template -> alpaca
    assert len(data.train_dataset) == 3 and data.val_dataset is None
    for i, rec in enumerate(ALPACA):
        ex = data.train_dataset[i]
        ids, learn = full_ids(ex), learned_mask(ex)
        prompt = alpaca_prompt(rec["instruction"], rec.get("input") or "")
        n_prompt = learn.index(True)
        assert all(learn[n_prompt:]) and not any(learn[:n_prompt])
        assert ids[0] == tok.bos_id and tok.decode(ids[1:n_prompt]) == prompt
        assert ids[:n_prompt] == tok.encode(prompt)
        assert ids[n_prompt:] == tok.encode(rec["output"], bos=False) + [tok.eos_id]  # EOS appended, learned
        assert tok.decode(ids[n_prompt:]) == rec["output"] + "</s>"
        assert "### Input:" in prompt if rec.get("input") else "### Input:" not in prompt


def test_alpaca_style_multiturn_chat_records(tmp_path, tok_dirs):
    tok = Tokenizer(tok_dirs["chat"])
    data = JSONData(write(tmp_path / "c.json", CHATS[:1]), val_split_fraction=0.0, prompt_style="alpaca")
    data.setup(tok, max_seq_length=512)
    ex = data.train_dataset[0]
    ids, learn = full_ids(ex), learned_mask(ex)
    learned = [t for t, ok in zip(ids, learn) if ok]
    answers = [m["content"] for m in CHATS[0]["messages"] if m["role"] == "assistant"]
    assert learned == sum((tok.encode(a, bos=False) + [tok.eos_id] for a in answers), [])
    text = tok.decode(ids)
    assert text.startswith("<s>You answer with short sentences.\n\n### Instruction:\nWhat does the model learn?")
    assert "</s>### Instruction:\nAnd then?\n\n### Response:\nThen it writes the output file.</s>" in text


def test_chat_records_tokenize_like_transformers_and_mask_all_but_assistant(tmp_path, tok_dirs):
    tok = Tokenizer(tok_dirs["chat"])
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dirs["chat"]))
    records = CHATS + ALPACA
    data = JSONData(write(tmp_path / "c.json", records), val_split_fraction=0.0)
    data.setup(tok, max_seq_length=512)
    assert data.prompt_style == "chat"
    assert data.train_dataset.stats["unstable_turns"] == 0
    for i, rec in enumerate(records):
        ex = data.train_dataset[i]
        ref = hf.apply_chat_template(record_to_messages(rec), tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        ids, amask = ref["input_ids"], ref["assistant_masks"]
        assert ex["input_ids"].tolist() == ids[:-1]  # inputs: the rendering (the last token is only a target)
        # learned targets = exactly the tokens the template's {% generation %} blocks mark (answer + <|im_end|>)
        assert ex["labels"].tolist() == [t if m else IGNORE_INDEX for t, m in zip(ids[1:], amask[1:])]
        assert sum(amask) > 0
    alpaca_msgs = record_to_messages(ALPACA[0])
    assert alpaca_msgs == [{"role": "user", "content": "Answer the question about data\n\nthe model reads tokens"},
                           {"role": "assistant", "content": "It learns."}]
    assert record_to_messages(ALPACA[1])[0]["content"] == "Write short clear sentences"


def test_template_that_is_not_prefix_stable(tmp_path, tok_dirs, caplog):
    tok = Tokenizer(tok_dirs["chat"])
    tok.chat_template = UNSTABLE
    path = write(tmp_path / "c.json", CHATS)
    with caplog.at_level(logging.WARNING, logger="litmodel.data.sft"):
        ds = SFTDataset(load_records(path), tok, 512)
    assert "not prefix-stable" in caplog.text
    # the first answer of the 5-message chat cannot be located (its prefixes lack the header); the last can
    assert ds.stats["unstable_turns"] == 1 and ds.stats["unstable_dropped"] == 0 and len(ds) == 2
    ex = ds[0]
    learned = [t for t in ex["labels"].tolist() if t != IGNORE_INDEX]
    assert tok.decode(learned) == "Then it writes the output file.<|im_end|>"
    # a template that renders a conversation differently once it ends with an answer: nothing is learnable
    tok.chat_template = "{% if messages[-1]['role'] == 'assistant' %}{{ 'DONE' }}{% endif %}" + CHATML
    with pytest.raises(LitModelError, match="not prefix-stable.*prompt_style='alpaca'"):
        SFTDataset(load_records(path), tok, 512)
    assert len(SFTDataset(load_records(path), tok, 512, prompt_style="alpaca")) == 2


def test_truncation_is_counted_and_collate_pads(tmp_path, tok_dirs):
    tok = Tokenizer(tok_dirs["chat"])
    data = JSONData(write(tmp_path / "c.json", CHATS + ALPACA), val_split_fraction=0.0)
    data.setup(tok, max_seq_length=40)
    lengths = data.train_dataset.lengths()
    assert max(lengths) <= 40
    assert data.train_dataset.stats["truncated"] >= 1
    assert "truncated=" in data.describe()
    batch = collate_fn([data.train_dataset[0], data.train_dataset[1]], pad_id=tok.pad_id)
    n0, n1 = lengths[0], lengths[1]
    assert batch["input_ids"].shape == batch["labels"].shape == (2, max(n0, n1))
    short, n = (1, n1) if n1 < n0 else (0, n0)
    assert (batch["input_ids"][short, n:] == tok.pad_id).all() and (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert "mask" not in batch and "positions" not in batch
    # an example whose answer lies beyond max_seq_length has no labels and is dropped (counted)
    ds = SFTDataset([{"instruction": "x " * 40, "output": "y"}, ALPACA[1]], tok, 30)
    assert len(ds) == 1 and ds.stats["no_labels"] == 1


def test_split_is_deterministic_and_loaders_work(tmp_path, tok_dirs):
    records = [{"instruction": f"Answer {i}", "output": f"Reply {i}."} for i in range(40)]
    path = write(tmp_path / "a.json", records)

    def split(seed):
        d = JSONData(path, val_split_fraction=0.1, seed=seed)
        d.setup(tok_dirs["chat"], 64)
        return [tok.decode(d.val_dataset[i]["input_ids"]) for i in range(len(d.val_dataset))], d

    tok = Tokenizer(tok_dirs["chat"])
    (v1, d1), (v2, _), (v3, _) = split(42), split(42), split(7)
    assert len(v1) == 4 and v1 == v2 and v1 != v3
    assert len(d1.train_dataset) == 36
    assert sum(len(b["input_ids"]) for b in d1.val_dataloader(3)) == 4
    d1.packed = True
    batches = list(d1.train_dataloader(2))
    assert all(b["mask"].dtype == torch.bool and b["mask"].shape[1] == 1 for b in batches)
    assert sum(int(b["positions"].eq(0).sum()) for b in batches) >= 36  # every example starts at position 0


def test_format_prompt(tmp_path, tok_dirs):
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dirs["chat"]))
    chat = JSONData(write(tmp_path / "a.json", ALPACA), val_split_fraction=0.0)
    chat.setup(tok_dirs["chat"], 128)
    msgs = [{"role": "user", "content": "What does the model learn?"}]
    assert chat.format_prompt("What does the model learn?") == hf.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat.format_prompt(ALPACA[0]) == hf.apply_chat_template(
        record_to_messages(ALPACA[0])[:1], add_generation_prompt=True, tokenize=True, return_dict=False)
    base = JSONData(tmp_path / "a.json", val_split_fraction=0.0)
    base.setup(tok_dirs["base"], 128)
    tok = base.tokenizer
    assert base.format_prompt("Explain code") == tok.encode(alpaca_prompt("Explain code"))
    assert base.format_prompt(ALPACA[0]) == tok.encode(alpaca_prompt(ALPACA[0]["instruction"], ALPACA[0]["input"]))


TINY_MODELS = {
    "llama": dict(model_type="llama", n_query_groups=2, intermediate_size=48),
    "gpt2": dict(model_type="gpt2", bias=True, tie_embeddings=True, learned_pos_emb=True, gelu_approximate="tanh",
                 rotary_percentage=0.0),
    "neox": dict(model_type="gpt_neox", bias=True, parallel_residual=True, rotary_percentage=0.25),
}


@pytest.mark.parametrize("family", list(TINY_MODELS))
def test_packed_batch_gives_the_same_per_example_loss(tmp_path, tok_dirs, family):
    tok = Tokenizer(tok_dirs["chat"])
    records = CHATS + ALPACA + [{"instruction": f"Answer {i}", "output": "Reply."} for i in range(5)]
    ds = SFTDataset(records, tok, 96)
    packed = PackedBatches(ds, 96, seed=1)
    assert len(packed) < len(ds) and sorted(sum(packed.rows, [])) == list(range(len(ds)))
    assert all(sum(ds.lengths()[j] for j in row) <= 96 for row in packed.rows)
    torch.manual_seed(0)
    model = build_model(Config(block_size=96, vocab_size=400, n_layer=2, n_head=4, n_embd=32,
                               **TINY_MODELS[family])).eval()
    model.init_weights()
    batch = collate_fn([packed[i] for i in range(len(packed))], pad_id=tok.pad_id)
    with torch.no_grad():
        logits = model(batch["input_ids"], positions=batch["positions"], mask=batch["mask"])
        packed_loss = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
        for r, row in enumerate(packed.rows):
            offset = 0
            for j in row:
                ex = ds[j]
                n = len(ex["input_ids"])
                alone = F.cross_entropy(model(ex["input_ids"][None])[0], ex["labels"], reduction="none")
                assert (packed_loss[r, offset:offset + n] - alone).abs().max().item() <= 1e-5
                offset += n
            assert (batch["labels"][r, offset:] == IGNORE_INDEX).all()
        # the mean loss over a packed batch equals the token-weighted mean over the examples
        padded = collate_fn([ds[i] for i in range(len(ds))], pad_id=tok.pad_id)
        ref = sft_loss(model(padded["input_ids"]), padded["labels"])
        assert abs(sft_loss(logits, batch["labels"]).item() - ref.item()) <= 1e-5


def test_pack_examples_best_fit():
    rows = pack_examples([5, 3, 7, 2, 8, 1], 10, seed=0)
    assert sorted(sum(rows, [])) == list(range(6))
    assert all(sum([5, 3, 7, 2, 8, 1][i] for i in r) <= 10 for r in rows) and len(rows) == 3


@pytest.mark.parametrize("content, match", [
    ('[{"instruction": "a", "input": "b"}]', r"record 0 is missing key 'output'"),
    ('[{"instruction": "a", "output": "b"}, {"output": "c"}]', r"record 1 is missing key 'instruction'"),
    ('[{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}]',
     r"record 0: messages\[1\] is missing key 'content'"),
    ('[{"messages": [{"role": "user", "content": "a"}]}]', r"record 0 has no assistant message"),
    ('[{"prompt": "a", "completion": "b"}]', r"record 0 has an unknown format \(keys: completion, prompt\)"),
    ('[{"messages": [{"role": "robot", "content": "a"}]}]', r"unknown role 'robot'"),
    ("[]", r"contains no records"),
    ("", r"contains no records"),
    ('{"instruction": "a", "output": "b"}', r"not a list of records"),
    ("[{", r"is not valid JSON"),
    ('["text"]', r"record 0 is a JSON str, not an object"),
])
def test_bad_json_inputs(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(LitModelError, match=match) as err:
        load_records(path)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path, tok_dirs):
    with pytest.raises(LitModelError, match="does not exist"):
        load_records(tmp_path / "missing.json")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(LitModelError, match="unknown data file format '.csv'"):
        load_records(tmp_path / "d.csv")
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a"\n')
    with pytest.raises(LitModelError, match=r"line 3 is not valid JSON"):
        load_records(tmp_path / "d.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(LitModelError, match="contains no records"):
        load_records(tmp_path / "e.jsonl")
    with pytest.raises(LitModelError, match="unknown prompt_style 'plain'"):
        JSONData(tmp_path / "d.jsonl", prompt_style="plain")
    data = JSONData(write(tmp_path / "a.json", ALPACA), prompt_style="chat")
    with pytest.raises(LitModelError, match="needs a chat template"):
        data.setup(tok_dirs["base"], 64)
    data = JSONData(write(tmp_path / "c.json", [{"messages": [
        {"role": "assistant", "content": "hi"}, {"role": "user", "content": "a"}]}]), prompt_style="alpaca",
        val_split_fraction=0.0)
    with pytest.raises(LitModelError, match="record 0: the alpaca prompt style needs messages alternating"):
        data.setup(tok_dirs["chat"], 64)
