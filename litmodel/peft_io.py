"""LoRA adapters to and from Hugging Face PEFT's format (``adapter_model.safetensors`` + ``adapter_config.json``).

```python
export_peft(lora_dir, out_dir)                        # litmodel LoRA dir -> PEFT adapter dir
import_peft(adapter_dir, base_checkpoint_dir, out_dir)  # PEFT adapter dir -> litmodel LoRA dir (+ merged model)
```

litmodel fuses some projections that Hugging Face models keep apart: ``attn.qkv`` is [q; k; v] and
the Llama-family ``mlp.fc`` is [gate; up]. A litmodel LoRA layer gives each enabled segment its own
rank-r pair (A_i, B_i) (see `litmodel.lora`), so the mapping is exact both ways:

* Llama, Mistral, Qwen2: segment i is PEFT's ``q_proj`` / ``k_proj`` / ``v_proj`` (``gate_proj`` /
  ``up_proj``) adapter as is; ``attn.proj`` -> ``o_proj``, ``mlp.proj`` -> ``down_proj``.
* GPT-2 (``c_attn``) and GPT-NeoX (``query_key_value``) keep qkv fused, so k enabled segments become
  one adapter of rank k*r: A = [A_1; ...; A_k], B = the block-diagonal of the B_i (with NeoX's per-head
  row interleaving), with a ``rank_pattern`` / ``alpha_pattern`` entry that keeps the scaling alpha/r.
  Importing a fused adapter gives each segment the same A and its rows of B.
* Importing: modules the adapter leaves out (a layer, ``up_proj`` while ``gate_proj`` is adapted)
  get a zero update; ranks and scalings that differ per module (``rank_pattern``, ``alpha_pattern``,
  rsLoRA) are folded into one rank (the largest, zero-padded) and one scaling (B rescaled), exactly.
  DoRA, trained biases, ``modules_to_save`` and embedding adapters have no litmodel equivalent and
  are refused with one line.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from litmodel.checkpoint import load_config
from litmodel.config import Config
from litmodel.hf_names import lit_to_hf_plan, transpose_conv1d
from litmodel.lora import LORA_CONFIG_FILE, LORA_WEIGHTS_FILE, LoRAConfig
from litmodel.atomic import atomic_dir
from litmodel.safetensors_io import mmap_safetensors
from litmodel.utils import LitModelError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "export_peft", "import_peft", "lora_segments"]


# ---- the module map ------------------------------------------------------------------------------
@dataclass
class Target:
    """One litmodel linear layer LoRA can adapt and the Hugging Face module(s) it stands for."""

    lit: str  # e.g. "blocks.0.attn.qkv"
    kind: str  # the litmodel LoRA target it belongs to: qkv, projection, mlp, head
    segments: list[int]  # output rows per segment (litmodel order)
    hf: list[str]  # one HF module per segment (split), or a single fused module
    in_features: int
    rows_to_hf: Callable[[torch.Tensor], torch.Tensor]  # litmodel row order -> the fused HF module's order

    @property
    def fused(self) -> bool:
        return len(self.hf) == 1 and len(self.segments) > 1


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def lora_segments(config: Config) -> dict[str, list[int]]:
    """Output-row segments of each adaptable litmodel layer of one block (as `litmodel.lora` splits them)."""
    q, kv = config.n_head * config.head_size, config.n_query_groups * config.head_size
    fc = [config.intermediate_size] * 2 if config.family == "llama" else [config.intermediate_size]
    return {"attn.qkv": [q, kv, kv], "attn.proj": [config.n_embd], "mlp.fc": fc, "mlp.proj": [config.n_embd]}


def targets_of(config: Config) -> dict[str, Target]:
    """Every adaptable litmodel layer (by name) with its Hugging Face module names, from the conversion plan."""
    plan = lit_to_hf_plan(config)
    sources: dict[str, list[tuple[str, Callable]]] = {}
    for hf_name, (lit_names, fn) in plan.items():
        if len(lit_names) == 1 and lit_names[0].endswith(".weight"):
            sources.setdefault(lit_names[0][: -len(".weight")], []).append((hf_name[: -len(".weight")], fn))
    segs = lora_segments(config)
    kinds = {"attn.qkv": "qkv", "attn.proj": "projection", "mlp.fc": "mlp", "mlp.proj": "mlp"}
    out: dict[str, Target] = {}
    for i in range(config.n_layer):
        for leaf, segments in segs.items():
            lit = f"blocks.{i}.{leaf}"
            hf = sources.get(lit)
            if not hf:  # a layer this family does not have under this name (e.g. MoE experts): not exported
                continue
            fn = hf[0][1] if len(hf) == 1 and hf[0][1] is not transpose_conv1d else _identity
            in_features = config.n_head * config.head_size if leaf == "attn.proj" else \
                config.intermediate_size if leaf == "mlp.proj" else config.n_embd
            out[lit] = Target(lit, kinds[leaf], segments, [h for h, _ in hf], in_features, fn)
    # transformers 5 names every family's head lm_head (4.x called GPT-NeoX's embed_out: accepted on import)
    out["lm_head"] = Target("lm_head", "head", [config.padded_vocab_size], ["lm_head"], config.n_embd, _identity)
    return out


def _target_names(modules: list[str]) -> list[str]:
    """PEFT ``target_modules``: leaf names (``q_proj``), qualified by the parent where a leaf is ambiguous
    (GPT-2's ``attn.c_proj`` / ``mlp.c_proj``); PEFT matches a name or any ``.``-suffix of it."""
    leaves: dict[str, set[str]] = {}
    for m in modules:
        parts = m.split(".")
        leaves.setdefault(parts[-1], set()).add(".".join(parts[-2:]) if len(parts) > 1 else parts[-1])
    names = set()
    for m in modules:
        parts = m.split(".")
        names.add(parts[-1] if len(leaves[parts[-1]]) == 1 else ".".join(parts[-2:]))
    return sorted(names)


def _check_out_dir(out_dir: Path, marker: str) -> None:
    """Refuse to replace a non-empty dir that is not an earlier output of the same kind (it would be deleted)."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / marker).is_file())):
        raise LitModelError(f"--out_dir {out_dir} already exists and holds other files; choose a new or empty dir")


# ---- export --------------------------------------------------------------------------------------
def _enabled(cfg: LoRAConfig, t: Target) -> list[bool]:
    if t.kind == "qkv":
        return [x in cfg.targets for x in ("query", "key", "value")]
    return [True] * len(t.segments)


def export_peft(lora_dir: str | Path, out_dir: str | Path, base_checkpoint_dir: str | Path | None = None) -> Path:
    """Write ``lora_dir``'s adapter as a PEFT adapter dir that ``PeftModel.from_pretrained(hf_base, out_dir)`` loads.

    ``base_checkpoint_dir`` (default: the base named in ``lora_config.yaml``) gives the model shapes and
    ``base_model_name_or_path`` (its Hub repo id when known, else the dir)."""
    lora_dir = Path(lora_dir)
    if not (lora_dir / LORA_WEIGHTS_FILE).is_file():
        hint = " (pass out_dir/final)" if (lora_dir / "final" / LORA_WEIGHTS_FILE).is_file() else ""
        raise LitModelError(f"{lora_dir} has no {LORA_WEIGHTS_FILE}; --format peft exports the output dir of a LoRA "
                            f"finetuning run{hint}")
    cfg = LoRAConfig.from_yaml(lora_dir / LORA_CONFIG_FILE)
    base = base_checkpoint_dir or cfg.base_checkpoint_dir
    if base is None:
        raise LitModelError(f"{lora_dir / LORA_CONFIG_FILE} names no base model; pass --base_checkpoint_dir")
    config = load_config(base)
    _check_out_dir(Path(out_dir), ADAPTER_CONFIG)
    state = mmap_safetensors(lora_dir / LORA_WEIGHTS_FILE)
    targets = targets_of(config)
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for lit, t in targets.items():
        if f"{lit}.lora_A" not in state:
            continue
        A, B = state[f"{lit}.lora_A"].float(), state[f"{lit}.lora_B"].float()
        enabled = _enabled(cfg, t)
        r = cfg.r
        if t.fused or len(t.hf) == 1:
            k = sum(enabled)
            full_B = torch.zeros(sum(t.segments), k * r)
            row, b_row, j = 0, 0, 0
            for n, on in zip(t.segments, enabled):
                if on:
                    full_B[row:row + n, j * r:(j + 1) * r] = B[b_row:b_row + n]
                    b_row, j = b_row + n, j + 1
                row += n
            pieces = [(t.hf[0], A, t.rows_to_hf(full_B))]
            if k > 1:
                rank_pattern[t.hf[0]], alpha_pattern[t.hf[0]] = k * r, k * cfg.alpha
        else:
            pieces, b_row, j = [], 0, 0
            for hf, n, on in zip(t.hf, t.segments, enabled):
                if on:
                    pieces.append((hf, A[j * r:(j + 1) * r], B[b_row:b_row + n]))
                    b_row, j = b_row + n, j + 1
        for hf, a, b in pieces:
            dtype = state[f"{lit}.lora_A"].dtype
            tensors[f"{PREFIX}{hf}.lora_A.weight"] = a.to(dtype).contiguous()
            tensors[f"{PREFIX}{hf}.lora_B.weight"] = b.to(dtype).contiguous()
            modules.append(hf)
    if not modules:
        raise LitModelError(f"{lora_dir / LORA_WEIGHTS_FILE} holds no LoRA weights of this base model")
    names = _target_names(modules)
    key_of = {m: next(n for n in names if m == n or m.endswith("." + n)) for m in modules}
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": config.hf_repo_id or str(Path(base).resolve()),
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": names,
        "bias": "none", "fan_in_fan_out": config.model_type == "gpt2", "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {key_of[m]: v for m, v in rank_pattern.items()},
        "alpha_pattern": {key_of[m]: v for m, v in alpha_pattern.items()},
    }
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out_dir


# ---- import --------------------------------------------------------------------------------------
def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches a module path that ends with it (as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not adapter_dir.is_dir():
        raise LitModelError(f"PEFT adapter dir {adapter_dir} does not exist; pass the dir PeftModel.save_pretrained "
                            "wrote")
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise LitModelError(f"{adapter_dir} has no {ADAPTER_CONFIG}; pass the dir PeftModel.save_pretrained wrote")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LitModelError(f"{path} is not valid JSON ({err}); re-save the adapter") from None
    if (adapter_dir / ADAPTER_WEIGHTS).is_file():
        tensors = dict(mmap_safetensors(adapter_dir / ADAPTER_WEIGHTS))
    elif (adapter_dir / ADAPTER_BIN).is_file():
        tensors = torch.load(adapter_dir / ADAPTER_BIN, map_location="cpu", weights_only=True)
    else:
        raise LitModelError(f"{adapter_dir} has no {ADAPTER_WEIGHTS} (or {ADAPTER_BIN}); pass the dir "
                            "PeftModel.save_pretrained wrote")
    return config, tensors


def _check_supported(config: dict, path: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise LitModelError(f"{path}: peft_type {config.get('peft_type')!r} is not LoRA; only LoRA adapters convert")
    unsupported = [(config.get("use_dora"), "use_dora (DoRA)"), (config.get("modules_to_save"), "modules_to_save"),
                   (config.get("bias", "none") != "none", f"bias={config.get('bias')!r} (trained biases)")]
    for flag, what in unsupported:
        if flag:
            raise LitModelError(f"{path}: {what} has no litmodel LoRA equivalent; use a plain LoRA adapter")


def peft_to_lora(adapter_dir: str | Path, base_config: Config) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The litmodel LoRA config and weights equal to the PEFT adapter in ``adapter_dir`` on a base of ``base_config``."""
    adapter_dir = Path(adapter_dir)
    config, tensors = _read_adapter(adapter_dir)
    _check_supported(config, adapter_dir / ADAPTER_CONFIG)
    source = adapter_dir / (ADAPTER_WEIGHTS if (adapter_dir / ADAPTER_WEIGHTS).is_file() else ADAPTER_BIN)
    targets = targets_of(base_config)
    by_hf = {hf: (t, i) for t in targets.values() for i, hf in enumerate(t.hf)}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.endswith(".base_layer.weight"):  # PEFT also saves an adapted head's base weight: the base has it
            continue
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise LitModelError(f"{source}: tensor {key!r} is not a LoRA A/B weight (embedding adapters, DoRA "
                                "magnitudes and saved modules have no litmodel equivalent)")
        module = "lm_head" if m.group(1) == "embed_out" else m.group(1)
        if module not in by_hf:
            raise LitModelError(f"{source}: the adapter targets {module!r}, which this {base_config.model_type} base "
                                f"model ({base_config.name}) has no adaptable linear layer for; pass the base model "
                                "the adapter was trained on")
        pairs.setdefault(module, {})[m.group(2)] = value.float()
    if not pairs:
        raise LitModelError(f"{source} holds no LoRA weights")
    alpha0 = float(config.get("lora_alpha", 8))

    def scaling(module: str, r: int) -> float:
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, alpha0))
        return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r

    # checks, per-module rank and scaling
    info = {}
    for module, ab in pairs.items():
        t, _ = by_hf[module]
        if set(ab) != {"lora_A", "lora_B"}:
            raise LitModelError(f"{source}: {module!r} has {sorted(ab)} but needs both lora_A and lora_B")
        A, B = ab["lora_A"], ab["lora_B"]
        rows = sum(t.segments) if t.fused or len(t.hf) == 1 else t.segments[t.hf.index(module)]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != t.in_features or B.shape[0] != rows or A.shape[0] != B.shape[1]:
            raise LitModelError(f"{source}: {module!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, but "
                                f"the base model needs ({{r}}, {t.in_features}) and ({rows}, {{r}}); the adapter was "
                                "trained for another base model")
        info[module] = (A.shape[0], scaling(module, A.shape[0]))
    r = max(rank for rank, _ in info.values())
    s = next(iter(info.values()))[1]
    # litmodel targets: every kind any layer adapts (layers left out get zeros)
    kinds = set()
    for module in pairs:
        t, i = by_hf[module]
        if t.kind == "qkv":
            kinds.update(("query", "key", "value") if t.fused else (("query", "key", "value")[i],))
        else:
            kinds.add(t.kind)
    order = ("query", "key", "value", "projection", "mlp", "head")
    lora = LoRAConfig(r=r, alpha=s * r, dropout=float(config.get("lora_dropout", 0.0)),
                      targets=tuple(k for k in order if k in kinds))
    state: dict[str, torch.Tensor] = {}
    for lit, t in targets.items():
        enabled = _enabled(lora, t) if t.kind == "qkv" else [t.kind in kinds] * len(t.segments)
        if not any(enabled):
            continue
        A = torch.zeros(sum(enabled) * r, t.in_features)
        B = torch.zeros(sum(n for n, on in zip(t.segments, enabled) if on), r)
        if t.fused or len(t.hf) == 1:
            if t.hf[0] in pairs:
                a, b = pairs[t.hf[0]]["lora_A"], pairs[t.hf[0]]["lora_B"]
                rank, s_m = info[t.hf[0]]
                b = _rows_from_hf(t, b) * (s_m / s)
                row, b_row, j = 0, 0, 0
                for n, on in zip(t.segments, enabled):
                    if on:
                        A[j * r:j * r + rank] = a
                        B[b_row:b_row + n, :rank] = b[row:row + n]
                        b_row, j = b_row + n, j + 1
                    row += n
        else:
            b_row, j = 0, 0
            for hf, n, on in zip(t.hf, t.segments, enabled):
                if on:
                    if hf in pairs:
                        rank, s_m = info[hf]
                        A[j * r:j * r + rank] = pairs[hf]["lora_A"]
                        B[b_row:b_row + n, :rank] = pairs[hf]["lora_B"] * (s_m / s)
                    b_row, j = b_row + n, j + 1
        state[f"{lit}.lora_A"], state[f"{lit}.lora_B"] = A, B
    return lora, state


def _rows_from_hf(t: Target, b: torch.Tensor) -> torch.Tensor:
    """Invert ``t.rows_to_hf`` (a row permutation) on ``b``."""
    probe = torch.arange(b.shape[0], dtype=torch.float64)[:, None]
    perm = t.rows_to_hf(probe)[:, 0].long()  # hf row j holds litmodel row perm[j]
    out = torch.empty_like(b)
    out[perm] = b
    return out


def import_peft(adapter_dir: str | Path, base_checkpoint_dir: str | Path, out_dir: str | Path,
                merge: bool = True) -> Path:
    """Write a litmodel LoRA dir (``lora.safetensors`` + ``lora_config.yaml`` naming the base, and with ``merge``
    the merged model) equal to the PEFT adapter in ``adapter_dir`` on ``base_checkpoint_dir``."""
    from litmodel.finetune import write_lora_checkpoint

    base_checkpoint_dir = Path(base_checkpoint_dir)
    config = load_config(base_checkpoint_dir)
    lora, state = peft_to_lora(adapter_dir, config)
    _check_out_dir(Path(out_dir), LORA_CONFIG_FILE)
    return write_lora_checkpoint(Path(out_dir), state, lora, base_checkpoint_dir, merge=merge)

