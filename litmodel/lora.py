"""Low-rank adaptation (LoRA) for both model families, without touching the model files.

```python
from litmodel.lora import (LoRAConfig, apply_lora, disable_adapters, mark_only_lora_as_trainable, merge_lora,
                           save_lora, load_lora)

cfg = LoRAConfig(r=8, alpha=16, dropout=0.05, targets=("query", "value"))
apply_lora(model, **cfg.to_dict())           # swaps the chosen nn.Linear layers for LoRALinear, in place
mark_only_lora_as_trainable(model)           # base weights frozen, lora_A / lora_B trainable
...train...
with disable_adapters(model): ref = model(x) # the base model's output, no copy (DPO's reference)
save_lora(out_dir, model, cfg)               # out_dir/lora.safetensors + out_dir/lora_config.yaml
load_lora(fresh_base_model, out_dir)         # applies LoRA from lora_config.yaml and loads the weights
merge_lora(model)                            # folds W += scaling * B @ A; plain nn.Linear again
```

`LoRALinear` keeps the wrapped layer's ``weight``/``bias`` Parameters under the same names (so
``blocks.0.attn.qkv.weight`` stays ``blocks.0.attn.qkv.weight``) and adds two plain Parameters,
``lora_A`` and ``lora_B``: no hooks, no parametrizations, so FSDP and torch.compile see ordinary
modules.

Fused layers. The output rows of a layer may be split into *segments* with their own low-rank
update: ``attn.qkv`` is [q; k; v] (targets "query", "key", "value" pick segments; disabled ones get
no update at all) and the Llama SwiGLU ``mlp.fc`` is [gate; up] (two segments, each with its own
rank-r update, as PEFT's separate ``gate_proj``/``up_proj`` adapters). For ``k`` enabled segments,
``lora_A`` is the row-stack of the ``k`` (r, in) matrices, shape (k*r, in), and ``lora_B`` the
row-stack of the (rows_i, r) matrices of the enabled segments only, shape (sum enabled rows, r).
The forward pass computes ``a = dropout(x) @ lora_A.T * scaling`` once, then per enabled segment
``a_i @ B_i.T`` added to that segment of the base output; no dense (out, in) delta is built.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from litmodel.nf4 import NF4Linear, dequantize_nf4, is_nf4, nf4_linear
from litmodel.atomic import atomic_file
from litmodel.utils import LitModelError

LORA_WEIGHTS_FILE = "lora.safetensors"
LORA_CONFIG_FILE = "lora_config.yaml"
TARGETS = ("query", "key", "value", "projection", "mlp", "head")
_QKV = ("query", "key", "value")

__all__ = [
    "LORA_CONFIG_FILE", "LORA_WEIGHTS_FILE", "TARGETS", "LoRAConfig", "LoRAGroupedLinear", "LoRALinear", "apply_lora",
    "disable_adapters",
    "load_lora",
    "lora_modules", "lora_state_dict", "mark_only_lora_as_trainable", "merge_lora", "save_lora",
]


# ---- config --------------------------------------------------------------------------------------
def _parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = tuple(dict.fromkeys(targets))  # dedupe, keep order
    if not targets:
        raise LitModelError(f"no LoRA targets given; choose some of {', '.join(TARGETS)}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise LitModelError(f"unknown LoRA target {unknown[0]!r}; choose among {', '.join(TARGETS)}")
    return targets


@dataclass
class LoRAConfig:
    """What `lora_config.yaml` holds: rank, alpha (update scaled by alpha / r), dropout, targets, and
    the checkpoint dir of the base model the adapter was trained on (when known)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = field(default=("query", "value"))
    base_checkpoint_dir: str | None = None
    # "nf4" when the base weights were 4-bit while training (QLoRA): merging folds the update into the
    # NF4-rounded base, the weights the adapter was trained against
    quantize: str | None = None

    def __post_init__(self) -> None:
        self.targets = _parse_targets(self.targets)
        _check_hparams(self.r, self.alpha, self.dropout)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        """The hyperparameters (the keyword arguments of `apply_lora`), plus the base dir and the base's quantization
        when they are known."""
        d = asdict(self)
        d["targets"] = list(self.targets)
        for key in ("base_checkpoint_dir", "quantize"):
            if d[key] is None:
                del d[key]
        return d

    def to_yaml(self, path: str | os.PathLike) -> None:
        with atomic_file(path) as tmp:
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "LoRAConfig":
        path = Path(path)
        if not path.is_file():
            raise LitModelError(f"{path} does not exist; pass the dir that save_lora / LoRA finetuning wrote")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise LitModelError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix or re-save it") from err
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LitModelError(f"{path}: unknown LoRA config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**data)


def _check_hparams(r: int, alpha: float, dropout: float) -> None:
    if not isinstance(r, int) or r < 1:
        raise LitModelError(f"LoRA rank r must be an integer >= 1, got {r!r}")
    if not alpha > 0:
        raise LitModelError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise LitModelError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


# ---- the layer -----------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """``y = x W^T + b + scaling * (dropout(x) A_i^T) B_i^T`` on each enabled output segment ``i``.

    ``segments``: ``[(rows, enabled), ...]`` covering the output rows in order (default: one enabled
    segment of all rows). ``weight`` and ``bias`` are the base layer's own Parameters (shared, not
    copied: a tied head keeps sharing its weight with the embedding, which LoRA never modifies).
    ``lora_A`` is initialised like PEFT (kaiming-uniform, a=sqrt(5)), ``lora_B`` at zero, in the
    base weight's dtype and device.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 segments: Sequence[tuple[int, bool]] | None = None) -> None:
        super().__init__()
        _check_hparams(r, alpha, dropout)
        self.in_features, self.out_features = base.in_features, base.out_features
        segments = [(int(n), bool(e)) for n, e in (segments or [(self.out_features, True)])]
        if sum(n for n, _ in segments) != self.out_features:
            raise ValueError(f"segments {segments} do not cover the {self.out_features} output rows")
        if not any(e for _, e in segments):
            raise ValueError("LoRALinear needs at least one enabled segment")
        self.segments = segments
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scaling = alpha / r
        self.weight = base.weight
        self.bias = base.bias
        n_enabled = sum(e for _, e in segments)
        enabled_rows = sum(n for n, e in segments if e)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(n_enabled * r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(enabled_rows, r, **factory))
        self.disabled = False  # set by `disable_adapters`: the base layer alone (e.g. DPO's reference model)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # fan_in is in_features for every (r, in) block, so one call on the stack equals per-block init
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def _full(self) -> bool:
        return len(self.segments) == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nf4_linear(x, self.weight, self.bias)  # F.linear, or the NF4 kernel when the base weight is 4-bit (QLoRA)
        if self.disabled:
            return out
        h = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        a = F.linear(h, self.lora_A.to(x.dtype)) * self.scaling  # (..., n_enabled * r)
        B = self.lora_B.to(x.dtype)
        if self._full:
            return out + F.linear(a, B)
        a_parts = a.split(self.r, dim=-1)
        b_parts = B.split([n for n, e in self.segments if e], dim=0)
        pieces, j = [], 0
        for piece, (n, enabled) in zip(out.split([n for n, _ in self.segments], dim=-1), self.segments):
            if enabled:
                piece = piece + F.linear(a_parts[j], b_parts[j])
                j += 1
            pieces.append(piece)
        return torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out, in) update ``scaling * B @ A`` (zeros on disabled segments); for merging."""
        A, B = self.lora_A.to(dtype), self.lora_B.to(dtype)
        delta = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=A.device)
        row, b_row, j = 0, 0, 0
        for n, enabled in self.segments:
            if enabled:
                delta[row:row + n] = B[b_row:b_row + n] @ A[j * self.r:(j + 1) * self.r]
                b_row += n
                j += 1
            row += n
        return delta * self.scaling

    def extra_repr(self) -> str:
        segs = "" if self._full else f", segments={self.segments}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}{segs}")


class LoRAGroupedLinear(nn.Module):
    """LoRA on a mixture's stacked expert matrices (`litmodel.llama.GroupedLinear`, weight (E, out, in)):
    expert e gets its own update ``scaling * B_e @ A_e``, with ``lora_A`` (E, r, in) and ``lora_B``
    (E, out, r), applied to the expert-sorted rows as two more grouped matmuls (no dense delta)."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0) -> None:
        super().__init__()
        _check_hparams(r, alpha, dropout)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scaling = alpha / r
        self.weight = base.weight
        self.bias = None
        n_expert = base.weight.size(0)
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(n_expert, r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(n_expert, self.out_features, r, **factory))
        self.disabled = False  # set by `disable_adapters`: the experts' base weights alone
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        for a in self.lora_A:  # per expert, as PEFT initialises each adapter
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        from litmodel.layers import grouped_mm

        out = grouped_mm(x, self.weight, counts)
        if self.disabled:
            return out
        h = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        a = grouped_mm(h, self.lora_A.to(x.dtype), counts) * self.scaling
        return out + grouped_mm(a, self.lora_B.to(x.dtype), counts)

    @torch.no_grad()
    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.bmm(self.lora_B.to(dtype), self.lora_A.to(dtype)) * self.scaling

    def extra_repr(self) -> str:
        return (f"experts={self.weight.size(0)}, in_features={self.in_features}, out_features={self.out_features}, "
                f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}")


