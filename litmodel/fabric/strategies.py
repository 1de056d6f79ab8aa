"""Distributed strategies: the DDP and FSDP2 options, and how ``Fabric.setup`` places a model with them
(DDP wrapping, FSDP2 ``fully_shard`` per transformer block on a device mesh, activation checkpointing,
materialising a meta-device model with its weight ties, re-pointing optimizers at the placed parameters)."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from litmodel.fabric.wrappers import FabricModule, clean_name, unwrap
from litmodel.precision import Precision
from litmodel.utils import LitModelError

STRATEGIES = ("auto", "single", "ddp", "fsdp")


@dataclass
class DDPStrategy:
    """``DistributedDataParallel`` options (``strategy="ddp"`` uses the defaults)."""

    find_unused_parameters: bool = False
    static_graph: bool = False
    bucket_cap_mb: int | None = None
    name: str = field(default="ddp", init=False)


@dataclass
class FSDPStrategy:
    """FSDP2 options (``strategy="fsdp"`` uses the defaults).

    sharding_strategy: "full" shards every parameter over all ranks; "hybrid" shards within a group
        of ``shard_size`` ranks (default: the processes of one node) and replicates across groups
        (2D device mesh ``(replicate, shard)``; gradients are reduce-scattered then all-reduced).
    cpu_offload: keep sharded parameters, gradients and optimizer state on the CPU
        (``CPUOffloadPolicy``; only meaningful with cuda).
    reshard_after_forward: free the gathered block parameters after forward (re-gather in backward).
    """

    sharding_strategy: str = "full"
    shard_size: int | None = None
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    name: str = field(default="fsdp", init=False)

    def __post_init__(self) -> None:
        if self.sharding_strategy not in ("full", "hybrid"):
            raise LitModelError(
                f"unknown FSDP sharding_strategy {self.sharding_strategy!r}; choose one of full, hybrid")


def check_strategy(strategy: str | DDPStrategy | FSDPStrategy) -> str | DDPStrategy | FSDPStrategy:
    """``strategy`` checked: "auto" and "single" as they are, "ddp"/"fsdp" as their default options."""
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise LitModelError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if strategy in ("ddp", "fsdp"):
            strategy = DDPStrategy() if strategy == "ddp" else FSDPStrategy()
    elif not isinstance(strategy, (DDPStrategy, FSDPStrategy)):
        raise LitModelError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)} "
                            "or pass a DDPStrategy/FSDPStrategy")
    return strategy


def resolve_strategy(strategy: str | DDPStrategy | FSDPStrategy, world_size: int,
                     devices: int) -> str | DDPStrategy | FSDPStrategy:
    """The strategy for ``world_size`` processes ("auto": single for one, else ddp), checked against it."""
    if strategy == "auto":
        strategy = "single" if world_size == 1 else DDPStrategy()
    if strategy == "single" and world_size > 1:
        raise LitModelError(f"strategy='single' runs one process but devices x num_nodes = {world_size}; "
                            "use strategy='ddp' or 'fsdp'")
    if isinstance(strategy, FSDPStrategy) and strategy.sharding_strategy == "hybrid":
        shard = strategy.shard_size or devices
        if shard < 1 or world_size % shard:
            raise LitModelError(f"FSDP hybrid shard_size={shard} must divide the world size {world_size}")
    return strategy


def parameter_names(module: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` (wrapper prefixes removed; a shared parameter under its first name)."""
    names: dict[int, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), clean_name(name))
    return names


def check_optimizers_hold(optimizers: tuple[torch.optim.Optimizer, ...], names: dict[int, str]) -> None:
    """Every parameter of ``optimizers`` is one of the model's (``names``: from ``parameter_names``)."""
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) not in names:
                    raise LitModelError("an optimizer passed to fabric.setup holds a parameter that is not part of "
                                        "the model; build it from model.parameters()")


def check_sharded_optimizers(optimizers: tuple[torch.optim.Optimizer, ...]) -> None:
    """Under FSDP an optimizer set up on its own must hold the sharded (DTensor) parameters."""
    # deferred: torch.distributed.tensor adds ~1.5 s to `import litmodel.fabric`
    from torch.distributed.tensor import DTensor

    for opt in optimizers:
        if any(not isinstance(p, DTensor) for g in opt.param_groups for p in g["params"]):
            raise LitModelError("with strategy='fsdp' create the optimizer after fabric.setup(model) from the "
                                "set-up model's parameters, or pass it as fabric.setup(model, optimizer)")


def shared_parameters(module: nn.Module) -> list[list[str]]:
    """Names of parameters held by several modules (tied embeddings and head), grouped per parameter."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def retie(module: nn.Module, ties: list[list[str]]) -> None:
    """Point every holder of a shared parameter at the first holder's (new) parameter again."""
    for first, *others in ties:
        owner, _, attr = first.rpartition(".")
        param = getattr(module.get_submodule(owner), attr)
        for name in others:
            holder, _, attr = name.rpartition(".")
            setattr(module.get_submodule(holder), attr, param)


def reinitialize(module: nn.Module) -> None:
    """Initialise a model materialised from the meta device: ``init_weights()`` (else every submodule's
    ``reset_parameters()``), then ``reset_buffers()`` when the model has it."""
    with torch.no_grad():
        if hasattr(module, "init_weights"):
            module.init_weights()
        else:
            for m in module.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()


