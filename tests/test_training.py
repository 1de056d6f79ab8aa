"""The training loop (litmodel/training.py `fit`): per-token normalisation over the global batch.

Finetuning on answers of very uneven lengths gives the same weights for every layout of the same
global batch (one micro-batch, accumulation, DDP, FSDP, packing), equal to a hand-written plain
PyTorch reference that divides the summed token loss by the number of answer tokens.
"""

import json
import math

import pytest
import torch

from tests.test_finetune import TINY, make_tokenizer

# answers from 1 to ~60 tokens: a per-example (or per-micro-batch) mean weights them very differently
RECORDS = [
    ("Say yes.", "Yes."),
    ("Count to three.", "One, two, three."),
    ("Describe the sky.", "The sky is blue by day, black at night, and red or orange at sunset when the sun is low."),
    ("Tell a long story.", "Once upon a time a cat lived in a small house by the river. Every day it sat on "
                           "the bridge and watched the fish."),
]
LR, STEPS, MAX_NORM = 0.01, 3, 1.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from litmodel import Config, build_model
    from litmodel.checkpoint import save_checkpoint_dir
    from litmodel.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("training")
    tok_dir = make_tokenizer(root / "tokenizer")
    vocab = Tokenizer(tok_dir).vocab_size
    config = Config(**{**TINY, "block_size": 128}, vocab_size=vocab, padded_vocab_size=(vocab + 63) // 64 * 64)
    torch.manual_seed(0)
    model = build_model(config)
    model.init_weights()
    ckpt = save_checkpoint_dir(root / "base", model, config, tok_dir)
    data = root / "data.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                for q, a in RECORDS]))
    return {"root": root, "ckpt": ckpt, "data": data}


def examples(setup):
    """The tokenized training examples exactly as the recipe sees them."""
    from litmodel.data.sft import JSON
    from litmodel.tokenizer import Tokenizer

    data = JSON(setup["data"], val_split_fraction=0)
    data.setup(Tokenizer(setup["ckpt"]), 128)
    return data, [data.train_dataset[i] for i in range(len(data.train_dataset))]


def reference_weights(setup, per_example_mean: bool = False) -> dict[str, torch.Tensor]:
    """Plain PyTorch: each step, every example forwarded alone (no padding, no packing); the loss is the
    sum of the answer-token losses divided by the number of answer tokens in the whole batch.
    ``per_example_mean``: the old (wrong) weighting, to show the test tells them apart."""
    import torch.nn.functional as F

    from litmodel.checkpoint import load_model

    _, items = examples(setup)
    model = load_model(setup["ckpt"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)
    n_targets = sum(int((it["labels"] != -100).sum()) for it in items)
    for _ in range(STEPS):
        losses = []
        for it in items:
            logits = model(it["input_ids"][None])[0]
            loss = F.cross_entropy(logits.float(), it["labels"], ignore_index=-100, reduction="sum")
            losses.append(loss / int((it["labels"] != -100).sum()) / len(items) if per_example_mean
                          else loss / n_targets)
        sum(losses).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad()
    sd = model.state_dict()
    sd.pop("lm_head.weight", None) if model.config.tie_embeddings else None
    return sd


def finetune(setup, name: str, global_batch: int, micro_batch: int, devices: int = 1, strategy: str = "auto",
             packed: bool = False) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from litmodel.data.sft import JSON
    from litmodel.finetune import finetune_full
    from litmodel.finetune_args import FinetuneEvalArgs, FinetuneTrainArgs

    out = setup["root"] / name
    train = FinetuneTrainArgs(global_batch_size=global_batch, micro_batch_size=micro_batch, epochs=STEPS, lr=LR,
                              min_lr=LR, warmup_steps=0, weight_decay=0.0, max_norm=MAX_NORM, save_interval=None)
    final = finetune_full(setup["ckpt"], data=JSON(setup["data"], val_split_fraction=0, packed=packed), out_dir=out,
                          precision="32-true", devices=devices, strategy=strategy, accelerator="cpu",
                          logger="csv", train=train, eval=FinetuneEvalArgs(interval=0, max_new_tokens=0))
    return load_file(str(final / "model.safetensors"))


def relative_update_difference(got: dict, expected: dict, initial: dict) -> float:
    diff = math.sqrt(sum(float((got[k] - expected[k]).double().pow(2).sum()) for k in expected))
    update = math.sqrt(sum(float((expected[k] - initial[k]).double().pow(2).sum()) for k in expected))
    return diff / update


@pytest.fixture(scope="module")
def reference(setup):
    from safetensors.torch import load_file

    initial = load_file(str(setup["ckpt"] / "model.safetensors"))
    return initial, reference_weights(setup)


def test_reference_tells_token_from_example_weighting(setup, reference):
    """The check below is sensitive: weighting examples instead of tokens moves the weights far apart."""
    initial, expected = reference
    assert relative_update_difference(reference_weights(setup, per_example_mean=True), expected, initial) > 0.05


@pytest.mark.parametrize("layout", ["micro_batch_4", "accumulate_1x4", "packed"])
def test_single_process_layouts_equal_the_reference(setup, reference, layout):
    initial, expected = reference
    if layout == "packed":
        from litmodel.data.sft import pack_examples

        data, _ = examples(setup)
        rows = len(pack_examples(data.train_dataset.lengths(), 128, data.seed))
        assert rows < len(RECORDS)  # examples share rows
        got = finetune(setup, layout, global_batch=rows, micro_batch=1, packed=True)
    else:
        got = finetune(setup, layout, global_batch=4, micro_batch=4 if layout == "micro_batch_4" else 1)
    assert relative_update_difference(got, expected, initial) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("strategy,micro_batch", [("ddp", 1), ("fsdp", 2)])
def test_two_processes_equal_the_reference(setup, reference, strategy, micro_batch, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks: one thread each on this 2-core machine
    initial, expected = reference
    got = finetune(setup, f"{strategy}{micro_batch}", global_batch=4, micro_batch=micro_batch, devices=2,
                   strategy=strategy)
    assert relative_update_difference(got, expected, initial) < 1e-4


class ListLoader:
    """Micro-batches from a list, in order, with a resumable position (what `fit` needs of a loader)."""

    def __init__(self, batches):
        self.batches, self.position = batches, 0

    def __iter__(self):
        while self.position < len(self.batches):
            self.position += 1
            yield self.batches[self.position - 1]
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def tiny_loop_setup(tmp_path, vocab=64):
    from litmodel import Config, build_model
    from litmodel.fabric import Fabric
    from litmodel.loggers import CSVLogger
    from litmodel.training_args import TrainArgs, build_optimizer

    config = Config(**{**TINY, "n_embd": 32, "intermediate_size": 64, "block_size": 16}, vocab_size=vocab,
                    padded_vocab_size=vocab)
    torch.manual_seed(0)
    model = build_model(config)
    model.init_weights()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true", loggers=[CSVLogger(tmp_path, "logs")])
    fabric.launch()
    train = TrainArgs(global_batch_size=2, micro_batch_size=1, lr=0.01, min_lr=0.01, warmup_steps=0,
                      weight_decay=0.0, max_norm=None, save_interval=None)
    model = fabric.setup(model)
    optimizer = fabric.setup_optimizers(build_optimizer(model, train))
    return fabric, model, optimizer, train, initial


def lm_batch(seed, masked_from=0, length=12, vocab=64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, length + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[:, :masked_from] = -100
    return {"input_ids": ids[:, :-1], "labels": labels}


def test_masked_micro_batches_metrics_and_evaluators(tmp_path, capsys):
    """A micro-batch without targets adds nothing (no NaN); a global batch without targets skips the update
    with a warning; metric sums are logged per unit; evaluators run at each validation and are logged."""
    import csv

    import torch.nn.functional as F

    from litmodel.losses import next_token_loss
    from litmodel.training import fit
    from litmodel.training_args import EvalArgs

    fabric, model, optimizer, train, initial = tiny_loop_setup(tmp_path)
    b1, b2, masked = lm_batch(1, masked_from=5), lm_batch(2, masked_from=3), lm_batch(3, masked_from=12)
    # step 1: b1 + an all-masked micro-batch; step 2: all masked (skipped); step 3: b2 + all masked
    loader = ListLoader([b1, masked, masked, masked, b2, masked])
    calls = []

    def loss_fn(model, batch):
        loss_sum, _ = next_token_loss(model, batch)
        return loss_sum, {"double_loss": 2 * loss_sum}

    def evaluator(fabric, model, step):
        calls.append((step, model.training, torch.is_grad_enabled()))
        return {"answer": 42.0}

    result = fit(fabric, model, optimizer, loader, train=train, eval=EvalArgs(interval=2, final_validation=True),
                 out_dir=tmp_path, max_steps=3, loss_fn=loss_fn, evaluators=[evaluator])
    out = capsys.readouterr().out
    assert "step 2: no target_tokens in the whole global batch" in out and "update is skipped" in out
    assert result["step"] == 3 and result["units"] == 7 + 9 and result["answer"] == 42.0
    assert calls == [(2, False, False), (3, False, False)]

    # plain PyTorch: two AdamW steps on b1 and b2 alone, loss = summed token loss / target tokens
    from litmodel import build_model

    ref = build_model(model.config)
    ref.load_state_dict(initial)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for b in (b1, b2):
        loss = F.cross_entropy(ref(b["input_ids"])[0], b["labels"][0], reduction="sum") / (b["labels"] != -100).sum()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    got = model.module.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.isfinite(got[k]).all()
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)

    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train_rows = {int(r["step"]): r for r in rows if r["lr"]}
    assert train_rows[2]["loss"] == ""  # the skipped step logs no loss
    for step, expected in ((1, losses[0]), (3, losses[1])):
        assert float(train_rows[step]["loss"]) == pytest.approx(expected, rel=1e-5)
        assert float(train_rows[step]["double_loss"]) == pytest.approx(2 * expected, rel=1e-5)
    assert [float(r["answer"]) for r in rows if r["answer"]] == [42.0, 42.0]
    assert (tmp_path / "step-000003.pt").is_file()


def test_loss_plot_from_a_resumed_log(tmp_path):
    from litmodel.loggers import CSVLogger
    from litmodel.plot import plot_losses, read_losses

    log = CSVLogger(tmp_path, "logs")
    for step in (1, 2, 3):
        log.log_metrics({"tokens": 100 * step, "loss": 5.0 - step}, step=step)
    log.log_metrics({"tokens": 300, "val_loss": 2.5}, step=3)
    log.log_metrics({"tokens": 300, "loss": 1.5}, step=3)  # a resumed run repeats step 3
    losses = read_losses(log.metrics_file)
    assert losses == {"loss": [(100.0, 4.0), (200.0, 3.0), (300.0, 1.5)], "val_loss": [(300.0, 2.5)]}
    png = plot_losses(log.metrics_file, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_two_rank_lora_with_dropout_killed_and_resumed_equals_uninterrupted(setup, tmp_path):
    """2 DDP ranks, LoRA dropout (each rank its own random stream), SIGKILLed from outside once a checkpoint
    exists, resumed with --resume auto: the same losses and adapter as the uninterrupted run."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.helpers import run_and_kill
    from tests.test_finetune import ROOT, losses

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}

    def cmd(out):
        return [sys.executable, str(ROOT / "finetune" / "lora.py"), "--checkpoint_dir", str(setup["ckpt"]),
                "--out_dir", str(out), "--data", "JSON", "--data.json_path", str(setup["data"]),
                "--data.val_split_fraction", "0", "--precision", "32-true", "--accelerator", "cpu", "--devices", "2",
                "--strategy", "ddp", "--train.global_batch_size", "4", "--train.micro_batch_size", "1",
                "--train.epochs", "8", "--train.save_interval", "2", "--train.warmup_steps", "2", "--lora.r", "4",
                "--lora.dropout", "0.2", "--eval.interval", "0", "--eval.max_new_tokens", "0", "--merge", "false"]

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    r = subprocess.run(cmd(straight), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_and_kill(cmd(crashed), crashed / "step-000002.pt", cwd=ROOT, env=env)
    assert r.returncode == -9 and not (crashed / "final").exists(), r.stderr[-3000:]
    r = subprocess.run([*cmd(crashed), "--resume", "auto"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    a, b = losses(straight), losses(crashed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a[step], b[step])
    wa, wb = (load_file(str(d / "final" / "lora.safetensors")) for d in (straight, crashed))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
