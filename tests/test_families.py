"""The newer families (Qwen3, Qwen3-MoE, Mixtral, Phi-3/4, OLMo 2, SmolLM3, Gemma 2/3) against transformers.

Each tiny random HF model has its tricky options on and is converted from both config dialects
(transformers 5's `rope_parameters`, and the 4.x top-level keys most Hub checkpoints carry, written
by editing the saved config.json): logits within 1e-5 in fp32, HF -> litmodel -> HF bit-identical,
KV cache past the sliding window, greedy generation with and without the cache equal to
transformers' `generate`, and a LoRA step.
"""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from litmodel import build_model
from litmodel.checkpoint import load_config, load_model
from litmodel.config import Config
from litmodel.fast_decode import prepare_fast_decode
from litmodel.generate import generate_tokens
from litmodel.hf import convert_hf_checkpoint, convert_lit_checkpoint
from litmodel.llama import MoE, router_aux_loss
from litmodel.lora import LoRAConfig, apply_lora, lora_modules, mark_only_lora_as_trainable, merge_lora
from litmodel.lora_checkpoint import load_lora, save_lora
from litmodel.utils import LitModelError, num_parameters
from tests.helpers import perturbed_hf_model

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 96
SEQ = 20  # longer than every sliding window below
ATOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_config(kind: str):
    t = transformers
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=48, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "qwen3":  # head_dim independent of hidden / heads, tied head, a window from layer 1 on
        return t.Qwen3Config(**common, head_dim=24, tie_word_embeddings=True, use_sliding_window=True,
                             sliding_window=7, max_window_layers=1)
    if kind == "qwen3_moe":
        return t.Qwen3MoeConfig(**common, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                norm_topk_prob=False)
    if kind == "mixtral":
        return t.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=7)
    if kind == "phi3":  # partial rotary and a sliding window (Phi-3-mini's 2047 in small)
        return t.Phi3Config(**common, partial_rotary_factor=0.5, sliding_window=7)
    if kind == "phi4-longrope":  # LongRoPE: the long factors switch on past 12 positions
        return t.Phi3Config(**common, partial_rotary_factor=0.75, tie_word_embeddings=True,
                            original_max_position_embeddings=12,
                            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.75,
                                             "short_factor": [1.0, 1.1, 1.3, 1.7, 2.0, 2.5],
                                             "long_factor": [1.5, 2.0, 3.0, 5.0, 8.0, 13.0]})
    if kind == "olmo2":
        return t.Olmo2Config(**common)
    if kind == "smollm3":
        return t.SmolLM3Config(**{**common, "num_hidden_layers": 3}, no_rope_layers=[1, 0, 1], tie_word_embeddings=True)
    if kind == "gemma2":
        return t.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=20, attn_logit_softcapping=2.0,
                              final_logit_softcapping=3.0, sliding_window=7)
    if kind == "gemma3":
        return t.Gemma3TextConfig(**{**common, "num_hidden_layers": 3}, head_dim=16, query_pre_attn_scalar=20,
                                  sliding_window=7,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                      "rope_theta": 1000000.0},
                                                   "sliding_attention": {"rope_type": "default",
                                                                         "rope_theta": 10000.0}})
    raise ValueError(kind)


KINDS = ["qwen3", "qwen3_moe", "mixtral", "phi3", "phi4-longrope", "olmo2", "smollm3", "gemma2", "gemma3"]


def make_hf_model(kind: str, seed: int = 0):
    return perturbed_hf_model(hf_config(kind), seed)