# ---- applying LoRA to a model --------------------------------------------------------------------
def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _plan(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, list[tuple[int, bool]] | None]]:
    """(module name, segments) of every linear layer the targets select, for GPT and Llama models."""
    from litmodel.layers import CausalSelfAttention
    from litmodel.llama import MoE, SwiGLU

    plan: list[tuple[str, list[tuple[int, bool]] | None]] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, CausalSelfAttention):
            wanted = [t in targets for t in _QKV]
            if any(wanted):
                q, kv = module.n_head * module.head_size, module.n_kv_heads * module.head_size
                plan.append((prefix + "qkv", [(q, wanted[0]), (kv, wanted[1]), (kv, wanted[2])]))
            if "projection" in targets:
                plan.append((prefix + "proj", None))
        elif leaf == "mlp" and "mlp" in targets and isinstance(module, MoE):  # every expert's matrices
            plan += [(prefix + "fc", None), (prefix + "proj", None)]
        elif leaf == "mlp" and "mlp" in targets and hasattr(module, "fc") and hasattr(module, "proj"):
            if isinstance(module, SwiGLU) and isinstance(module.fc, nn.Linear):
                half = module.fc.out_features // 2
                plan.append((prefix + "fc", [(half, True), (half, True)]))  # [gate; up]: a LoRA each
            else:
                plan.append((prefix + "fc", None))
            plan.append((prefix + "proj", None))
        elif leaf == "lm_head" and "head" in targets:
            plan.append((name, None))
    if "head" in targets and not any(n.rsplit(".", 1)[-1] == "lm_head" for n, _ in plan):
        raise LitModelError("LoRA target 'head' needs a model with an `lm_head` nn.Linear")
    return plan


