"""Model configuration: one dataclass for both families, a registry of named Hub models,
and translation to and from Hugging Face ``config.json``."""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from litmodel.utils import LitModelError

HF_MODEL_TYPES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2")


@dataclass
class Config:
    name: str = "custom"
    hf_repo_id: str | None = None
    # gpt2 | gpt_neox -> litmodel.gpt.GPT ; llama | mistral | qwen2 -> litmodel.llama.Llama
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
    rope_scaling: dict | None = None  # Llama 3.1: factor, low_freq_factor, high_freq_factor, original_max_seq_len
    sliding_window: int | None = None  # Mistral v0.1: a token sees at most this many keys

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
        if self.n_head % self.n_query_groups:
            raise LitModelError(f"n_head ({self.n_head}) must be a multiple of n_query_groups ({self.n_query_groups})")

    @property
    def family(self) -> str:
        return "gpt" if self.model_type in ("gpt2", "gpt_neox") else "llama"

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
        model_type = hf.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise LitModelError(
                f"unsupported model_type {model_type!r} in config.json; supported: {', '.join(HF_MODEL_TYPES)}"
            )
        # transformers 5 groups rope settings in `rope_parameters`; 4.x writes them at the top level
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise LitModelError(f"unsupported rope type {rope_type!r}; supported: default, llama3")
        rope_scaling = None
        if rope_type == "llama3":
            rope_scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor")}
            rope_scaling["original_max_seq_len"] = rope["original_max_position_embeddings"]
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
        sliding_window = hf.get("sliding_window")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            sliding_window = None
        return cls(**common, block_size=hf["max_position_embeddings"], n_layer=hf["num_hidden_layers"],
                   n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                   n_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                   head_size=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
                   intermediate_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
                   attn_bias=model_type == "qwen2" or hf.get("attention_bias", False),
                   tie_embeddings=hf.get("tie_word_embeddings", False), rope_base=rope_theta,
                   rope_scaling=rope_scaling, sliding_window=sliding_window)

    def to_hf_config(self) -> dict:
        """The ``config.json`` transformers needs to build the same model (4.x-compatible keys)."""
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
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        hf = {**common, "architectures": [arch[self.model_type]], "max_position_embeddings": self.block_size,
              "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
              "num_key_value_heads": self.n_query_groups, "head_dim": self.head_size, "hidden_size": self.n_embd,
              "intermediate_size": self.intermediate_size, "rms_norm_eps": self.norm_eps, "hidden_act": "silu",
              "rope_theta": self.rope_base, "attention_dropout": 0.0}
        if self.rope_scaling:
            s = self.rope_scaling
            hf["rope_scaling"] = {"rope_type": "llama3", "factor": s["factor"], "low_freq_factor": s["low_freq_factor"],
                                  "high_freq_factor": s["high_freq_factor"],
                                  "original_max_position_embeddings": s["original_max_seq_len"]}
        if self.model_type == "llama":
            hf.update(attention_bias=self.attn_bias, mlp_bias=False)
        elif self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        else:  # qwen2
            hf.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                      max_window_layers=self.n_layer)
        if self.model_type == "mistral" and self.attn_bias:
            raise LitModelError("a Mistral config cannot express a qkv bias; use model_type qwen2 for that")
        return hf

    def replace(self, **changes: Any) -> "Config":
        return replace(self, **changes)


# ---- the registry of named configs ---------------------------------------------------------------
configs: list[dict] = []

_gpt2 = dict(model_type="gpt2", block_size=1024, vocab_size=50257, bias=True, tie_embeddings=True,
             learned_pos_emb=True, gelu_approximate="tanh", rotary_percentage=0.0)
for _name, _l, _h, _e in [("gpt2", 12, 12, 768), ("gpt2-medium", 24, 16, 1024), ("gpt2-large", 36, 20, 1280),
                          ("gpt2-xl", 48, 25, 1600)]:
    configs.append(dict(_gpt2, name=_name, hf_repo_id=f"openai-community/{_name}", n_layer=_l, n_head=_h, n_embd=_e))

_pythia = dict(model_type="gpt_neox", block_size=2048, vocab_size=50304, bias=True, parallel_residual=True,
               rotary_percentage=0.25)