def to_v4_dialect(hf_dir: Path, out: Path) -> None:
    """A copy of ``hf_dir`` whose config.json uses transformers 4.x's top-level rope keys."""
    shutil.copytree(hf_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    if cfg["model_type"] == "gemma3_text":
        local, rope = rope["sliding_attention"], rope["full_attention"]
        cfg["rope_local_base_freq"] = local["rope_theta"]
        cfg["sliding_window_pattern"] = 2
        del cfg["layer_types"]
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope.pop("partial_rotary_factor", None)
    cfg["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    if cfg["model_type"] in ("gemma2", "qwen3"):
        del cfg["layer_types"]  # 4.x: Gemma 2's even layers slide; Qwen3's from max_window_layers on
    if cfg["model_type"] == "qwen3_moe":
        cfg["num_experts"] = cfg.pop("num_local_experts")  # the Hub's 4.x key
    (out / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module", params=KINDS)
def family(request, tmp_path_factory):
    """(kind, HF model, litmodel model converted from the 5.x config.json, tmp dir)."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    hf = make_hf_model(kind)
    hf.save_pretrained(tmp / "hf")
    to_v4_dialect(tmp / "hf", tmp / "hf_v4")
    convert_hf_checkpoint(tmp / "hf", tmp / "lit")
    return kind, hf, load_model(tmp / "lit"), tmp


@torch.no_grad()
def test_logits_match_transformers_in_both_dialects(family):
    kind, hf, lit, tmp = family
    convert_hf_checkpoint(tmp / "hf_v4", tmp / "lit_v4")
    assert load_config(tmp / "lit_v4") == load_config(tmp / "lit"), kind
    lit_v4 = load_model(tmp / "lit_v4")
    idx = torch.randint(0, VOCAB, (2, SEQ))
    ref = hf(idx).logits
    for model in (lit, lit_v4):
        assert (model(idx) - ref).abs().max().item() <= ATOL, kind


def test_hf_lit_hf_round_trip_is_bit_identical(family):
    kind, hf, _, tmp = family
    convert_lit_checkpoint(tmp / "lit", tmp / "back")
    src, back = load_file(tmp / "hf" / "model.safetensors"), load_file(tmp / "back" / "model.safetensors")
    if hf.config.tie_word_embeddings:
        src.pop("lm_head.weight", None)
        back.pop("lm_head.weight", None)
    assert sorted(src) == sorted(back), kind
    for k in src:
        assert src[k].dtype == back[k].dtype and torch.equal(src[k], back[k]), k
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp / "back", attn_implementation="eager").eval()
    idx = torch.randint(0, VOCAB, (1, SEQ))
    with torch.no_grad():
        assert torch.equal(reloaded(idx).logits, hf(idx).logits), kind


@torch.no_grad()
def test_kv_cache_past_the_sliding_window(family):
    kind, hf, lit, _ = family
    if kind == "phi4-longrope":
        pytest.skip("LongRoPE changes every position's rotation once the sequence passes the original context")
    idx = torch.randint(0, VOCAB, (2, SEQ))
    lit.set_kv_cache(2, SEQ + 3)
    try:
        outs, t = [], 0
        for chunk in (5, 3) + (1,) * (SEQ - 8) + (0,):
            if chunk:
                outs.append(lit(idx[:, t: t + chunk], torch.arange(t, t + chunk)))
            t += chunk
    finally:
        lit.clear_kv_cache()
    assert (torch.cat(outs, dim=1) - hf(idx).logits).abs().max().item() <= ATOL, kind


@torch.no_grad()
def test_greedy_generation_matches_transformers_generate(family):
    kind, hf, lit, _ = family
    prompt = torch.randint(3, VOCAB, (1, 6))
    n_new = 10  # 16 tokens: past the windows and LongRoPE's original context
    ref = hf.generate(prompt, max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 6:]
    for cache in (True, False):
        out = torch.stack(list(generate_tokens(lit, prompt, n_new, temperature=0.0, use_kv_cache=cache)))[:, 0]
        assert out.tolist() == ref.tolist(), (kind, cache)


@torch.no_grad()
def test_fast_decode_path_matches_transformers(family):
    """The default generation path (litmodel.fast_decode's module swap) keeps every family's options."""
    kind, hf, lit, _ = family
    if kind == "phi4-longrope":
        pytest.skip("LongRoPE changes every position's rotation once the sequence passes the original context")
    fast = prepare_fast_decode(copy.deepcopy(lit))
    idx = torch.randint(0, VOCAB, (2, SEQ))
    fast.set_kv_cache(2, SEQ + 3)
    outs = [fast(idx[:, :5], torch.arange(5))]
    outs += [fast(idx[:, t: t + 1], torch.tensor([t])) for t in range(5, SEQ)]  # one token per step: the fast path
    assert (torch.cat(outs, dim=1) - hf(idx).logits).abs().max().item() <= ATOL, kind
    fast.clear_kv_cache()
    prompt = torch.randint(3, VOCAB, (1, 6))
    ref = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 6:]
    out = torch.stack(list(generate_tokens(fast, prompt, 10, temperature=0.0)))[:, 0]
    assert out.tolist() == ref.tolist(), kind


def test_lora_finetune_step(family):
    kind, _, _, tmp = family
    model = load_model(tmp / "lit").train()
    idx = torch.randint(0, VOCAB, (2, 12))
    before = model(idx).detach()
    apply_lora(model, targets="query,value,mlp", r=4, alpha=8)
    mark_only_lora_as_trainable(model)
    names = list(lora_modules(model))
    assert any(".attn.qkv" in n for n in names) and any(".mlp.fc" in n for n in names), names
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model(idx).detach()
    assert not torch.allclose(after, before)
    save_lora(tmp / f"lora-{kind}", model, LoRAConfig(r=4, alpha=8, targets=("query", "value", "mlp")))
    reloaded = load_lora(load_model(tmp / "lit").train(), tmp / f"lora-{kind}")
    assert torch.equal(reloaded(idx), after)  # adapters (per-expert ones too) saved and loaded exactly
    merge_lora(model)
    assert (model(idx).detach() - after).abs().max().item() < 1e-4, kind


# ----------------------------------------------------------------------------- mixture of experts
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_router_aux_loss_matches_transformers(kind, tmp_path):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    hf = make_hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    convert_hf_checkpoint(tmp_path / "hf", tmp_path / "lit")
    lit = load_model(tmp_path / "lit").train()
    idx = torch.randint(0, VOCAB, (2, 16))
    out = hf(idx, output_router_logits=True)
    ref = load_balancing_loss_func(out.router_logits, 4, 2)
    lit(idx)
    aux = router_aux_loss(lit)
    assert abs(aux.item() - ref.item()) < 1e-5
    aux.backward()  # differentiable through the router
    assert lit.blocks[0].mlp.router.weight.grad.abs().sum() > 0
    lit.eval()
    lit(idx)
    assert router_aux_loss(lit) is None  # not collected outside training


def test_grouped_matmul_equals_the_per_expert_loop():
    """`torch._grouped_mm` (aligned fp32 on CPU) and the per-expert fallback agree, forward and backward."""
    cfg = Config(model_type="qwen3_moe", n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB, n_expert=4,
                 n_expert_per_token=2, moe_intermediate_size=16)
    moe = MoE(cfg)
    x = torch.randn(3, 5, 32, requires_grad=True)
    y = moe(x)
    y.backward(torch.ones_like(y))  # a broadcast gradient, as `.sum()` gives
    grads = [x.grad.clone(), moe.fc.weight.grad.clone()]
    x.grad = moe.fc.weight.grad = None
    import litmodel.layers as layers
    orig, layers._grouped_mm_ok = layers._grouped_mm_ok, lambda *a: False
    try:
        y2 = moe(x)
        y2.backward(torch.ones_like(y2))
    finally:
        layers._grouped_mm_ok = orig
    assert torch.allclose(y, y2, atol=1e-6)
    assert torch.allclose(grads[0], x.grad, atol=1e-6) and torch.allclose(grads[1], moe.fc.weight.grad, atol=1e-6)


# ----------------------------------------------------------------------------- registry and bad input
@pytest.mark.parametrize("name, expected", [("Qwen3-0.6B", 596_049_920), ("Qwen3-30B-A3B", 30_532_122_624),
                                            ("Mixtral-8x7B-v0.1", 46_702_792_704), ("gemma-2-2b", 2_614_341_888),
                                            ("gemma-3-1b-it", 999_885_952), ("Phi-3-mini-4k-instruct", 3_821_079_552),
                                            ("OLMo-2-0425-1B", 1_484_916_736), ("SmolLM3-3B", 3_075_098_624)])
def test_registry_parameter_counts(name, expected):
    with torch.device("meta"):
        model = build_model(Config.from_name(name))
    assert abs(num_parameters(model) - expected) / expected < 1e-3, num_parameters(model)


@pytest.mark.parametrize("edit, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
     "unsupported rope type 'yarn'"),
    ({"model_type": "deepseek_v3"}, "unsupported model_type 'deepseek_v3'"),
])
def test_unsupported_options_fail_with_one_line_and_no_output(edit, message, tmp_path):
    make_hf_model("qwen3").save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(edit)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LitModelError, match=message):
        Config.from_hf_config(cfg)
    if "yarn" not in message:
        return  # the CLI's one-line error path once is enough
    proc = subprocess.run([sys.executable, "scripts/convert_hf_checkpoint.py", "--checkpoint_dir", str(tmp_path / "hf"),
                           "--out_dir", str(tmp_path / "out" / "lit")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "supported" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- FSDP
FSDP_CONFIGS = {
    "moe": dict(model_type="qwen3_moe", n_layer=2, n_head=4, n_query_groups=2, n_embd=32, head_size=16,
                vocab_size=VOCAB, intermediate_size=64, n_expert=4, n_expert_per_token=2, moe_intermediate_size=16, qk_norm="head"),
    "gemma": dict(model_type="gemma3_text", n_layer=2, n_head=4, n_query_groups=2, n_embd=32, head_size=16,
                  vocab_size=VOCAB, intermediate_size=64, tie_embeddings=True, qk_norm="head", sliding_window=4,
                  layer_types=["sliding_attention", "full_attention"], rope_local_base=10000.0,
                  query_pre_attn_scalar=16),
}
AUX_COEF = 0.1


def fsdp_loss(model, batch):
    logits = model(batch[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    aux = router_aux_loss(model)
    return loss if aux is None else loss + AUX_COEF * aux


def fsdp_family_worker(fabric, states: dict, batch: torch.Tensor) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    out = {}
    half = batch.size(0) // fabric.world_size
    local = batch[fabric.global_rank * half:(fabric.global_rank + 1) * half]
    for name, kw in FSDP_CONFIGS.items():
        model = build_model(Config(**kw))
        model.load_state_dict(states[name])
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model, opt = fabric.setup(model, opt)
        assert type(model.module.blocks[0]).__name__.startswith("FSDP")  # each block is its own FSDP unit
        loss = fsdp_loss(model, local)
        fabric.backward(loss)
        fabric.step(opt)
        sd = get_model_state_dict(model.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        out[name] = (fabric.all_reduce(loss.detach(), "mean").item(), {k: v.detach().clone() for k, v in sd.items()})
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fsdp_two_processes_moe_and_gemma_step():
    """One SGD step on 2 gloo ranks (FSDP2 per block, the MoE with its router aux loss) equals one
    process stepping on the mean of the two half-batch losses."""
    from litmodel.fabric import Fabric

    torch.manual_seed(0)
    batch = torch.randint(0, VOCAB, (4, 9))
    states, ref = {}, {}
    for name, kw in FSDP_CONFIGS.items():
        model = build_model(Config(**kw))
        model.init_weights()
        states[name] = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = (fsdp_loss(model, batch[:2]) + fsdp_loss(model, batch[2:])) / 2
        loss.backward()
        opt.step()
        ref[name] = (loss.item(), model.state_dict())
    res = Fabric(accelerator="cpu", devices=2, strategy="fsdp").launch(fsdp_family_worker, states, batch)
    for name in FSDP_CONFIGS:
        assert abs(res[name][0] - ref[name][0]) < 1e-5, name
        for k, v in res[name][1].items():
            torch.testing.assert_close(v, ref[name][1][k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name} {k}: {m}")


# ----------------------------------------------------------------------------- chat templates
QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"""
CHAT_FAMILIES = {
    "qwen3": (QWEN3_TEMPLATE, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
              "<|endoftext|>", "<|endoftext|>", dict(model_type="qwen3", qk_norm="head", head_size=16)),
    "gemma": (GEMMA_TEMPLATE, ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
              dict(model_type="gemma3_text", qk_norm="head", head_size=16, tie_embeddings=True, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention"], rope_local_base=10000.0)),
}


@pytest.mark.parametrize("kind", list(CHAT_FAMILIES))
def test_chat_sends_apply_chat_template_tokens(kind, tmp_path, monkeypatch, capsys):
    """generate/chat.py's prompts are exactly transformers' `apply_chat_template` ids for a Qwen3-style
    template (thinking blocks stripped from the history) and a Gemma-style one (BOS in the template,
    system folded into the first user turn, 'model' role)."""
    import importlib.util
    import io

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from litmodel.checkpoint import save_checkpoint_dir
    from litmodel.tokenizer import Tokenizer
    from litmodel.cli import cli_main

    template, specials, bos, eos, model_kw = CHAT_FAMILIES[kind]
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["Hello world! How are you today? Let me think about it. The answer is four."] * 20, trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos)
    hf_tok.chat_template = template
    hf_tok.save_pretrained(tmp_path / "tok")
    cfg = Config(name=f"tiny-{kind}", block_size=128, vocab_size=tk.get_vocab_size(), n_layer=2, n_head=4,
                 n_query_groups=2, n_embd=32, intermediate_size=64, **model_kw)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    ckpt = save_checkpoint_dir(tmp_path / "ckpt", model, cfg, tokenizer_dir=tmp_path / "tok")

    def hf_ids(messages, **kw):
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kw)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)

    # a history with a thinking block, rendered by litmodel's tokenizer, with and without enable_thinking
    lit_tok = Tokenizer(ckpt)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How are you?"},
               {"role": "assistant", "content": "<think>\nLet me think.\n</think>\n\nHello world!"},
               {"role": "user", "content": "The answer?"}]
    for kw in ({}, {"enable_thinking": False}):
        assert lit_tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True, **kw) == \
            hf_ids(history, **kw), kw

    # the chat CLI: two turns, each prompt dumped as sent
    dump = tmp_path / "dump.jsonl"
    monkeypatch.setenv("LITMODEL_DUMP_PROMPT_IDS", str(dump))
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello world!\nHow are you today?\n"))
    spec = importlib.util.spec_from_file_location("_chat_script", ROOT / "generate" / "chat.py")
    chat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chat)
    try:
        cli_main(chat.setup)(["--checkpoint_dir", str(ckpt), "--system", "Be brief.", "--max_new_tokens", "6",
                              "--temperature", "0", "--precision", "32-true"])
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    turns = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(turns) == 2 and turns[1]["messages"][2]["role"] == "assistant"
    for turn in turns:
        assert turn["ids"] == hf_ids(turn["messages"])
    if kind == "gemma":
        assert turns[0]["ids"].count(tk.token_to_id("<bos>")) == 1 and turns[0]["ids"][0] == tk.token_to_id("<bos>")


