"""Model configuration: one dataclass for every family (YAML in and out, ``from_name`` over the registry
in `litmodel.config_registry`), and its translation to and from Hugging Face ``config.json``."""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from litmodel.config_registry import name_to_config
from litmodel.utils import LitModelError

HF_MODEL_TYPES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "phi3", "olmo2",
                  "smollm3", "gemma2", "gemma3_text")
GEMMA_TYPES = ("gemma2", "gemma3_text")
ROPE_TYPES = ("default", "llama3", "linear", "longrope")


@dataclass
class Config:
    name: str = "custom"
    hf_repo_id: str | None = None
    # gpt2 | gpt_neox -> litmodel.gpt.GPT ; gemma2 | gemma3_text -> litmodel.gemma.Gemma ;
    # the rest (llama, mistral, qwen2, qwen3, qwen3_moe, mixtral, phi3, olmo2, smollm3) -> litmodel.llama.Llama
    model_type: str = "llama"
    block_size: int = 2048  # longest sequence the model supports
    vocab_size: int = 32000  # the tokenizer's vocabulary
    padded_vocab_size: int | None = None  # rows of the embedding (>= vocab_size); None: vocab_size
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_query_groups: int | None = None  # key/value heads (GQA); None: n_head
    head_size: int | None = None  # None: n_embd // n_head
    intermediate_size: int | None = None  # None: 4 * n_embd
    norm_eps: float = 1e-5
    bias: bool = False  # bias on every linear layer (GPT-2, GPT-NeoX)
    attn_bias: bool = False  # bias on the q, k, v projections only (Qwen2)
    tie_embeddings: bool = False
    # GPT family
    learned_pos_emb: bool = False  # GPT-2's absolute position embedding
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    gelu_approximate: str = "none"  # "tanh" for GPT-2
    # rotary position embedding
    rotary_percentage: float = 1.0  # share of each head that is rotated (GPT-NeoX: 0.25)
    rope_base: float = 10000.0
    # rope_type "llama3" (the default when absent: factor, low_freq_factor, high_freq_factor, original_max_seq_len),
    # "linear" (factor) or "longrope" (short_factor, long_factor, original_max_seq_len, attention_factor)
    rope_scaling: dict | None = None
    sliding_window: int | None = None  # Mistral v0.1: a token sees at most this many keys
    # per layer "sliding_attention" | "full_attention" (Gemma); None: every layer uses `sliding_window`
    layer_types: list[str] | None = None
    # newer Llama-family twists
    qk_norm: str | None = None  # "head": RMSNorm per head on q and k (Qwen3, Gemma 3); "full": on all of q, k (OLMo 2)
    post_norm: bool = False  # OLMo 2: x + norm(attn(x)) and x + norm(mlp(x)) instead of pre-norms
    nope_layers: list[int] | None = None  # SmolLM3: the layers without rotary embedding
    # mixture of experts (Mixtral, Qwen3-MoE); n_expert 0 means a dense MLP
    n_expert: int = 0
    n_expert_per_token: int = 0
    moe_intermediate_size: int | None = None  # each expert's hidden size; None: intermediate_size
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    # Gemma 2 / 3
    rope_local_base: float | None = None  # Gemma 3: RoPE base of the sliding-window layers (never scaled)
    query_pre_attn_scalar: float | None = None  # attention scores scaled by 1/sqrt(this); None: head_size
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)

    def __post_init__(self) -> None:
        if self.model_type not in HF_MODEL_TYPES:
            raise LitModelError(f"unsupported model_type {self.model_type!r}; supported: {', '.join(HF_MODEL_TYPES)}")
        if self.padded_vocab_size is None:
            self.padded_vocab_size = self.vocab_size
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.head_size is None:
            self.head_size = self.n_embd // self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if self.moe_intermediate_size is None and self.n_expert:
            self.moe_intermediate_size = self.intermediate_size
        if self.n_head % self.n_query_groups:
            raise LitModelError(f"n_head ({self.n_head}) must be a multiple of n_query_groups ({self.n_query_groups})")
        if self.n_expert and not 0 < self.n_expert_per_token <= self.n_expert:
            raise LitModelError(f"n_expert_per_token ({self.n_expert_per_token}) must be in 1..n_expert "
                                f"({self.n_expert})")
        if self.qk_norm not in (None, "head", "full"):
            raise LitModelError(f"unsupported qk_norm {self.qk_norm!r}; supported: head, full, or null")
        if self.layer_types is not None and len(self.layer_types) != self.n_layer:
            raise LitModelError(f"layer_types has {len(self.layer_types)} entries for {self.n_layer} layers")
        rope_type = (self.rope_scaling or {}).get("rope_type", "llama3")
        if self.rope_scaling and rope_type not in ROPE_TYPES[1:]:
            raise LitModelError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")

    @property
    def family(self) -> str:
        if self.model_type in ("gpt2", "gpt_neox"):
            return "gpt"
        return "gemma" if self.model_type in GEMMA_TYPES else "llama"

    def layer_window(self, i: int) -> int | None:
        """The sliding window of layer ``i`` (None: it attends to every earlier token)."""
        if self.layer_types is not None and self.layer_types[i] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def rope_n_elem(self) -> int:
        return int(self.rotary_percentage * self.head_size) if not self.learned_pos_emb else 0

    # ---- registry ------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        key = name.split("/")[-1] if name not in name_to_config else name
        if key not in name_to_config:
            matches = difflib.get_close_matches(key, list(name_to_config), n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(matches)}?" if matches else ""
            raise LitModelError(f"unknown model name {name!r}{hint} (see `python scripts/download.py --repo_id list`)")
        return cls(**{**name_to_config[key], **overrides})

    # ---- YAML ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "Config":
        data = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise LitModelError(f"{path}: unknown config keys {sorted(unknown)}; valid keys: {sorted(known)}")
        return cls(**{**data, **overrides})

    # ---- Hugging Face config.json --------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict | str | Path, name: str | None = None) -> "Config":
        """Derive a config from a Hub ``config.json`` (transformers 4.x and 5.x dialects)."""
        if not isinstance(hf, dict):
            hf = json.loads(Path(hf).read_text())
        hf = hf_text_config(hf)
        model_type = hf.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise LitModelError(
                f"unsupported model_type {model_type!r} in config.json; supported: {', '.join(HF_MODEL_TYPES)}"
            )
        # transformers 5 groups rope settings in `rope_parameters`; 4.x writes them at the top level
        rope_params = hf.get("rope_parameters") or {}
        if model_type == "gemma3_text" and "full_attention" in rope_params:  # 5.x: one block per layer type
            local = rope_params.get("sliding_attention") or {}
            rope = dict(rope_params["full_attention"])
            rope_local_base = local.get("rope_theta", 10000.0)
            if local.get("rope_type", "default") != "default":
                raise LitModelError(f"unsupported rope type {local['rope_type']!r} on Gemma 3's sliding layers; "
                                    "supported: default")
        else:
            rope = dict(rope_params or hf.get("rope_scaling") or {})
            rope_local_base = hf.get("rope_local_base_freq", 10000.0)
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
        rope_scaling = _rope_scaling_from_hf(rope, hf, model_type)
        name = name or hf.get("_name_or_path") or "custom"
        common = dict(name=str(name).split("/")[-1], hf_repo_id=name if "/" in str(name) else None,
                      model_type=model_type, vocab_size=hf["vocab_size"])
        if model_type == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            return cls(**common, block_size=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                       n_embd=hf["n_embd"], intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5), bias=True,
                       tie_embeddings=hf.get("tie_word_embeddings", True), learned_pos_emb=True,
                       gelu_approximate="tanh" if act in ("gelu_new", "gelu_pytorch_tanh") else "none",
                       rotary_percentage=0.0)
        if model_type == "gpt_neox":
            return cls(**common, block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
                       n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                       intermediate_size=hf["intermediate_size"], norm_eps=hf.get("layer_norm_eps", 1e-5),
                       bias=hf.get("attention_bias", True), tie_embeddings=hf.get("tie_word_embeddings", False),
                       parallel_residual=hf.get("use_parallel_residual", True),
                       gelu_approximate="tanh" if hf.get("hidden_act") in ("gelu_new", "gelu_pytorch_tanh") else "none",
                       rotary_percentage=rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)),
                       rope_base=rope_theta)
        n_layer = hf["num_hidden_layers"]
        sliding_window = hf.get("sliding_window")
        kw: dict[str, Any] = {}
        if model_type in ("qwen2", "qwen3", "qwen3_moe", "smollm3"):
            if not hf.get("use_sliding_window", False):
                sliding_window = None
            elif sliding_window is not None:  # 4.x: the layers from max_window_layers on (SmolLM3: the NoPE ones) slide
                flags = hf.get("no_rope_layers") or []
                kw["layer_types"] = hf.get("layer_types") or [
                    "sliding_attention" if (i >= hf.get("max_window_layers", 28) if model_type != "smollm3" else
                                            (i < len(flags) and not flags[i])) else "full_attention"
                    for i in range(n_layer)]
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
        if act != ("gelu_pytorch_tanh" if model_type in GEMMA_TYPES else "silu"):
            raise LitModelError(f"unsupported activation {act!r} for {model_type}; supported: "
                                f"{'gelu_pytorch_tanh' if model_type in GEMMA_TYPES else 'silu'}")
        if model_type in ("qwen3", "qwen3_moe", "gemma3_text"):
            kw["qk_norm"] = "head"
        if model_type == "olmo2":
            kw.update(qk_norm="full", post_norm=True)
        if model_type == "smollm3":
            flags = hf.get("no_rope_layers") or [int((i + 1) % hf.get("no_rope_layer_interval", 4) != 0)
                                                 for i in range(n_layer)]
            kw["nope_layers"] = [i for i, use_rope in enumerate(flags) if not use_rope] or None
        if model_type in ("mixtral", "qwen3_moe"):
            if model_type == "qwen3_moe" and (hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers")):
                raise LitModelError("unsupported Qwen3-MoE layout (decoder_sparse_step != 1 or mlp_only_layers); "
                                    "supported: every layer a mixture of experts")
            kw.update(n_expert=hf.get("num_local_experts") or hf["num_experts"],
                      n_expert_per_token=hf["num_experts_per_tok"],
                      moe_intermediate_size=hf.get("moe_intermediate_size") or hf["intermediate_size"],
                      norm_topk_prob=hf.get("norm_topk_prob", True) if model_type == "qwen3_moe" else True)
        if model_type == "phi3":
            kw["rotary_percentage"] = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if model_type in GEMMA_TYPES:
            every = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or (
                2 if model_type == "gemma2" else 6)
            kw.update(layer_types=hf.get("layer_types") or [
                "sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layer)],
                query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
                attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"))
            if model_type == "gemma3_text":
                kw["rope_local_base"] = rope_local_base
        return cls(**common, block_size=hf["max_position_embeddings"], n_layer=n_layer,
                   n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                   n_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                   head_size=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                   intermediate_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                   attn_bias=model_type == "qwen2" or hf.get("attention_bias", False),
                   tie_embeddings=hf.get("tie_word_embeddings", model_type in GEMMA_TYPES), rope_base=rope_theta,
                   rope_scaling=rope_scaling, sliding_window=sliding_window, **kw)

    def to_hf_config(self) -> dict:
        """The ``config.json`` transformers needs to build the same model (4.x-style top-level rope keys)."""
        common = {"model_type": self.model_type, "vocab_size": self.padded_vocab_size,
                  "tie_word_embeddings": self.tie_embeddings, "torch_dtype": "float32"}
        if self.model_type == "gpt2":
            return {**common, "architectures": ["GPT2LMHeadModel"], "n_positions": self.block_size,
                    "n_ctx": self.block_size, "n_layer": self.n_layer, "n_head": self.n_head, "n_embd": self.n_embd,
                    "n_inner": self.intermediate_size, "layer_norm_epsilon": self.norm_eps,
                    "activation_function": "gelu_new" if self.gelu_approximate == "tanh" else "gelu",
                    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        if self.model_type == "gpt_neox":
            return {**common, "architectures": ["GPTNeoXForCausalLM"],
                    "max_position_embeddings": self.block_size, "num_hidden_layers": self.n_layer,
                    "num_attention_heads": self.n_head, "hidden_size": self.n_embd,
                    "intermediate_size": self.intermediate_size, "layer_norm_eps": self.norm_eps,
                    "use_parallel_residual": self.parallel_residual, "attention_bias": self.bias,
                    "hidden_act": "gelu_new" if self.gelu_approximate == "tanh" else "gelu",
                    "rotary_pct": self.rotary_percentage, "rotary_emb_base": self.rope_base,
                    "rope_theta": self.rope_base, "partial_rotary_factor": self.rotary_percentage,
                    "attention_dropout": 0.0, "hidden_dropout": 0.0}
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
                "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM", "smollm3": "SmolLM3ForCausalLM",
                "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
        hf = {**common, "architectures": [arch[self.model_type]], "max_position_embeddings": self.block_size,
              "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
              "num_key_value_heads": self.n_query_groups, "head_dim": self.head_size, "hidden_size": self.n_embd,
              "intermediate_size": self.intermediate_size, "rms_norm_eps": self.norm_eps, "hidden_act": "silu",
              "rope_theta": self.rope_base, "attention_dropout": 0.0}
        if self.rope_scaling:
            s = dict(self.rope_scaling)
            rope_type = s.pop("rope_type", "llama3")
            if "original_max_seq_len" in s:
                s["original_max_position_embeddings"] = s.pop("original_max_seq_len")
            hf["rope_scaling"] = {"rope_type": rope_type, **s}
            if rope_type == "longrope":
                hf["original_max_position_embeddings"] = s["original_max_position_embeddings"]
        if self.model_type == "llama":
            hf.update(attention_bias=self.attn_bias, mlp_bias=False)
        elif self.model_type in ("mistral", "mixtral", "phi3"):
            hf["sliding_window"] = self.sliding_window
        elif self.model_type in ("qwen2", "qwen3", "qwen3_moe", "smollm3"):
            sliding = [self.layer_window(i) is not None for i in range(self.n_layer)]
            hf.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                      max_window_layers=sliding.index(True) if any(sliding) else self.n_layer,
                      layer_types=["sliding_attention" if s else "full_attention" for s in sliding])
        if self.model_type in ("qwen3", "qwen3_moe", "olmo2", "smollm3"):
            hf["attention_bias"] = self.attn_bias
        if self.model_type in ("phi3", "olmo2", "smollm3"):
            hf["pad_token_id"] = None  # their defaults (32000, 1, 128004) may lie outside a small vocabulary
        if self.n_expert:
            hf.update(num_local_experts=self.n_expert, num_experts=self.n_expert,
                      num_experts_per_tok=self.n_expert_per_token, router_aux_loss_coef=0.001,
                      output_router_logits=False)
            if self.model_type == "qwen3_moe":
                hf.update(moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                          decoder_sparse_step=1, mlp_only_layers=[])
        if self.model_type == "phi3":
            hf["partial_rotary_factor"] = self.rotary_percentage
            hf.setdefault("original_max_position_embeddings", self.block_size)
        if self.model_type == "smollm3":
            nope = set(self.nope_layers or [])
            hf["no_rope_layers"] = [int(i not in nope) for i in range(self.n_layer)]
        if self.family == "gemma":
            hf.update(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh",
                      sliding_window=self.sliding_window, layer_types=self.layer_types,
                      query_pre_attn_scalar=self.query_pre_attn_scalar, attn_logit_softcapping=self.attn_softcap,
                      final_logit_softcapping=self.final_softcap, attention_bias=self.attn_bias)
            if self.model_type == "gemma3_text":
                hf["rope_local_base_freq"] = self.rope_local_base
                full = [i for i, t in enumerate(self.layer_types or []) if t == "full_attention"]
                if full and all((i + 1) % (full[0] + 1) == 0 for i in full):
                    hf["sliding_window_pattern"] = full[0] + 1
        if self.model_type in ("mistral", "phi3") and self.attn_bias:
            raise LitModelError(f"a {self.model_type} config cannot express a qkv bias; use model_type qwen2 for that")
        return hf

    def replace(self, **changes: Any) -> "Config":
        return replace(self, **changes)


# transformers' Gemma3TextConfig defaults: multimodal Gemma 3 checkpoints (4b, 12b, 27b) leave these out of text_config
_GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
                             rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096, rope_theta=1000000.0,
                             rope_local_base_freq=10000.0, hidden_activation="gelu_pytorch_tanh")


def hf_text_config(hf: dict) -> dict:
    """The language model's part of a multimodal Gemma 3 ``config.json`` (its ``text_config``, with the
    defaults it leaves out); any other config as it is. litmodel converts the text model only."""
    if hf.get("model_type") != "gemma3" or not isinstance(hf.get("text_config"), dict):
        return hf
    text = {**_GEMMA3_TEXT_DEFAULTS, **hf["text_config"], "model_type": "gemma3_text"}
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", True))
    if "_name_or_path" in hf:
        text["_name_or_path"] = hf["_name_or_path"]
    return text


def _rope_scaling_from_hf(rope: dict, hf: dict, model_type: str) -> dict | None:
    """litmodel's ``rope_scaling`` from an HF rope block (5.x `rope_parameters` or 4.x `rope_scaling`)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_type = "longrope" if rope_type == "su" else rope_type  # early Phi-3 configs call it "su"
    if rope_type == "default":
        return None
    if rope_type == "llama3":
        scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor")}
        scaling["original_max_seq_len"] = rope["original_max_position_embeddings"]
        return scaling
    if rope_type == "linear":
        return {"rope_type": "linear", "factor": rope["factor"]}
    if rope_type == "longrope":
        old_len = (rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
                   or hf["max_position_embeddings"])
        factor = rope.get("factor") or hf["max_position_embeddings"] / old_len
        attention_factor = rope.get("attention_factor") or (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len)))
        return {"rope_type": "longrope", "short_factor": [float(f) for f in rope["short_factor"]],
                "long_factor": [float(f) for f in rope["long_factor"]], "original_max_seq_len": old_len,
                "attention_factor": attention_factor}
    raise LitModelError(f"unsupported rope type {rope_type!r} in the {model_type} config.json; supported: "
                        f"{', '.join(ROPE_TYPES)}")