for _size, _l, _h, _e in [("14m", 6, 4, 128), ("70m", 6, 8, 512), ("160m", 12, 12, 768), ("410m", 24, 16, 1024),
                          ("1b", 16, 8, 2048)]:
    configs.append(dict(_pythia, name=f"pythia-{_size}", hf_repo_id=f"EleutherAI/pythia-{_size}", n_layer=_l,
                        n_head=_h, n_embd=_e))


def _llama(name: str, repo: str, **kw: Any) -> None:
    configs.append(dict(model_type="llama", name=name, hf_repo_id=f"{repo}/{name}", **kw))


_llama2 = dict(block_size=4096, vocab_size=32000, n_layer=32, n_head=32, n_embd=4096, intermediate_size=11008)
_llama("Llama-2-7b-hf", "meta-llama", **_llama2)
_llama("Llama-2-7b-chat-hf", "meta-llama", **_llama2)
_llama31 = dict(block_size=131072, vocab_size=128256, n_layer=32, n_head=32, n_query_groups=8, n_embd=4096,
                intermediate_size=14336, rope_base=500000.0,
                rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192))
_llama32_rope = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
_llama32_1b = dict(block_size=131072, vocab_size=128256, n_layer=16, n_head=32, n_query_groups=8, n_embd=2048,
                   head_size=64, intermediate_size=8192, rope_base=500000.0, tie_embeddings=True,
                   rope_scaling=_llama32_rope)
_llama32_3b = dict(_llama32_1b, n_layer=28, n_head=24, n_embd=3072, head_size=128)
_tinyllama = dict(block_size=2048, vocab_size=32000, n_layer=22, n_head=32, n_query_groups=4, n_embd=2048,
                  intermediate_size=5632)
_smol = {"135M": dict(n_layer=30, n_head=9, n_query_groups=3, n_embd=576, intermediate_size=1536, rope_base=100000.0),
         "360M": dict(n_layer=32, n_head=15, n_query_groups=5, n_embd=960, intermediate_size=2560, rope_base=100000.0),
         "1.7B": dict(n_layer=24, n_head=32, n_query_groups=32, n_embd=2048, intermediate_size=8192,
                      rope_base=130000.0)}
_mistral = dict(block_size=32768, vocab_size=32000, n_layer=32, n_head=32, n_query_groups=8, n_embd=4096,
                intermediate_size=14336)
_qwen = {"0.5B": dict(n_layer=24, n_head=14, n_query_groups=2, n_embd=896, intermediate_size=4864, tie_embeddings=True),
         "1.5B": dict(n_layer=28, n_head=12, n_query_groups=2, n_embd=1536, intermediate_size=8960,
                      tie_embeddings=True),
         "7B": dict(n_layer=28, n_head=28, n_query_groups=4, n_embd=3584, intermediate_size=18944, vocab_size=152064)}

for _suffix in ("", "-Instruct"):
    _llama(f"Llama-3.1-8B{_suffix}", "meta-llama", **_llama31)
    _llama(f"Llama-3.2-1B{_suffix}", "meta-llama", **_llama32_1b)
    _llama(f"Llama-3.2-3B{_suffix}", "meta-llama", **_llama32_3b)
    for _size, _kw in _smol.items():
        _llama(f"SmolLM2-{_size}{_suffix}", "HuggingFaceTB", block_size=8192, vocab_size=49152, tie_embeddings=True,
               **_kw)
    for _size, _kw in _qwen.items():
        _block = 131072 if (_size == "7B" and not _suffix) else 32768
        configs.append(dict(dict(model_type="qwen2", block_size=_block, vocab_size=151936, norm_eps=1e-6,
                                 rope_base=1000000.0, attn_bias=True), **_kw, name=f"Qwen2.5-{_size}{_suffix}",
                            hf_repo_id=f"Qwen/Qwen2.5-{_size}{_suffix}"))
_llama("TinyLlama-1.1B-Chat-v1.0", "TinyLlama", **_tinyllama)
configs.append(dict(_mistral, model_type="mistral", name="Mistral-7B-v0.1", hf_repo_id="mistralai/Mistral-7B-v0.1",
                    sliding_window=4096))
configs.append(dict(_mistral, model_type="mistral", name="Mistral-7B-Instruct-v0.3", vocab_size=32768,
                    rope_base=1000000.0, hf_repo_id="mistralai/Mistral-7B-Instruct-v0.3"))

name_to_config: dict[str, dict] = {c["name"]: c for c in configs}
name_to_config.update({c["hf_repo_id"]: c for c in configs})
