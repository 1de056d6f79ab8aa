"""Parameter-name and layout maps between Hugging Face checkpoints and litmodel (per model family).

Each direction is a *plan*: for every output tensor, the input tensor names it is built from and
a function that builds it. ``litmodel.hf`` executes a plan one output tensor at a time, so a
checkpoint is streamed, never held twice in memory; ``litmodel.peft_io`` uses the same maps for
adapters.
"""

from __future__ import annotations

from typing import Callable

import torch

from litmodel.config import Config

Plan = dict[str, tuple[list[str], Callable[..., torch.Tensor]]]


def unchanged(t: torch.Tensor) -> torch.Tensor:
    return t


def transpose_conv1d(t: torch.Tensor) -> torch.Tensor:  # GPT-2's Conv1D stores (in, out)
    return t.t().contiguous()


def cat_rows(*ts: torch.Tensor) -> torch.Tensor:
    return torch.cat(ts, dim=0)


class StackParts:
    """Concatenate the parts along dim 0 and view the result as ``groups`` stacked matrices: per-expert
    HF tensors -> litmodel's (n_expert, rows, cols). The output bytes are the parts' bytes in order, so
    the streaming writer copies them as they are (``concat_bytes``)."""

    concat_bytes = True

    def __init__(self, groups: int) -> None:
        self.groups = groups

    def __call__(self, *ts: torch.Tensor) -> torch.Tensor:
        return torch.cat(ts, dim=0).view(self.groups, -1, *ts[0].shape[1:])

    def out_shape(self, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        return (self.groups, sum(s[0] for s in shapes) // self.groups, *shapes[0][1:])


def _neox_to_lit(config: Config) -> Callable[[torch.Tensor], torch.Tensor]:
    """GPT-NeoX interleaves q, k, v per head: rows (head, qkv, hs) -> litmodel's (qkv, head, hs)."""
    h, hs = config.n_head, config.head_size

    def fn(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(h, 3, hs, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()

    return fn


def _lit_to_neox(config: Config) -> Callable[[torch.Tensor], torch.Tensor]:
    h, hs = config.n_head, config.head_size

    def fn(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(3, h, hs, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()

    return fn


def _layer_map(config: Config) -> tuple[dict[str, str], dict[str, tuple[str, ...]], str]:
    """(one-to-one names, fused litmodel names -> HF parts, HF layer prefix) for one block."""
    if config.model_type == "gpt2":
        single = {"ln_1.weight": "norm_1.weight", "ln_1.bias": "norm_1.bias", "ln_2.weight": "norm_2.weight",
                  "ln_2.bias": "norm_2.bias", "attn.c_attn.weight": "attn.qkv.weight",
                  "attn.c_attn.bias": "attn.qkv.bias", "attn.c_proj.weight": "attn.proj.weight",
                  "attn.c_proj.bias": "attn.proj.bias", "mlp.c_fc.weight": "mlp.fc.weight",
                  "mlp.c_fc.bias": "mlp.fc.bias", "mlp.c_proj.weight": "mlp.proj.weight",
                  "mlp.c_proj.bias": "mlp.proj.bias"}
        return single, {}, "transformer.h.{}."
    if config.model_type == "gpt_neox":
        single = {"input_layernorm.weight": "norm_1.weight", "input_layernorm.bias": "norm_1.bias",
                  "post_attention_layernorm.weight": "norm_2.weight", "post_attention_layernorm.bias": "norm_2.bias",
                  "attention.query_key_value.weight": "attn.qkv.weight",
                  "attention.query_key_value.bias": "attn.qkv.bias", "attention.dense.weight": "attn.proj.weight",
                  "attention.dense.bias": "attn.proj.bias", "mlp.dense_h_to_4h.weight": "mlp.fc.weight",
                  "mlp.dense_h_to_4h.bias": "mlp.fc.bias", "mlp.dense_4h_to_h.weight": "mlp.proj.weight",
                  "mlp.dense_4h_to_h.bias": "mlp.proj.bias"}
        return single, {}, "gpt_neox.layers.{}."
    single = {"input_layernorm.weight": "norm_1.weight", "post_attention_layernorm.weight": "norm_2.weight",
              "self_attn.o_proj.weight": "attn.proj.weight", "mlp.down_proj.weight": "mlp.proj.weight"}
    fused = {"attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
             "mlp.fc.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}
    if config.attn_bias or config.bias:
        fused["attn.qkv.bias"] = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
    if config.bias:
        single.update({"self_attn.o_proj.bias": "attn.proj.bias", "mlp.down_proj.bias": "mlp.proj.bias"})
        fused["mlp.fc.bias"] = ("mlp.gate_proj.bias", "mlp.up_proj.bias")
    if config.qk_norm:
        single.update({"self_attn.q_norm.weight": "attn.q_norm.weight",
                       "self_attn.k_norm.weight": "attn.k_norm.weight"})
    if config.model_type == "phi3":  # stored fused, in litmodel's own row order
        single.update({"self_attn.qkv_proj.weight": "attn.qkv.weight", "mlp.gate_up_proj.weight": "mlp.fc.weight"})
        del fused["attn.qkv.weight"], fused["mlp.fc.weight"]
    if config.post_norm:  # OLMo 2: the only two norms come after attention and MLP
        del single["input_layernorm.weight"]
        single.update({"post_attention_layernorm.weight": "norm_1.weight",
                       "post_feedforward_layernorm.weight": "norm_2.weight"})
    if config.family == "gemma":
        single.update({"post_attention_layernorm.weight": "post_attn_norm.weight",
                       "pre_feedforward_layernorm.weight": "norm_2.weight",
                       "post_feedforward_layernorm.weight": "post_mlp_norm.weight"})
    if config.n_expert:  # experts are stacked by StackParts in the plans below
        del single["mlp.down_proj.weight"], fused["mlp.fc.weight"]
        single["block_sparse_moe.gate.weight" if config.model_type == "mixtral" else "mlp.gate.weight"] = \
            "mlp.router.weight"
    return single, fused, "model.layers.{}."


def _expert_names(config: Config) -> tuple[str, str, str]:
    """HF name patterns of expert {e}'s gate, up and down projections."""
    if config.model_type == "mixtral":
        return tuple(f"block_sparse_moe.experts.{{}}.{w}.weight" for w in ("w1", "w3", "w2"))
    return tuple(f"mlp.experts.{{}}.{w}_proj.weight" for w in ("gate", "up", "down"))


def _top_map(config: Config) -> dict[str, str]:
    """HF name -> litmodel name for the tensors outside the blocks."""
    if config.model_type == "gpt2":
        top = {"transformer.wte.weight": "wte.weight", "transformer.wpe.weight": "wpe.weight",
               "transformer.ln_f.weight": "norm_f.weight", "transformer.ln_f.bias": "norm_f.bias"}
    elif config.model_type == "gpt_neox":
        top = {"gpt_neox.embed_in.weight": "wte.weight", "gpt_neox.final_layer_norm.weight": "norm_f.weight",
               "gpt_neox.final_layer_norm.bias": "norm_f.bias", "embed_out.weight": "lm_head.weight"}
    else:
        top = {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "norm_f.weight",
               "lm_head.weight": "lm_head.weight"}
    if config.model_type == "gpt2" and not config.tie_embeddings:
        top["lm_head.weight"] = "lm_head.weight"
    if config.tie_embeddings:
        top = {k: v for k, v in top.items() if v != "lm_head.weight"}
    return top


def _one_to_one_fn(config: Config, hf: str, to_lit: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """How the tensor with HF name ``hf`` (in a block) converts to its one litmodel tensor, or back:
    GPT-2's Conv1D weights are transposed, GPT-NeoX's qkv rows regrouped, the rest kept."""
    if config.model_type == "gpt2" and hf.endswith("weight") and not hf.startswith("ln"):
        return transpose_conv1d
    if config.model_type == "gpt_neox" and "query_key_value" in hf:
        return _neox_to_lit(config) if to_lit else _lit_to_neox(config)
    return unchanged


def lit_to_hf_plan(config: Config) -> Plan:
    """For every HF tensor name: (litmodel names it comes from, function building it)."""
    plan: Plan = {hf: ([lit], unchanged) for hf, lit in _top_map(config).items()}
    single, fused, prefix = _layer_map(config)
    q = config.n_head * config.head_size
    kv = config.n_query_groups * config.head_size
    for i in range(config.n_layer):
        hf_p, lit_p = prefix.format(i), f"blocks.{i}."
        for hf, lit in single.items():
            plan[hf_p + hf] = ([lit_p + lit], _one_to_one_fn(config, hf, to_lit=False))
        for lit, parts in fused.items():
            sizes = (q, kv, kv) if lit.startswith("attn") else (config.intermediate_size,) * 2
            for j, hf in enumerate(parts):
                start = sum(sizes[:j])
                plan[hf_p + hf] = ([lit_p + lit], lambda t, s=start, n=sizes[j]: t[s : s + n].contiguous())
        if config.n_expert:  # gate and up of every expert first, so consecutive steps share one read of fc
            gate, up, down = _expert_names(config)
            n = config.moe_intermediate_size
            for e in range(config.n_expert):
                plan[hf_p + gate.format(e)] = ([lit_p + "mlp.fc.weight"], lambda t, e=e: t[e, :n].contiguous())
                plan[hf_p + up.format(e)] = ([lit_p + "mlp.fc.weight"], lambda t, e=e: t[e, n:].contiguous())
            for e in range(config.n_expert):
                plan[hf_p + down.format(e)] = ([lit_p + "mlp.proj.weight"], lambda t, e=e: t[e].contiguous())
    return plan


def hf_to_lit_plan(config: Config) -> Plan:
    """For every litmodel tensor name: (HF names it is built from, function building it)."""
    plan: Plan = {lit: ([hf], unchanged) for hf, lit in _top_map(config).items()}
    single, fused, prefix = _layer_map(config)
    for i in range(config.n_layer):
        hf_p, lit_p = prefix.format(i), f"blocks.{i}."
        for hf, lit in single.items():
            plan[lit_p + lit] = ([hf_p + hf], _one_to_one_fn(config, hf, to_lit=True))
        for lit, parts in fused.items():
            plan[lit_p + lit] = ([hf_p + p for p in parts], cat_rows)
        if config.n_expert:
            gate, up, down = _expert_names(config)
            E = config.n_expert
            plan[lit_p + "mlp.fc.weight"] = ([hf_p + w.format(e) for e in range(E) for w in (gate, up)], StackParts(E))
            plan[lit_p + "mlp.proj.weight"] = ([hf_p + down.format(e) for e in range(E)], StackParts(E))
    return plan


def hf_aliases(name: str) -> list[str]:
    """Names an HF tensor may be stored under: GPT-2 checkpoints often lack the `transformer.`
    prefix, and transformers 5 saves GPT-NeoX's `embed_out` as `lm_head`."""
    if name.startswith("transformer."):
        return [name, name[len("transformer."):]]
    if name == "embed_out.weight":
        return [name, "lm_head.weight"]
    if name.startswith("model."):  # multimodal Gemma 3: the language model, as 4.x and 5.x save it
        return [name, "language_model." + name, "model.language_model." + name[len("model."):]]
    if name == "lm_head.weight":
        return [name, "language_model.lm_head.weight"]
    return [name]


# The vision tower of multimodal Gemma 3 checkpoints, which a text-only conversion leaves out.
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")

# Buffers some HF checkpoints carry that are not weights (recomputed by the model).
IGNORED_HF_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", ".attention.bias",
                       ".attention.masked_bias")