def apply_lora(model: nn.Module, targets: str | Iterable[str] = ("query", "value"), r: int = 8,
               alpha: float = 16, dropout: float = 0.0) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers of ``model`` with `LoRALinear`, in place; returns ``model``.

    targets: any of "query", "key", "value" (segments of the fused ``attn.qkv``), "projection"
    (``attn.proj``), "mlp" (``mlp.fc`` and ``mlp.proj``), "head" (``lm_head``), as a sequence or a
    comma-separated string. The model's output is unchanged until ``lora_B`` is trained.
    """
    from litmodel.llama import GroupedLinear

    targets = _parse_targets(targets)
    _check_hparams(r, alpha, dropout)
    plan = _plan(model, targets)
    if not plan:
        raise LitModelError(f"LoRA targets {list(targets)} match no layer of this model; "
                            f"is it a litmodel GPT or Llama model?")
    for name, segments in plan:
        layer = model.get_submodule(name)
        if isinstance(layer, (LoRALinear, LoRAGroupedLinear)):
            raise LitModelError(f"{name} already has LoRA; apply LoRA once (or merge_lora first)")
        if isinstance(layer, GroupedLinear):
            _set_submodule(model, name, LoRAGroupedLinear(layer, r=r, alpha=alpha, dropout=dropout).train(layer.training))
            continue
        if not isinstance(layer, nn.Linear):
            raise LitModelError(f"{name} is a {type(layer).__name__}, not an nn.Linear; cannot apply LoRA to it")
        lora = LoRALinear(layer, r=r, alpha=alpha, dropout=dropout, segments=segments)
        _set_submodule(model, name, lora.train(layer.training))  # an eval-mode model stays in eval mode (no dropout)
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear | LoRAGroupedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAGroupedLinear))}


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every LoRA layer (`LoRALinear`, `LoRAGroupedLinear`) computes its base layer alone, so ``model`` is the untouched base
    model (no copy: DPO's reference model under LoRA). Works inside FSDP/DDP wrappers; restored on exit."""
    mods = list(lora_modules(model).values())
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(mods, before):
            m.disabled = was


