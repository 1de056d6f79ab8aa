"""Checkpoint helpers: what may be saved, shape checks, atomic swaps, reading DCP directories."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from litmodel.fabric.wrappers import _clean_name
from litmodel.utils import LitModelError


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.dtype, torch.device, torch.Size)


def _check_plain(obj: Any, key: str) -> None:
    """Only what ``torch.load(weights_only=True)`` reads back may go into a checkpoint."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, (list, tuple, set, frozenset)) and (type(obj) in (list, tuple, set, frozenset)):
        for item in obj:
            _check_plain(item, key)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, key)
            _check_plain(v, key)
        return
    raise LitModelError(f"state[{key!r}] contains a {type(obj).__name__}, which a weights_only checkpoint cannot "
                        "hold; store tensors, numbers, strings, lists or dicts "
                        "(RNG: litmodel.fabric.capture_rng_state())")


def _set_nested(root: dict, route: tuple, value: Any) -> None:
    """``root[route[0]][route[1]]... = value``, creating dicts (str keys) and lists (int keys)."""
    node: Any = root
    for i, key in enumerate(route):
        last = i == len(route) - 1
        nxt = None if last else ([] if isinstance(route[i + 1], int) else {})
        if isinstance(node, list):
            while len(node) <= key:
                node.append(None)
            if last:
                node[key] = value
            elif node[key] is None:
                node[key] = nxt
            node = node[key]
        else:
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, nxt)


def _top_key(fqn: str, metadata) -> str:
    planner_data = getattr(metadata, "planner_data", None) or {}
    path = planner_data.get(fqn)
    return str(path[0]) if path else fqn.split(".")[0]


def _model_shapes(module: nn.Module) -> dict[str, tuple]:
    """Names and (global, for DTensors) shapes of what ``get_model_state_dict`` saves; no gathering."""
    return {_clean_name(k): tuple(v.shape) for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _check_model_state(module: nn.Module, ckpt_shapes: Mapping[str, Any], key: str, strict: bool) -> None:
    expected = {f"{key}.{k}": v for k, v in _model_shapes(module).items()}
    for name, shape in ckpt_shapes.items():
        if name in expected and tuple(shape) != expected[name]:
            raise LitModelError(f"checkpoint tensor {name!r} has shape {tuple(shape)} but the model's is "
                                f"{expected[name]}; load a checkpoint saved from the same model config")
    if strict:
        missing = sorted(set(expected) - set(ckpt_shapes))
        unexpected = sorted(set(ckpt_shapes) - set(expected))
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise LitModelError(f"checkpoint has no tensor {missing[0]!r}{more}; load a checkpoint of the same "
                                "model, or pass strict=False")
        if unexpected:
            more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            raise LitModelError(f"checkpoint tensor {unexpected[0]!r}{more} is not in the model; load a checkpoint "
                                "of the same model, or pass strict=False")


def _read_dcp(path: Path, keys: set[str] | None) -> dict:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    if not (path / ".metadata").exists():
        raise LitModelError(f"{path} is not a sharded checkpoint written by fabric.save (no .metadata)")
    sd: dict = {}
    _load_state_dict(sd, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(keys=keys),
                     no_dist=True)
    return sd


def load_full_model_state(path: str | os.PathLike, key: str = "model") -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict stored under ``key`` in a checkpoint written by
    ``fabric.save``: a DCP directory (read in this process only, no process group needed) or a
    single file. A file holding a bare state dict is returned as is."""
    path = Path(path)
    if not path.exists():
        raise LitModelError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        sd = _read_dcp(path, {key})
        if key not in sd:
            raise LitModelError(f"checkpoint {path} has no {key!r} entry; pass key= one of the saved names")
        return sd[key]
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if key in ckpt and isinstance(ckpt[key], Mapping):
        return dict(ckpt[key])
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt)
    raise LitModelError(f"checkpoint {path} has no {key!r} entry; pass key= one of {', '.join(map(str, ckpt))}")


def consolidate_checkpoint(sharded_path: str | os.PathLike, out_path: str | os.PathLike, model_only: bool = True,
                           key: str = "model") -> Path:
    """Turn a DCP checkpoint directory into one ``torch.save`` file (atomically) and return its path.
    ``model_only``: just the model's full state dict (for export); otherwise the whole training state
    (loadable by ``fabric.load`` in any number of processes). An existing directory as ``out_path``
    gets ``model.pth`` inside."""
    from litmodel.atomic import atomic_file

    out = Path(out_path)
    if out.is_dir():
        out = out / "model.pth"
    data = load_full_model_state(sharded_path, key) if model_only else _read_dcp(Path(sharded_path), None)
    with atomic_file(out) as tmp:
        torch.save(data, tmp)
    return out
