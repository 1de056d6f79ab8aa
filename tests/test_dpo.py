"""DPO math (litmodel/dpo.py) against hand-written formulas of the papers, and the LoRA reference model
(litmodel.lora.disable_adapters) against the untouched base model."""

import copy
import math

import pytest
import torch

from litmodel import Config, build_model
from litmodel.dpo import DPOArgs, answer_logps, dpo_batch_sums, dpo_loss
from litmodel.lora import apply_lora, disable_adapters, mark_only_lora_as_trainable
from litmodel.utils import LitModelError

# fixed sequence log-probs of 3 pairs (policy chosen, policy rejected, reference chosen, reference rejected) and
# the answers' token counts (chosen, rejected)
PAIRS = [(-12.0, -15.5, -13.0, -14.0), (-7.25, -6.0, -7.0, -6.5), (-30.0, -31.0, -29.0, -33.0)]
TOKENS = [(4, 6), (3, 2), (10, 12)]


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def reference_pair(pc, pr, rc, rr, nc, nr, beta, loss, eps):
    """One pair, by the formulas: DPO (Rafailov et al. 2023, eq. 7), conservative DPO (Mitchell 2023, eq. 3), IPO
    (Azar et al. 2023, eq. 17) on length-averaged log-probs as TRL computes it."""
    if loss == "ipo":
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    h = (pc - rc) - (pr - rr)
    if loss == "sigmoid":
        value = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    else:
        value = (h - 1 / (2 * beta)) ** 2
    chosen_reward, rejected_reward = beta * (pc - rc), beta * (pr - rr)
    return {"loss": value, "rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
            "rewards/accuracies": float(chosen_reward > rejected_reward),
            "rewards/margins": chosen_reward - rejected_reward, "logps/chosen": pc, "logps/rejected": pr}


@pytest.mark.parametrize("loss, beta, eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0),
                                             ("ipo", 1.0, 0.0)])
def test_loss_and_rewards_equal_the_paper_formulas(loss, beta, eps):
    policy = torch.tensor([p[0] for p in PAIRS] + [p[1] for p in PAIRS], dtype=torch.float64)
    ref = torch.tensor([p[2] for p in PAIRS] + [p[3] for p in PAIRS], dtype=torch.float64)
    tokens = torch.tensor([t[0] for t in TOKENS] + [t[1] for t in TOKENS])
    loss_sum, sums = dpo_batch_sums(policy, tokens, ref, beta, loss, eps)
    expected = [reference_pair(*p, *t, beta, loss, eps) for p, t in zip(PAIRS, TOKENS)]
    assert loss_sum.item() == pytest.approx(sum(e["loss"] for e in expected), rel=1e-12)
    for key, value in sums.items():
        assert value.item() == pytest.approx(sum(e[key] for e in expected), rel=1e-12, abs=1e-12), key
    # the per-pair function, and its gradient: d/dh of -log sigmoid(beta h) = -beta sigmoid(-beta h)
    pc = torch.tensor(PAIRS[0][0], dtype=torch.float64, requires_grad=True)
    losses, _, _ = dpo_loss(pc, torch.tensor(PAIRS[0][1]), torch.tensor(PAIRS[0][2]), torch.tensor(PAIRS[0][3]),
                            beta, "sigmoid", eps)
    losses.backward()
    h = (PAIRS[0][0] - PAIRS[0][2]) - (PAIRS[0][1] - PAIRS[0][3])
    sig = 1 / (1 + math.exp(-beta * h))
    assert pc.grad.item() == pytest.approx(-(1 - eps) * beta * (1 - sig) + eps * beta * sig, rel=1e-12)