def test_router_aux_loss_in_the_training_loop(tmp_path):
    """`--train.router_aux_loss_coef` through `training.fit`: the step equals plain PyTorch on
    mean next-token loss + coef * aux loss (transformers' formula), and `router_aux` is logged."""
    import csv

    import torch.nn.functional as F

    from litmodel.fabric import Fabric
    from litmodel.loggers import CSVLogger
    from litmodel.losses import language_model_loss
    from litmodel.training import fit
    from litmodel.training_args import EvalArgs, TrainArgs, build_optimizer

    class OneBatch:
        def __init__(self, batch):
            self.batch = batch

        def __iter__(self):
            yield self.batch

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    coef = 0.5
    cfg = Config(**FSDP_CONFIGS["moe"])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, VOCAB, (1, 13))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true", loggers=[CSVLogger(tmp_path, "logs")])
    fabric.launch()
    train = TrainArgs(global_batch_size=1, micro_batch_size=1, lr=0.01, min_lr=0.01, warmup_steps=0,
                      weight_decay=0.0, max_norm=None, save_interval=None, router_aux_loss_coef=coef)
    model = fabric.setup(model)
    optimizer = fabric.setup_optimizers(build_optimizer(model, train))
    fit(fabric, model, optimizer, OneBatch(batch), train=train, eval=EvalArgs(interval=10, final_validation=False),
        out_dir=tmp_path, max_steps=1, loss_fn=language_model_loss(train.router_aux_loss_coef))

    ref = build_model(cfg)
    ref.load_state_dict(initial)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01, betas=(0.9, 0.95), weight_decay=0.0)
    ce = F.cross_entropy(ref(batch["input_ids"])[0], batch["labels"][0])
    aux = router_aux_loss(ref)
    (ce + coef * aux).backward()
    opt.step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.module.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    with open(tmp_path / "logs" / "metrics.csv") as f:
        row = next(r for r in csv.DictReader(f) if r.get("router_aux"))
    assert float(row["router_aux"]) == pytest.approx(aux.item(), rel=1e-5)
    assert float(row["loss"]) == pytest.approx((ce + coef * aux).item(), rel=1e-5)


