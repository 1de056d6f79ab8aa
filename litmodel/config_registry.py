"""The registry of named models: ``configs`` (one dict of `Config` fields per Hub model) and
``name_to_config`` (by name and by Hub repo id), read by ``Config.from_name`` and the download and
conversion scripts. Plain data: adding a model is adding a dict here."""

from __future__ import annotations

from typing import Any

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


def _gemma(base: dict, family: str, suffixes: tuple[str, ...], global_every: int, sizes: list[tuple]) -> None:
    """One entry per (size, suffix): every ``global_every``-th layer attends globally, the others slide."""
    for size, n_layer, n_head, n_query_groups, n_embd, intermediate_size, kw in sizes:
        for suffix in suffixes:
            configs.append(dict(base, name=f"{family}-{size}{suffix}", hf_repo_id=f"google/{family}-{size}{suffix}",
                                n_layer=n_layer, n_head=n_head, n_query_groups=n_query_groups, n_embd=n_embd,
                                intermediate_size=intermediate_size,
                                layer_types=["sliding_attention" if (i + 1) % global_every else "full_attention"
                                             for i in range(n_layer)],
                                **kw))


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

# Qwen3: per-head q/k RMSNorm, head_dim 128 whatever the width; the MoE models route to 8 of 128 experts
_qwen3 = dict(model_type="qwen3", block_size=40960, vocab_size=151936, head_size=128, norm_eps=1e-6,
              rope_base=1000000.0, qk_norm="head")
for _size, _l, _h, _g, _e, _i, _tied in [
        ("0.6B", 28, 16, 8, 1024, 3072, True), ("1.7B", 28, 16, 8, 2048, 6144, True), ("4B", 36, 32, 8, 2560, 9728, True),
        ("8B", 36, 32, 8, 4096, 12288, False), ("14B", 40, 40, 8, 5120, 17408, False),
        ("32B", 64, 64, 8, 5120, 25600, False)]:
    for _suffix in ("", "-Base") if _size != "32B" else ("",):
        configs.append(dict(_qwen3, name=f"Qwen3-{_size}{_suffix}", hf_repo_id=f"Qwen/Qwen3-{_size}{_suffix}",
                            n_layer=_l, n_head=_h, n_query_groups=_g, n_embd=_e, intermediate_size=_i,
                            tie_embeddings=_tied))
for _name, _l, _h, _e, _i, _mi in [("Qwen3-30B-A3B", 48, 32, 2048, 6144, 768),
                                   ("Qwen3-235B-A22B", 94, 64, 4096, 12288, 1536)]:
    for _suffix in ("", "-Base"):
        configs.append(dict(_qwen3, model_type="qwen3_moe", name=f"{_name}{_suffix}",
                            hf_repo_id=f"Qwen/{_name}{_suffix}",
                            n_layer=_l, n_head=_h, n_query_groups=4, n_embd=_e, intermediate_size=_i, n_expert=128,
                            n_expert_per_token=8, moe_intermediate_size=_mi, norm_topk_prob=True))
for _suffix in ("", "-Instruct"):
    configs.append(dict(_mistral, model_type="mixtral", name=f"Mixtral-8x7B{_suffix}-v0.1",
                        hf_repo_id=f"mistralai/Mixtral-8x7B{_suffix}-v0.1", rope_base=1000000.0, n_expert=8,
                        n_expert_per_token=2))
# Gemma 2: soft-capping, sliding window on even layers; Gemma 3 (text): q/k norms, 5 local layers per global one
_gemma2 = dict(model_type="gemma2", block_size=8192, vocab_size=256000, head_size=256, norm_eps=1e-6,
               tie_embeddings=True, sliding_window=4096, attn_softcap=50.0, final_softcap=30.0,
               query_pre_attn_scalar=256)
_gemma(_gemma2, "gemma-2", ("", "-it"), 2, [
    ("2b", 26, 8, 4, 2304, 9216, {}), ("9b", 42, 16, 8, 3584, 14336, {}),
    ("27b", 46, 32, 16, 4608, 36864, dict(head_size=128, query_pre_attn_scalar=144))])
_gemma3 = dict(model_type="gemma3_text", block_size=131072, vocab_size=262208, head_size=256, norm_eps=1e-6,
               tie_embeddings=True, sliding_window=1024, query_pre_attn_scalar=256, qk_norm="head", rope_base=1000000.0,
               rope_local_base=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0})
_gemma(_gemma3, "gemma-3", ("-pt", "-it"), 6, [
    ("1b", 26, 4, 1, 1152, 6912, dict(block_size=32768, vocab_size=262144, sliding_window=512, rope_scaling=None)),
    ("4b", 34, 8, 4, 2560, 10240, {}), ("12b", 48, 16, 8, 3840, 15360, {}),
    ("27b", 62, 32, 16, 5376, 21504, dict(head_size=128, query_pre_attn_scalar=168))])
# Phi: fused qkv and gate_up in the HF files. Phi-4-mini's LongRoPE factors come from its config.json when
# converted; the registry entry (for pretraining from scratch) keeps the original 4k context.
configs.append(dict(model_type="phi3", name="Phi-3-mini-4k-instruct", hf_repo_id="microsoft/Phi-3-mini-4k-instruct",
                    block_size=4096, vocab_size=32064, n_layer=32, n_head=32, n_embd=3072, intermediate_size=8192,
                    sliding_window=2047))
configs.append(dict(model_type="phi3", name="Phi-4-mini-instruct", hf_repo_id="microsoft/Phi-4-mini-instruct",
                    block_size=4096, vocab_size=200064, n_layer=32, n_head=24, n_query_groups=8, n_embd=3072,
                    intermediate_size=8192, rotary_percentage=0.75, tie_embeddings=True))
# OLMo 2: norms after attention and MLP, RMSNorm over the whole q and k projections
_olmo2 = dict(model_type="olmo2", block_size=4096, vocab_size=100352, norm_eps=1e-6, rope_base=500000.0,
              qk_norm="full", post_norm=True)
for _name, _l, _h, _e, _i in [("OLMo-2-0425-1B", 16, 16, 2048, 8192), ("OLMo-2-1124-7B", 32, 32, 4096, 11008),
                              ("OLMo-2-1124-13B", 40, 40, 5120, 13824)]:
    for _suffix in ("", "-Instruct"):
        configs.append(dict(_olmo2, name=f"{_name}{_suffix}", hf_repo_id=f"allenai/{_name}{_suffix}", n_layer=_l,
                            n_head=_h, n_embd=_e, intermediate_size=_i))
# SmolLM3: every 4th layer without rotary embedding (NoPE)
for _suffix in ("", "-Base"):
    configs.append(dict(model_type="smollm3", name=f"SmolLM3-3B{_suffix}",
                        hf_repo_id=f"HuggingFaceTB/SmolLM3-3B{_suffix}",
                        block_size=65536, vocab_size=128256, n_layer=36, n_head=16, n_query_groups=4, n_embd=2048,
                        intermediate_size=11008, norm_eps=1e-6, rope_base=5000000.0, tie_embeddings=True,
                        nope_layers=list(range(3, 36, 4))))

name_to_config: dict[str, dict] = {c["name"]: c for c in configs}
name_to_config.update({c["hf_repo_id"]: c for c in configs})