def test_answer_logps_sum_only_answer_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 8, -100, -100]])
    logps, n = answer_logps(logits, labels)
    lp = torch.log_softmax(logits, -1)
    expected = [sum(lp[b, t, labels[b, t]].item() for t in range(5) if labels[b, t] != -100) for b in range(2)]
    assert n.tolist() == [3, 2]
    torch.testing.assert_close(logps, torch.tensor(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [(dict(beta=0.0), "beta must be > 0"), (dict(beta=-1), "beta must be > 0"),
                                           (dict(loss="kto"), "unknown --dpo.loss"),
                                           (dict(label_smoothing=0.5), "label_smoothing must be in"),
                                           (dict(loss="ipo", label_smoothing=0.1), "sigmoid loss only")])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(LitModelError, match=match):
        DPOArgs(**kwargs).check()


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_reference_with_adapters_disabled_is_the_untouched_base(family):
    """The LoRA policy with its adapters disabled gives exactly the base model's logits and answer log-probs (no
    second copy of the weights), also through the Fabric wrapper, and the adapters work again afterwards."""
    from litmodel.fabric import Fabric

    torch.manual_seed(0)
    extra = dict(model_type="llama", n_query_groups=2, intermediate_size=96) if family == "llama" else \
        dict(model_type="gpt2")
    config = Config(name="tiny", block_size=32, n_layer=2, n_head=4, n_embd=32, vocab_size=100, padded_vocab_size=128,
                    **extra)
    base = build_model(config)
    base.init_weights()
    untouched = copy.deepcopy(base).eval()
    policy = mark_only_lora_as_trainable(apply_lora(base, targets="query,key,value,projection,mlp,head", r=4,
                                                    alpha=8, dropout=0.1))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)  # a trained adapter
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    fabric.launch()
    model = fabric.setup(policy)
    model.train()  # LoRA dropout is on; the reference must not see it
    idx = torch.randint(0, 100, (3, 16))
    labels = torch.randint(0, 100, (3, 16))
    labels[:, :5] = -100
    with torch.no_grad():
        expected = untouched(idx)
        with disable_adapters(model):
            ref = model(idx)
        adapted = model(idx)
    assert torch.equal(ref, expected)
    torch.testing.assert_close(answer_logps(ref, labels)[0], answer_logps(expected, labels)[0], rtol=0, atol=0)
    assert not torch.allclose(adapted, expected, atol=1e-3)  # enabled again after the block


def test_precomputed_reference_equals_the_per_step_reference(tmp_path):
    """`precompute_reference` (one pass, batched) gives each pair the log-probs the per-step reference gives it, and
    the loss with precomputed log-probs equals the loss with the reference run in the step."""
    from litmodel.data.preference import PreferenceDataset, collate_pairs
    from litmodel.dpo import DPOObjective, precompute_reference
    from litmodel.fabric import Fabric
    from test_dpo_data import PAIRS
    from test_sft_data import CHATML, _make_tokenizer_dir
    from litmodel.tokenizer import Tokenizer

    tok = Tokenizer(_make_tokenizer_dir(tmp_path / "tok", CHATML))
    records = PAIRS + [{"prompt": f"Read tokens {i}", "chosen": "Tokens read.", "rejected": "The data."} for i in range(3)]
    ds = PreferenceDataset(records, tok, max_seq_length=64)
    config = Config(name="tiny", model_type="llama", block_size=64, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
                    intermediate_size=64, vocab_size=tok.vocab_size, padded_vocab_size=448)
    torch.manual_seed(0)
    model = build_model(config)
    model.init_weights()
    mark_only_lora_as_trainable(apply_lora(model, targets="query,value", r=2, alpha=4))
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    fabric.launch()
    model = fabric.setup(model)
    objective = DPOObjective(DPOArgs(beta=0.2), autocast=fabric.autocast)
    ref = precompute_reference(fabric, objective, model, ds, batch_size=2, pad_id=0)
    assert ref.shape == (5, 2) and model.training
    for i in range(len(ds)):
        batch = collate_pairs([ds[i]])
        torch.testing.assert_close(ref[i], objective.reference_logps(model, batch), rtol=1e-5, atol=1e-5)
    ds.reference = ref
    batch_pre, batch = collate_pairs([ds[0], ds[3]]), collate_pairs([ds[0], ds[3]])
    batch.pop("ref_logps")
    (loss_pre, m_pre), (loss, m) = objective(model, batch_pre), objective(model, batch)
    torch.testing.assert_close(loss_pre, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m_pre["rewards/margins"], m["rewards/margins"], rtol=1e-4, atol=1e-5)