@torch.no_grad()
def test_multimodal_gemma3_checkpoint_converts_its_language_model(tmp_path):
    """Gemma 3 4b/12b/27b on the Hub are Gemma3ForConditionalGeneration: config.json nests the text model in
    `text_config` (defaults left out) and the weights sit under `language_model.model.` beside a vision
    tower. The conversion takes the language model and leaves the vision tower out."""
    from safetensors.torch import save_file

    hf = make_hf_model("gemma3")
    hf.save_pretrained(tmp_path / "text")
    text_cfg = json.loads((tmp_path / "text" / "config.json").read_text())
    text_cfg.pop("rms_norm_eps")  # a default, which Hub configs leave out
    (tmp_path / "mm").mkdir()
    (tmp_path / "mm" / "config.json").write_text(json.dumps(
        {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text_cfg,
         "vision_config": {"model_type": "siglip_vision_model"}}))
    sd = {("language_model." + k if k.startswith("model.") else k): v
          for k, v in load_file(tmp_path / "text" / "model.safetensors").items()}
    sd["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(4, 3, 2, 2)
    sd["multi_modal_projector.mm_input_projection_weight"] = torch.zeros(4, 64)
    save_file(sd, tmp_path / "mm" / "model.safetensors")
    convert_hf_checkpoint(tmp_path / "mm", tmp_path / "lit")
    lit = load_model(tmp_path / "lit")
    assert lit.config.model_type == "gemma3_text" and lit.config.norm_eps == 1e-6
    idx = torch.randint(0, VOCAB, (1, SEQ))
    assert (lit(idx) - hf(idx).logits).abs().max().item() <= ATOL