def _is_lora_name(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Freeze everything but ``lora_A``/``lora_B``. bias: "none", "all" (every bias trains) or
    "lora_only" (biases of LoRA layers train)."""
    if bias not in ("none", "all", "lora_only"):
        raise LitModelError(f"unknown bias mode {bias!r}; choose none, all or lora_only")
    if not lora_modules(model):
        raise LitModelError("the model has no LoRA layers; call apply_lora(model, ...) first")
    for name, p in model.named_parameters():
        p.requires_grad = _is_lora_name(name)
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.requires_grad = True
    elif bias == "lora_only":
        for m in lora_modules(model).values():
            if m.bias is not None:
                m.bias.requires_grad = True
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA weights (``...lora_A``, ``...lora_B``), by their full names."""
    return {k: v for k, v in model.state_dict().items() if _is_lora_name(k)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put a plain ``nn.Linear`` back, in place.

    Afterwards the state dict has exactly the base model's names. A head whose weight is tied to
    the embedding gets its own merged weight (the embedding is left as it was) and the model's
    config is replaced by a copy with ``tie_embeddings=False``, so a saved checkpoint keeps the head.
    """
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    untied = False
    for name, m in lora_modules(model).items():
        W = m.weight
        delta = m.delta_weight(torch.float32).to(W.device)
        if is_nf4(W):  # QLoRA: the merged weight is dense (dequantized base + update)
            new_w = nn.Parameter((dequantize_nf4(W, torch.float32) + delta).to(W.dtype), requires_grad=False)
        elif counts.get(id(W), 0) > 1:  # shared (tied head): a new tensor, never touch the embedding
            new_w = nn.Parameter((W.float() + delta).to(W.dtype), requires_grad=W.requires_grad)
            untied = True
        else:
            W.copy_((W.float() + delta).to(W.dtype))
            new_w = W
        m.weight = new_w
    _remove_lora(model)
    if untied and getattr(model, "config", None) is not None and getattr(model.config, "tie_embeddings", False):
        model.config = model.config.replace(tie_embeddings=False)
    return model


def _remove_lora(model: nn.Module) -> None:
    """Undo `apply_lora` without merging: plain nn.Linear layers with the same weight/bias Parameters."""
    from litmodel.llama import GroupedLinear

    for name, m in lora_modules(model).items():
        if isinstance(m, LoRAGroupedLinear):
            grouped = GroupedLinear(1, m.in_features, m.out_features).to("meta")
            grouped.weight = m.weight
            _set_submodule(model, name, grouped)
            continue
        cls = NF4Linear if is_nf4(m.weight) else nn.Linear
        linear = cls(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight = m.weight
        if m.bias is not None:
            linear.bias = m.bias
        _set_submodule(model, name, linear)


# ---- saving and loading --------------------------------------------------------------------------
def _config_of(model: nn.Module, lora_config: LoRAConfig | dict | None) -> LoRAConfig:
    mods = lora_modules(model)
    if not mods:
        raise LitModelError("the model has no LoRA layers; nothing to save (call apply_lora first)")
    if lora_config is None:
        raise LitModelError("save_lora needs the LoRAConfig the model was adapted with")
    cfg = lora_config if isinstance(lora_config, LoRAConfig) else LoRAConfig(**lora_config)
    for name, m in mods.items():
        if (m.r, m.alpha, m.dropout) != (cfg.r, cfg.alpha, cfg.dropout):
            raise LitModelError(f"{name} has r={m.r}, alpha={m.alpha}, dropout={m.dropout} but the LoRA config says "
                                f"r={cfg.r}, alpha={cfg.alpha}, dropout={cfg.dropout}; pass the config used in apply_lora")
    return cfg


def save_lora(path_dir: str | os.PathLike, model: nn.Module, lora_config: LoRAConfig | dict | None) -> Path:
    """Write ``lora.safetensors`` (only LoRA weights) and ``lora_config.yaml`` into ``path_dir``.

    Both go to temporary names first and are renamed only once both are complete; other files in
    ``path_dir`` (e.g. a checkpoint's ``model.safetensors``) are left alone.
    """
    from safetensors.torch import save_file

    cfg = _config_of(model, lora_config)
    out = Path(path_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in lora_state_dict(model).items()}
    with atomic_file(out / LORA_WEIGHTS_FILE) as tmp_w, atomic_file(out / LORA_CONFIG_FILE) as tmp_c:
        save_file(tensors, str(tmp_w), metadata={"format": "pt"})
        tmp_c.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return out


def load_lora(model: nn.Module, path_dir: str | os.PathLike) -> nn.Module:
    """Apply LoRA to a base ``model`` as ``path_dir/lora_config.yaml`` says and load ``lora.safetensors``.

    Tensors are cast to the LoRA parameters' dtype and device. Raises a one-line `LitModelError`
    naming the tensor when one is missing, unexpected, or has a shape that does not fit the model.
    """
    from litmodel.safetensors_io import mmap_safetensors

    d = Path(path_dir)
    weights = d / LORA_WEIGHTS_FILE
    if not d.is_dir():
        raise LitModelError(f"LoRA dir {d} does not exist; pass the out dir of a LoRA finetuning run")
    cfg = LoRAConfig.from_yaml(d / LORA_CONFIG_FILE)
    if not weights.is_file():
        raise LitModelError(f"{weights} does not exist; pass the out dir of a LoRA finetuning run")
    if lora_modules(model):
        raise LitModelError("the model already has LoRA layers; load_lora needs a base model")
    state = mmap_safetensors(weights)
    apply_lora(model, targets=cfg.targets, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)
    try:
        _check_lora_tensors(model, state, cfg, weights)
    except LitModelError:
        _remove_lora(model)  # leave the caller's base model as it was
        raise
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(t.to(dtype=params[name].dtype))
    return model


def _check_lora_tensors(model: nn.Module, state: dict[str, torch.Tensor], cfg: LoRAConfig, weights: Path) -> None:
    expected = lora_state_dict(model)
    for name, t in state.items():
        if name not in expected:
            raise LitModelError(f"{weights}: unexpected tensor {name!r}; the adapter does not belong to this base "
                                f"model or to targets {list(cfg.targets)} in {LORA_CONFIG_FILE}")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise LitModelError(f"{weights}: tensor {name!r} has shape {tuple(t.shape)} but the base model with "
                                f"r={cfg.r}, targets {list(cfg.targets)} needs {tuple(expected[name].shape)}; the adapter "
                                f"was trained for another base model, rank or targets")
    missing = [n for n in expected if n not in state]
    if missing:
        raise LitModelError(f"{weights}: tensor {missing[0]!r} is missing ({len(missing)} missing in all); "
                            f"the file does not match targets {list(cfg.targets)} in {LORA_CONFIG_FILE}")