def materialize(module: nn.Module, device: torch.device | str, ties: list[list[str]],
                shard_mesh: DeviceMesh | None = None) -> None:
    """Allocate a meta-device ``module`` on ``device``, tie its shared weights again (``ties``: from
    ``shared_parameters`` before) and initialise it. ``shard_mesh``: FSDP on CPU, where DTensor has no RNG
    offset tracker and every shard would draw the same values: seed by the shard's index instead (replicas
    of a hybrid mesh share it, so they stay equal)."""
    module.to_empty(device=device)
    retie(module, ties)
    if shard_mesh is None:
        reinitialize(module)
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch.initial_seed() + 1_000_003 * shard_mesh.get_local_rank("shard"))
        reinitialize(module)


def repoint_optimizer(opt: torch.optim.Optimizer, module: nn.Module, names: dict[int, str]) -> None:
    """Point ``opt``'s param groups at ``module``'s current parameters of the same names (``names``: from
    ``parameter_names`` before setup replaced them)."""
    current = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        current.setdefault(clean_name(name), p)
    changed = False
    for group in opt.param_groups:
        new = [current[names[id(p)]] for p in group["params"]]
        changed |= any(a is not b for a, b in zip(new, group["params"]))
        group["params"] = new
    if changed and len(opt.state):
        raise LitModelError("the optimizer already has state (it has stepped) but setup replaced the parameters; "
                            "create the optimizer before any step, or after fabric.setup(model)")


def apply_activation_checkpointing(module: nn.Module) -> None:
    """Wrap each ``module.blocks[i]`` so its activations are recomputed in backward (non-reentrant)."""
    blocks = getattr(module, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise LitModelError("activation_checkpointing needs the model's transformer blocks in `model.blocks` "
                            "(an nn.ModuleList)")
    for i, block in enumerate(blocks):
        if not type(block).__name__ == "CheckpointWrapper":
            blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def wrap_ddp(module: nn.Module, strategy: DDPStrategy, device: torch.device) -> nn.parallel.DistributedDataParallel:
    extra = {"bucket_cap_mb": strategy.bucket_cap_mb} if strategy.bucket_cap_mb else {}
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=strategy.find_unused_parameters, static_graph=strategy.static_graph, **extra)


def fsdp_mesh(strategy: FSDPStrategy, device_type: str, world_size: int, devices: int) -> DeviceMesh:
    """The device mesh FSDP shards over: ``("shard",)``, or ``("replicate", "shard")`` for hybrid sharding."""
    if strategy.sharding_strategy == "hybrid":
        shard = strategy.shard_size or devices
        return init_device_mesh(device_type, (world_size // shard, shard), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))


def shard_fsdp(module: nn.Module, strategy: FSDPStrategy, mesh: DeviceMesh, precision: Precision,
               device: torch.device) -> None:
    """``fully_shard`` each ``module.blocks[i]``, then the whole model (in place)."""
    # deferred: torch.distributed.fsdp (with torch.distributed.tensor) adds ~1.5 s to `import litmodel.fabric`
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=precision.autocast_dtype, reduce_dtype=torch.float32)
          if precision.autocast_dtype is not None else MixedPrecisionPolicy())
    if strategy.cpu_offload and device.type != "cuda":
        warnings.warn("FSDP cpu_offload has no effect with accelerator='cpu'")
    offload = CPUOffloadPolicy() if strategy.cpu_offload and device.type == "cuda" else OffloadPolicy()
    kw = dict(mesh=mesh, mp_policy=mp, offload_policy=offload)
    blocks = getattr(module, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        for block in blocks:
            fully_shard(block, reshard_after_forward=strategy.reshard_after_forward, **kw)
    else:
        warnings.warn("the model has no `blocks` ModuleList: FSDP shards it as a single unit")
    fully_shard(module, **kw)


@contextlib.contextmanager
def no_gradient_sync(module: nn.Module) -> Iterator[None]:
    """Inside, backward skips DDP's all-reduce (``no_sync``) or FSDP's reduce-scatter of the set-up ``module``
    (a ``FabricModule``, also under ``torch.compile``); the first backward outside synchronises the sum."""
    outer = module
    while not isinstance(outer, FabricModule) and isinstance(getattr(outer, "_orig_mod", None), nn.Module):
        outer = outer._orig_mod  # torch.compile(fabric_module): the DDP wrapper is inside
    forward_module = outer._forward_module if isinstance(outer, FabricModule) else outer
    if isinstance(forward_module, nn.parallel.DistributedDataParallel):
        with forward_module.no_sync():
            yield
        return
    inner = unwrap(module)
    if hasattr(inner, "set_requires_gradient_sync"):
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
        return
    yield


def total_grad_norm(params: list[nn.Parameter], norm_type: float, error_if_nonfinite: bool) -> torch.Tensor:
    """The norm of all of ``params``' gradients together; under FSDP over all shards (a plain tensor)."""
    # deferred: torch.distributed.tensor adds ~1.5 s to `import litmodel.fabric`
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type, error_if_nonfinite)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm
