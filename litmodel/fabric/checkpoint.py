"""Training-state checkpoints: what ``Fabric.save``/``load``/``load_raw`` do.

One ``torch.save`` file written by rank 0, or under FSDP a sharded ``torch.distributed.checkpoint`` (DCP)
directory that each rank writes its shards to; either is published atomically (written beside the target,
renamed when complete) and loads in any number of processes. Also: what may be saved, shape checks, and
reading a DCP directory in one process (``load_full_model_state``, ``consolidate_checkpoint``).

``torch.distributed.checkpoint`` (with ``torch.distributed.tensor``) adds ~1.5 s to ``import litmodel.fabric``,
so the functions that need it import it when called.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from litmodel.fabric.environment import is_distributed
from litmodel.fabric.wrappers import clean_name, is_fsdp, unwrap
from litmodel.atomic import atomic_file, swap_into_place
from litmodel.utils import LitModelError

if TYPE_CHECKING:
    from litmodel.fabric.core import Fabric


def save_checkpoint(fabric: Fabric, path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Save modules, optimizers, anything with ``state_dict()`` and plain values (tensors, numbers,
    strings, lists, dicts). FSDP: a sharded DCP directory at ``path`` (each rank writes its shards);
    otherwise one ``torch.save`` file written by rank 0. Atomic: written beside ``path``, renamed
    when complete."""
    path = Path(path)
    sharded = any(isinstance(v, nn.Module) and is_fsdp(v) for v in state.values())
    payload = _collect_state(fabric, state)
    if not sharded:
        if fabric.is_global_zero:
            if path.is_dir():
                tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
                try:
                    torch.save(payload, tmp)
                    swap_into_place(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
            else:
                with atomic_file(path) as tmp:
                    torch.save(payload, tmp)
        fabric.barrier()
        return
    # deferred: see the module docstring
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    tmp = None
    if fabric.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(fabric.broadcast(tmp))
    error = None
    try:
        dcp.save(payload, checkpoint_id=tmp)
    except (Exception, CheckpointException) as err:  # noqa: BLE001
        error = err
    failed = int(error is not None)
    if is_distributed():  # every rank must agree before anything is renamed
        failed = int(fabric.all_reduce(torch.tensor(failed), op="sum").item())
    if failed:
        if fabric.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
        fabric.barrier()
        cause = "on another rank"
        if isinstance(error, CheckpointException) and getattr(error, "failures", None):
            rank, wrapped = sorted(error.failures.items())[0]
            exc = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            cause = f"on rank {rank}: {type(exc).__name__}: {exc}"
        elif error is not None:
            cause = f"{type(error).__name__}: {error}"
        raise LitModelError(f"saving {path} failed ({cause}); the previous checkpoint is untouched") from error
    fabric.barrier()
    if fabric.is_global_zero:
        swap_into_place(tmp, path)
    fabric.barrier()


def _collect_state(fabric: Fabric, state: Mapping[str, Any]) -> dict:
    # deferred: see the module docstring
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out = {}
    for key, value in state.items():
        if isinstance(value, nn.Module):
            out[key] = get_model_state_dict(unwrap(value))
        elif isinstance(value, torch.optim.Optimizer):
            owner = _owner(fabric, value, state)
            with fabric.allow_optimizer_step():  # DSD may run a zero-lr step to create the optimizer state
                out[key] = get_optimizer_state_dict(owner, value) if owner is not None else value.state_dict()
        elif hasattr(value, "state_dict") and callable(value.state_dict):
            out[key] = value.state_dict()
            _check_plain(out[key], key)
        else:
            _check_plain(value, key)
            out[key] = value
    return out


def _owner(fabric: Fabric, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> nn.Module | None:
    """The model (in ``state`` or set up by ``fabric``) that holds all of ``optimizer``'s parameters."""
    ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    candidates = [unwrap(v) for v in state.values() if isinstance(v, nn.Module)] + fabric.models
    for module in candidates:
        if ids <= {id(p) for p in module.parameters()}:
            return module
    return None


def load_checkpoint(fabric: Fabric, path: str | os.PathLike, state: dict | None = None, strict: bool = True) -> dict:
    """Load a checkpoint written by ``fabric.save`` (one file or a DCP directory, saved by any number of
    processes) into ``state`` in place: modules and optimizers get their state loaded, other
    objects ``load_state_dict``, plain values are replaced. Returns the checkpoint's items that
    ``state`` did not ask for (for DCP: plain values and tensors)."""
    path = Path(path)
    state = {} if state is None else state
    if not path.exists():
        raise LitModelError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        return _load_dcp(fabric, path, state, strict)
    return _load_file(fabric, path, state, strict)


def _load_file(fabric: Fabric, path: Path, state: dict, strict: bool) -> dict:
    # deferred: see the module docstring
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001
        raise LitModelError(f"cannot read checkpoint {path} ({str(err).splitlines()[0]}); is it a file saved by "
                            "fabric.save?") from err
    _check_keys(state, ckpt.keys(), strict, path)
    for key, value in state.items():
        if key not in ckpt:
            continue
        if isinstance(value, nn.Module):
            module = unwrap(value)
            _check_model_state(module, {f"{key}.{k}": v.shape for k, v in ckpt[key].items()}, key, strict)
            set_model_state_dict(module, ckpt[key], options=StateDictOptions(full_state_dict=is_fsdp(module),
                                                                             strict=strict))
        elif isinstance(value, torch.optim.Optimizer):
            owner = _owner(fabric, value, state)
            osd = ckpt[key]
            fqn_keyed = any(isinstance(p, str) for g in osd.get("param_groups", []) for p in g.get("params", []))
            if owner is None or not fqn_keyed:
                value.load_state_dict(osd)
            else:
                with fabric.allow_optimizer_step():
                    set_optimizer_state_dict(owner, value, osd,
                                             options=StateDictOptions(full_state_dict=is_fsdp(owner)))
        elif hasattr(value, "load_state_dict") and callable(value.load_state_dict):
            value.load_state_dict(ckpt[key])
        else:
            state[key] = ckpt[key]
    return {k: v for k, v in ckpt.items() if k not in state}


def _load_dcp(fabric: Fabric, path: Path, state: dict, strict: bool) -> dict:
    # deferred: see the module docstring
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not (path / ".metadata").exists():
        raise LitModelError(f"{path} is a directory but not a checkpoint written by fabric.save (no .metadata)")
    metadata = FileSystemReader(path).read_metadata()
    top = {}
    for fqn in metadata.state_dict_metadata:
        top.setdefault(_top_key(fqn, metadata), []).append(fqn)

    def empty(v: Any) -> bool:  # DCP stores nothing for an empty dict
        if isinstance(v, (nn.Module, torch.optim.Optimizer)):
            return False
        return (isinstance(v, Mapping) and not v) or (hasattr(v, "state_dict") and not v.state_dict())

    _check_keys({k: v for k, v in state.items() if not empty(v)}, top.keys(), strict, path)
    wanted = {k: v for k, v in state.items() if k in top}
    stateful = {k: v for k, v in wanted.items() if hasattr(v, "state_dict") or isinstance(v, nn.Module)}
    payload = _collect_state(fabric, stateful)
    for key, value in stateful.items():
        if isinstance(value, nn.Module):
            shapes = {fqn: md.size for fqn, md in metadata.state_dict_metadata.items()
                      if fqn in top[key] and isinstance(md, TensorStorageMetadata)}
            _check_model_state(unwrap(value), shapes, key, strict)
    # plain values (and items the caller did not ask for) are rebuilt from the checkpoint's
    # metadata, so their saved structure wins; sharded tensors of unasked items are skipped
    extras = [k for k in top if k not in state]
    for key in [k for k in wanted if k not in stateful] + extras:
        mds = {fqn: metadata.state_dict_metadata[fqn] for fqn in top[key]}
        sharded = any(isinstance(md, TensorStorageMetadata) and len(md.chunks) > 1 for md in mds.values())
        if key in extras and sharded:
            continue
        for fqn, md in mds.items():
            is_tensor = isinstance(md, TensorStorageMetadata)
            leaf = torch.empty(md.size, dtype=md.properties.dtype) if is_tensor else None
            route = (metadata.planner_data or {}).get(fqn, (fqn,))
            _set_nested(payload, route, leaf)
    with warnings.catch_warnings():  # loading in one process is intended, not a mistake
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(payload, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=not strict),
                 no_dist=not is_distributed())
    for key, value in wanted.items():
        if isinstance(value, nn.Module):
            set_model_state_dict(unwrap(value), payload[key])
        elif isinstance(value, torch.optim.Optimizer):
            owner = _owner(fabric, value, state)
            if owner is not None:
                with fabric.allow_optimizer_step():
                    set_optimizer_state_dict(owner, value, payload[key])
            else:
                value.load_state_dict(payload[key])
        elif hasattr(value, "load_state_dict") and callable(value.load_state_dict):
            value.load_state_dict(payload[key])
        else:
            state[key] = payload[key]
    return {k: payload[k] for k in extras if k in payload}


def _check_keys(state: Mapping[str, Any], available, strict: bool, path: Path) -> None:
    missing = [k for k in state if k not in set(available)]
    if missing and strict:
        raise LitModelError(f"checkpoint {path} has no {', '.join(map(repr, missing))}; it holds "
                            f"{', '.join(map(repr, available))} (pass strict=False to skip missing items)")


def load_raw_weights(source: str | os.PathLike | Mapping[str, torch.Tensor], module: nn.Module,
                     strict: bool = True) -> None:
    """Load a plain full model state dict (a dict, a ``torch.save`` file or a ``.safetensors`` file,
    e.g. a converted Hugging Face checkpoint) into a set-up (possibly FSDP-sharded) model; each
    rank keeps only its shards (and from a ``.safetensors`` file reads only them, one tensor at a
    time: build the model with ``init_module(empty_init=True)`` so no rank ever holds it whole)."""
    # deferred: see the module docstring (sharded_load imports torch.distributed.tensor)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from litmodel.fabric.sharded_load import load_safetensors_sharded

    if isinstance(source, Mapping):
        sd = source
    else:
        source = Path(source)
        if not source.is_file():
            raise LitModelError(f"weights file {source} does not exist; check the path")
        if source.suffix == ".safetensors":  # tensor by tensor, each rank reading only its shards
            missing = load_safetensors_sharded(unwrap(module), source, strict=strict)
            if strict and missing:
                raise LitModelError(f"{source} has no tensor {missing[0]!r} ({len(missing)} missing in all); "
                                    "load a checkpoint of the same model, or pass strict=False")
            return
        else:
            sd = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    module = unwrap(module)
    _check_model_state(module, {f"model.{k}": v.shape for k, v in sd.items()}, "model", strict)
    options = StateDictOptions(full_state_dict=is_fsdp(module), strict=strict)
    set_model_state_dict(module, dict(sd), options=options)


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
    return {clean_name(k): tuple(v.shape) for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


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
    # deferred: see the module docstring
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
    out = Path(out_path)
    if out.is_dir():
        out = out / "model.pth"
    data = load_full_model_state(sharded_path, key) if model_only else _read_dcp(Path(sharded_path), None)
    with atomic_file(out) as tmp:
        torch.save(data, tmp)
    return out
