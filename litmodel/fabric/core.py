"""The ``Fabric`` object: launching, model/optimizer/data setup, the training step, collectives,
logging and checkpoints."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler,
                              SequentialSampler)

from litmodel.atomic import swap_into_place
from litmodel.fabric.checkpoint import _check_model_state, _check_plain, _set_nested, _top_key
from litmodel.fabric.environment import (_CPU_PROCESSES_PER_CORE, ACCELERATORS, STRATEGIES, ClusterEnv, DDPStrategy, FSDPStrategy, _cpu_count,
                                         detect_cluster_env)
from litmodel.fabric.launcher import _destroy_process_group, _spawn_and_supervise
from litmodel.fabric.wrappers import (FabricDataLoader, FabricModule, _clean_name, _is_fsdp, _ResumableSampler, _unwrap,
                                      seed_everything)
from litmodel.loggers import Logger
from litmodel.precision import Precision, check_precision
from litmodel.utils import LitModelError, apply_to_tensors


class Fabric:
    """Run a training function on one device, several local processes, or a torchrun/SLURM job.

    Args:
        accelerator: "cpu", "cuda" or "auto" (cuda when available).
        devices: processes per node (cuda: GPUs; cpu: processes, up to 4 per core) or "auto".
        num_nodes: nodes in the job (>1 needs torchrun or srun to start the processes).
        strategy: "auto" (single when one process, else ddp), "single", "ddp", "fsdp", or a
            ``DDPStrategy``/``FSDPStrategy`` with options.
        precision: one of ``PRECISIONS`` (aliases: 32, "bf16" -> bf16-mixed, 16 -> 16-mixed).
        loggers: a ``Logger`` or list of them; ``log_dict`` forwards from global rank 0.
        activation_checkpointing: recompute each ``model.blocks[i]`` in backward (non-reentrant).
    """

    def __init__(self, accelerator: str = "auto", devices: int | str = 1, num_nodes: int = 1,
                 strategy: str | DDPStrategy | FSDPStrategy = "auto", precision: str | int = "32-true",
                 loggers: Logger | list[Logger] | None = None, activation_checkpointing: bool = False) -> None:
        if accelerator == "gpu":
            accelerator = "cuda"
        if accelerator not in ACCELERATORS:
            raise LitModelError(f"unknown accelerator {accelerator!r}; choose one of {', '.join(ACCELERATORS)}")
        if accelerator == "auto":
            accelerator = "cuda" if torch.cuda.is_available() else "cpu"
        if accelerator == "cuda" and not torch.cuda.is_available():
            raise LitModelError("accelerator='cuda' but no CUDA GPU is available; use accelerator='cpu'")
        self.accelerator = accelerator

        precision = check_precision(precision)
        if accelerator == "cuda" and precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
            raise LitModelError(f"precision={precision!r} needs a GPU with bfloat16 support (Ampere or newer); "
                                "use precision='16-mixed' or '32-true'")
        self._precision = Precision(precision, accelerator)

        if isinstance(strategy, str):
            if strategy not in STRATEGIES:
                raise LitModelError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
            if strategy in ("ddp", "fsdp"):
                strategy = DDPStrategy() if strategy == "ddp" else FSDPStrategy()
        elif not isinstance(strategy, (DDPStrategy, FSDPStrategy)):
            raise LitModelError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)} "
                                "or pass a DDPStrategy/FSDPStrategy")

        self._env = detect_cluster_env()
        if not isinstance(num_nodes, int) or num_nodes < 1:
            raise LitModelError(f"num_nodes must be a positive integer, got {num_nodes!r}")
        if devices == "auto":
            devices = (self._env.local_world_size if self._env else
                       torch.cuda.device_count() if accelerator == "cuda" else 1)
        if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
            raise LitModelError(f"devices must be a positive integer or 'auto', got {devices!r}")
        if accelerator == "cuda" and devices > torch.cuda.device_count():
            raise LitModelError(f"devices={devices} but this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                                f"use devices<={torch.cuda.device_count()}")
        max_cpu = _cpu_count() * _CPU_PROCESSES_PER_CORE
        if accelerator == "cpu" and devices > max_cpu:
            raise LitModelError(f"devices={devices} CPU processes but this machine has {_cpu_count()} core(s); "
                                f"use devices<={max_cpu} (at most {_CPU_PROCESSES_PER_CORE} per core)")
        if self._env is not None:
            if self._env.kind == "slurm" and self._env.world_size == 1 and num_nodes == 1:
                self._env = None  # one SLURM task asking for several devices: launch them ourselves
            elif self._env.world_size != devices * num_nodes:
                hint = ("srun --ntasks-per-node" if self._env.kind == "slurm" else "torchrun --nproc_per_node")
                raise LitModelError(
                    f"{self._env.kind} started {self._env.world_size} processes but Fabric was asked for "
                    f"devices={devices} x num_nodes={num_nodes}; make {hint} equal devices and the node count "
                    "equal num_nodes")
        elif num_nodes > 1:
            raise LitModelError(f"num_nodes={num_nodes} needs the processes started on every node by torchrun or "
                                "srun; see the README section on multi-node training")
        self.devices, self.num_nodes = devices, num_nodes
        self._world_size = devices * num_nodes
        if strategy == "auto":
            strategy = "single" if self._world_size == 1 else DDPStrategy()
        if strategy == "single" and self._world_size > 1:
            raise LitModelError(f"strategy='single' runs one process but devices x num_nodes = {self._world_size}; "
                                "use strategy='ddp' or 'fsdp'")
        self._strategy = strategy
        self._strategy_name = strategy if isinstance(strategy, str) else strategy.name
        if isinstance(strategy, FSDPStrategy) and strategy.sharding_strategy == "hybrid":
            shard = strategy.shard_size or devices
            if shard < 1 or self._world_size % shard:
                raise LitModelError(f"FSDP hybrid shard_size={shard} must divide the world size {self._world_size}")

        self.activation_checkpointing = activation_checkpointing
        if loggers is None:
            loggers = []
        self._loggers = [loggers] if isinstance(loggers, Logger) else list(loggers)
        self._launched = False
        self._owns_pg = False
        self._device = torch.device("cpu")
        self._mesh = None
        self._scaler = None
        self._stepping = False
        self._modules: list[nn.Module] = []
        self._seed: int | None = None

    # ---------------------------------------------------------------- properties
    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def global_rank(self) -> int:
        return self._env.rank if self._env else 0

    @property
    def local_rank(self) -> int:
        return self._env.local_rank if self._env else 0

    @property
    def node_rank(self) -> int:
        return self._env.node_rank if self._env else 0

    @property
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    def device(self) -> torch.device:
        self._require_launched()
        return self._device

    @property
    def strategy(self) -> str:
        return self._strategy_name

    @property
    def precision(self) -> str:
        return self._precision.name

    @property
    def loggers(self) -> list[Logger]:
        return self._loggers

    @property
    def logger(self) -> Logger | None:
        return self._loggers[0] if self._loggers else None

    def __getstate__(self):  # a Fabric travels to spawned workers; process-local pieces do not
        state = self.__dict__.copy()
        state.update(_mesh=None, _scaler=None, _modules=[])
        return state

    # ---------------------------------------------------------------- launching
    def launch(self, fn: Callable | None = None, *args: Any, **kwargs: Any) -> Any:
        """Start (or join) the processes and call ``fn(fabric, *args, **kwargs)`` in each.

        - One process and no torchrun/SLURM variables: calls ``fn`` here, no process group.
        - Under torchrun/srun: joins their process group and calls ``fn`` in this process.
        - Otherwise spawns ``devices`` worker processes (``start_method="spawn"``: ``fn`` and the
          arguments are pickled, the main script is re-imported as ``__mp_main__``, so it needs an
          ``if __name__ == "__main__":`` guard); this process only supervises and returns rank 0's
          result. If any worker fails, the others are stopped and ``WorkerError`` is raised.
        """
        if self._launched:
            raise LitModelError("fabric.launch() was already called on this Fabric; call it once")
        if self._env is not None or self._world_size == 1:
            self._join(self._env)
            return fn(self, *args, **kwargs) if fn is not None else None
        if fn is None:
            raise LitModelError(f"fabric.launch() without a function cannot start {self._world_size} processes; "
                                "pass the training function: fabric.launch(main, ...), or run under torchrun")
        return _spawn_and_supervise(self, fn, args, kwargs)

    def _join(self, env: ClusterEnv | None) -> None:
        self._env = env
        local_world = env.local_world_size if env else 1
        if self.accelerator == "cuda":
            self._device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self._device)
        else:
            self._device = torch.device("cpu")
            if local_world > 1:
                torch.set_num_threads(max(1, _cpu_count() // local_world))
        backend = "nccl" if self.accelerator == "cuda" else "gloo"
        if self._world_size > 1 and not dist.is_initialized():
            timeout = datetime.timedelta(minutes=int(os.environ.get("LITMODEL_DIST_TIMEOUT_MIN", 30)))
            if env.kind == "launch":
                store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, False, timeout=timeout)
                dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
            else:
                os.environ.setdefault("MASTER_ADDR", env.master_addr)
                os.environ.setdefault("MASTER_PORT", str(env.master_port))
                dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                        timeout=timeout)
            self._owns_pg = True
            atexit.register(_destroy_process_group)  # exiting with a live gloo/nccl group can abort
        elif self._world_size == 1 and self._strategy_name == "fsdp" and not dist.is_initialized():
            # FSDP needs a process group even for one process: an in-memory store, no networking.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self._owns_pg = True
        if self._world_size > 1 and dist.get_world_size() != self._world_size:
            raise LitModelError(f"the running process group has {dist.get_world_size()} ranks but this Fabric "
                                f"expects {self._world_size}")
        if self._precision.name == "16-mixed":
            if self._strategy_name == "fsdp":
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self._scaler = ShardedGradScaler(device=self._device.type)
            else:
                self._scaler = torch.amp.GradScaler(self._device.type)
        self._launched = True

    def _require_launched(self) -> None:
        if not self._launched:
            if self._world_size > 1 and self._env is None:
                raise LitModelError("this Fabric runs several processes: call fabric.launch(fn) and use it inside fn")
            self._join(self._env)

    def teardown(self) -> None:
        """Close loggers and destroy the process group this Fabric created."""
        for logger in self._loggers:
            logger.finalize()
        if self._owns_pg and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_pg = False

    # ---------------------------------------------------------------- model setup
    @contextlib.contextmanager
    def init_module(self, empty_init: bool | None = None) -> Iterator[None]:
        """Build the model inside: on ``fabric.device`` (in the precision's dtype for *-true), or with
        ``empty_init=True`` on the meta device (no memory) so ``setup`` allocates only this rank's
        shards and re-initialises them. ``None``: meta for fsdp, real device otherwise."""
        self._require_launched()
        if empty_init is None:
            empty_init = self._strategy_name == "fsdp"
        device = torch.device("meta") if empty_init else self._device
        dtype = self._precision.param_dtype
        previous = torch.get_default_dtype()
        if dtype is not None:
            torch.set_default_dtype(dtype)
        try:
            with device:
                yield
        finally:
            torch.set_default_dtype(previous)

    def setup(self, module: nn.Module, *optimizers: torch.optim.Optimizer, move_to_device: bool = True):
        """Place/shard ``module`` and return ``FabricModule`` (and the optimizers, re-pointed at the
        placed parameters when setup replaced them, e.g. FSDP's DTensor shards or meta->real)."""
        model = self.setup_module(module, move_to_device=move_to_device, _optimizers=optimizers)
        return (model, *optimizers) if optimizers else model

    def setup_module(self, module: nn.Module, move_to_device: bool = True, _optimizers: tuple = ()) -> FabricModule:
        self._require_launched()
        if isinstance(module, FabricModule):
            raise LitModelError("this model was already set up by fabric.setup; pass the original model once")
        names = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), _clean_name(name))
        for opt in _optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) not in names:
                        raise LitModelError("an optimizer passed to fabric.setup holds a parameter that is not part of "
                                            "the model; build it from model.parameters()")
        on_meta = any(t.is_meta for t in [*module.parameters(), *module.buffers()])
        ties = _shared_parameters(module)  # to_empty gives each holder its own copy: re-tied below
        dtype = self._precision.param_dtype
        if dtype is not None and any(t.is_floating_point() and t.dtype != dtype
                                     for t in [*module.parameters(), *module.buffers()]):
            module.to(dtype)  # (skipped when already there: .to(dtype) would dequantize NF4 weights, see litmodel/nf4.py)
        if self.activation_checkpointing:
            self._apply_activation_checkpointing(module)
        forward_module = module
        if self._strategy_name == "fsdp":
            self._shard(module)
            if on_meta:
                offload = self._strategy.cpu_offload and self._device.type == "cuda"
                module.to_empty(device="cpu" if offload else self._device)
                _retie(module, ties)
                if self._device.type == "cpu":
                    # DTensor has no RNG offset tracker on CPU: every shard would draw the same values.
                    # Seed by the shard's index (replicas of a hybrid mesh share it, so they stay equal).
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(torch.initial_seed() + 1_000_003 * self._mesh.get_local_rank("shard"))
                        self._reinitialize(module)
                else:
                    self._reinitialize(module)
        else:
            if on_meta:
                module.to_empty(device=self._device)
                _retie(module, ties)
                self._reinitialize(module)
            elif move_to_device:
                module.to(self._device)
            if self._strategy_name == "ddp":
                s = self._strategy
                extra = {"bucket_cap_mb": s.bucket_cap_mb} if s.bucket_cap_mb else {}
                forward_module = nn.parallel.DistributedDataParallel(
                    module, device_ids=[self._device.index] if self._device.type == "cuda" else None,
                    find_unused_parameters=s.find_unused_parameters, static_graph=s.static_graph, **extra)
        for opt in _optimizers:
            self._repoint_optimizer(opt, module, names)
        self._setup_optimizers(_optimizers)
        self._modules.append(module)
        return FabricModule(forward_module, module, self._precision)

    def setup_optimizers(self, *optimizers: torch.optim.Optimizer):
        """Register optimizers built from an already set-up model's parameters."""
        self._require_launched()
        if self._strategy_name == "fsdp":
            from torch.distributed.tensor import DTensor

            for opt in optimizers:
                if any(not isinstance(p, DTensor) for g in opt.param_groups for p in g["params"]):
                    raise LitModelError("with strategy='fsdp' create the optimizer after fabric.setup(model) from the "
                                        "set-up model's parameters, or pass it as fabric.setup(model, optimizer)")
        self._setup_optimizers(optimizers)
        return optimizers[0] if len(optimizers) == 1 else optimizers

    def _setup_optimizers(self, optimizers) -> None:
        if self._scaler is None:
            return
        for opt in optimizers:
            def guard(optimizer, args, kwargs):
                if not self._stepping:
                    raise LitModelError("with precision='16-mixed' call fabric.step(optimizer) instead of "
                                        "optimizer.step() (the gradients are scaled)")
            opt.register_step_pre_hook(guard)

    def _repoint_optimizer(self, opt: torch.optim.Optimizer, module: nn.Module, names: dict) -> None:
        current = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            current.setdefault(_clean_name(name), p)
        changed = False
        for group in opt.param_groups:
            new = [current[names[id(p)]] for p in group["params"]]
            changed |= any(a is not b for a, b in zip(new, group["params"]))
            group["params"] = new
        if changed and len(opt.state):
            raise LitModelError("the optimizer already has state (it has stepped) but setup replaced the parameters; "
                                "create the optimizer before any step, or after fabric.setup(model)")

    def _apply_activation_checkpointing(self, module: nn.Module) -> None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

        blocks = getattr(module, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise LitModelError("activation_checkpointing needs the model's transformer blocks in `model.blocks` "
                                "(an nn.ModuleList)")
        for i, block in enumerate(blocks):
            if not type(block).__name__ == "CheckpointWrapper":
                blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)

    def _shard(self, module: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        s: FSDPStrategy = self._strategy
        if self._mesh is None:
            if s.sharding_strategy == "hybrid":
                shard = s.shard_size or self.devices
                self._mesh = init_device_mesh(self._device.type, (self._world_size // shard, shard),
                                              mesh_dim_names=("replicate", "shard"))
            else:
                self._mesh = init_device_mesh(self._device.type, (self._world_size,), mesh_dim_names=("shard",))
        mp = (MixedPrecisionPolicy(param_dtype=self._precision.autocast_dtype, reduce_dtype=torch.float32)
              if self._precision.autocast_dtype is not None else MixedPrecisionPolicy())
        if s.cpu_offload and self._device.type != "cuda":
            warnings.warn("FSDP cpu_offload has no effect with accelerator='cpu'")
        offload = CPUOffloadPolicy() if s.cpu_offload and self._device.type == "cuda" else OffloadPolicy()
        kw = dict(mesh=self._mesh, mp_policy=mp, offload_policy=offload)
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for block in blocks:
                fully_shard(block, reshard_after_forward=s.reshard_after_forward, **kw)
        else:
            warnings.warn("the model has no `blocks` ModuleList: FSDP shards it as a single unit")
        fully_shard(module, **kw)

    @staticmethod
    def _reinitialize(module: nn.Module) -> None:
        with torch.no_grad():
            if hasattr(module, "init_weights"):
                module.init_weights()
            else:
                for m in module.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
            if hasattr(module, "reset_buffers"):
                module.reset_buffers()

    def setup_dataloaders(self, *dataloaders: DataLoader, use_distributed_sampler: bool = True,
                          move_to_device: bool = True):
        """Wrap loaders in ``FabricDataLoader``. A map-style loader with a plain sequential/random
        sampler gets a seeded ``DistributedSampler`` (seed from ``seed_everything``, else 0; shuffled
        when the original was random), also with one process, so the order is reproducible and resumable."""
        self._require_launched()
        out = []
        for dl in dataloaders:
            if use_distributed_sampler and not isinstance(dl.dataset, IterableDataset) \
                    and type(dl.batch_sampler) is BatchSampler \
                    and isinstance(dl.sampler, (SequentialSampler, RandomSampler, DistributedSampler)):
                shuffle = isinstance(dl.sampler, RandomSampler) or getattr(dl.sampler, "shuffle", False)
                sampler = _ResumableSampler(dl.dataset, num_replicas=self._world_size, rank=self.global_rank,
                                            shuffle=shuffle, seed=self._seed or 0, drop_last=False)
                kw = dict(batch_size=dl.batch_size, num_workers=dl.num_workers, collate_fn=dl.collate_fn,
                          pin_memory=dl.pin_memory, drop_last=dl.drop_last, timeout=dl.timeout,
                          worker_init_fn=dl.worker_init_fn, generator=dl.generator,
                          persistent_workers=dl.persistent_workers)
                if dl.num_workers > 0:
                    kw.update(prefetch_factor=dl.prefetch_factor, multiprocessing_context=dl.multiprocessing_context)
                dl = DataLoader(dl.dataset, sampler=sampler, **kw)
            out.append(FabricDataLoader(dl, self._device if move_to_device else None))
        return out[0] if len(out) == 1 else out

    def to_device(self, obj: Any) -> Any:
        self._require_launched()
        if isinstance(obj, nn.Module):
            return obj.to(self._device)
        return apply_to_tensors(obj, lambda t: t.to(self._device))

    # ---------------------------------------------------------------- training step
    def autocast(self):
        """The precision's autocast context (the set-up model's forward already runs under it)."""
        return self._precision.forward_context()

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self._scaler is not None:
            loss = self._scaler.scale(loss)
        loss.backward(*args, **kwargs)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()`` through the gradient scaler (16-mixed); required with 16-mixed."""
        if self._scaler is None:
            optimizer.step()
            return
        self._stepping = True
        try:
            self._scaler.step(optimizer)
            self._scaler.update()
        finally:
            self._stepping = False

    @contextlib.contextmanager
    def _allow_step(self) -> Iterator[None]:
        previous, self._stepping = self._stepping, True
        try:
            yield
        finally:
            self._stepping = previous

    def clip_gradients(self, module: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None = None,
                       clip_val: float | None = None, norm_type: float = 2.0,
                       error_if_nonfinite: bool = False) -> torch.Tensor | None:
        """Clip by global norm (returns the norm before clipping, over all shards) or by value."""
        if (max_norm is None) == (clip_val is None):
            raise LitModelError("clip_gradients needs exactly one of max_norm or clip_val")
        if self._scaler is not None:
            self._scaler.unscale_(optimizer)
        params = [p for p in _unwrap(module).parameters() if p.grad is not None]
        if clip_val is not None:
            torch.nn.utils.clip_grad_value_(params, clip_val)
            return None
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type, error_if_nonfinite)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    @contextlib.contextmanager
    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Iterator[None]:
        """Skip the gradient all-reduce/reduce-scatter for accumulating micro-batches. Run both the
        forward and the backward inside; the first step outside synchronises the accumulated sum."""
        if not enabled or self._world_size == 1 and self._strategy_name != "fsdp":
            yield
            return
        outer = module
        while not isinstance(outer, FabricModule) and isinstance(getattr(outer, "_orig_mod", None), nn.Module):
            outer = outer._orig_mod  # torch.compile(fabric_module): the DDP wrapper is inside
        forward_module = outer._forward_module if isinstance(outer, FabricModule) else outer
        if isinstance(forward_module, nn.parallel.DistributedDataParallel):
            with forward_module.no_sync():
                yield
            return
        inner = _unwrap(module)
        if hasattr(inner, "set_requires_gradient_sync"):
            inner.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                inner.set_requires_gradient_sync(True)
            return
        yield

    # ---------------------------------------------------------------- collectives
    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def all_reduce(self, data: torch.Tensor | float, op: str = "mean") -> torch.Tensor:
        ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if op not in ops:
            raise LitModelError(f"unknown all_reduce op {op!r}; choose one of {', '.join(ops)}")
        tensor = torch.as_tensor(data, device=self.device).clone()
        if not self._distributed():
            return tensor
        dist.all_reduce(tensor, op=ops[op])
        return tensor / dist.get_world_size() if op == "mean" else tensor

    def all_gather(self, data: torch.Tensor | float) -> torch.Tensor:
        """Returns a tensor of shape ``(world_size, *data.shape)``."""
        tensor = torch.as_tensor(data, device=self.device).contiguous()
        if not self._distributed():
            return tensor.unsqueeze(0)
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor)
        return torch.stack(out)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not self._distributed():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self._distributed():
            dist.barrier()

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_global_zero:
            print(*args, **kwargs)

    def seed_everything(self, seed: int, per_rank: bool = False) -> int:
        """Seed python/numpy/torch with ``seed`` (``+ global_rank`` when ``per_rank``); samplers made by
        ``setup_dataloaders`` afterwards use ``seed``."""
        self._seed = int(seed)
        return seed_everything(seed + (self.global_rank if per_rank else 0))

    def log_dict(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self.is_global_zero:
            for logger in self._loggers:
                logger.log_metrics(metrics, step)

    def log(self, name: str, value: Any, step: int | None = None) -> None:
        self.log_dict({name: value}, step)

    # ---------------------------------------------------------------- checkpoints
    def save(self, path: str | os.PathLike, state: Mapping[str, Any]) -> None:
        """Save modules, optimizers, anything with ``state_dict()`` and plain values (tensors, numbers,
        strings, lists, dicts). FSDP: a sharded DCP directory at ``path`` (each rank writes its shards);
        otherwise one ``torch.save`` file written by rank 0. Atomic: written beside ``path``, renamed
        when complete."""
        from litmodel.atomic import atomic_file

        path = Path(path)
        sharded = any(isinstance(v, nn.Module) and _is_fsdp(v) for v in state.values())
        payload = self._collect_state(state)
        if not sharded:
            if self.is_global_zero:
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
            self.barrier()
            return
        import torch.distributed.checkpoint as dcp

        tmp = None
        if self.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(self.broadcast(tmp))
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

        error = None
        try:
            dcp.save(payload, checkpoint_id=tmp)
        except (Exception, CheckpointException) as err:  # noqa: BLE001
            error = err
        failed = int(error is not None)
        if self._distributed():  # every rank must agree before anything is renamed
            failed = int(self.all_reduce(torch.tensor(failed), op="sum").item())
        if failed:
            if self.is_global_zero:
                shutil.rmtree(tmp, ignore_errors=True)
            self.barrier()
            cause = "on another rank"
            if isinstance(error, CheckpointException) and getattr(error, "failures", None):
                rank, wrapped = sorted(error.failures.items())[0]
                exc = wrapped[0] if isinstance(wrapped, tuple) else wrapped
                cause = f"on rank {rank}: {type(exc).__name__}: {exc}"
            elif error is not None:
                cause = f"{type(error).__name__}: {error}"
            raise LitModelError(f"saving {path} failed ({cause}); the previous checkpoint is untouched") from error
        self.barrier()
        if self.is_global_zero:
            swap_into_place(tmp, path)
        self.barrier()

    def _collect_state(self, state: Mapping[str, Any]) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        out = {}
        for key, value in state.items():
            if isinstance(value, nn.Module):
                out[key] = get_model_state_dict(_unwrap(value))
            elif isinstance(value, torch.optim.Optimizer):
                owner = self._owner(value, state)
                with self._allow_step():  # DSD may run a zero-lr step to create the optimizer state
                    out[key] = get_optimizer_state_dict(owner, value) if owner is not None else value.state_dict()
            elif hasattr(value, "state_dict") and callable(value.state_dict):
                out[key] = value.state_dict()
                _check_plain(out[key], key)
            else:
                _check_plain(value, key)
                out[key] = value
        return out

    def _owner(self, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> nn.Module | None:
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        candidates = [_unwrap(v) for v in state.values() if isinstance(v, nn.Module)] + self._modules
        for module in candidates:
            if ids <= {id(p) for p in module.parameters()}:
                return module
        return None

    def load(self, path: str | os.PathLike, state: dict | None = None, strict: bool = True) -> dict:
        """Load a checkpoint written by ``save`` (one file or a DCP directory, saved by any number of
        processes) into ``state`` in place: modules and optimizers get their state loaded, other
        objects ``load_state_dict``, plain values are replaced. Returns the checkpoint's items that
        ``state`` did not ask for (for DCP: plain values and tensors)."""
        path = Path(path)
        state = {} if state is None else state
        if not path.exists():
            raise LitModelError(f"checkpoint {path} does not exist; check the path")
        if path.is_dir():
            return self._load_dcp(path, state, strict)
        return self._load_file(path, state, strict)

    def _load_file(self, path: Path, state: dict, strict: bool) -> dict:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001
            raise LitModelError(f"cannot read checkpoint {path} ({str(err).splitlines()[0]}); is it a file saved by "
                                "fabric.save?") from err
        self._check_keys(state, ckpt.keys(), strict, path)
        for key, value in state.items():
            if key not in ckpt:
                continue
            if isinstance(value, nn.Module):
                module = _unwrap(value)
                _check_model_state(module, {f"{key}.{k}": v.shape for k, v in ckpt[key].items()}, key, strict)
                set_model_state_dict(module, ckpt[key], options=StateDictOptions(full_state_dict=_is_fsdp(module),
                                                                                 strict=strict))
            elif isinstance(value, torch.optim.Optimizer):
                owner = self._owner(value, state)
                osd = ckpt[key]
                fqn_keyed = any(isinstance(p, str) for g in osd.get("param_groups", []) for p in g.get("params", []))
                if owner is None or not fqn_keyed:
                    value.load_state_dict(osd)
                else:
                    with self._allow_step():
                        set_optimizer_state_dict(owner, value, osd,
                                                 options=StateDictOptions(full_state_dict=_is_fsdp(owner)))
            elif hasattr(value, "load_state_dict") and callable(value.load_state_dict):
                value.load_state_dict(ckpt[key])
            else:
                state[key] = ckpt[key]
        return {k: v for k, v in ckpt.items() if k not in state}

    def _load_dcp(self, path: Path, state: dict, strict: bool) -> dict:
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

        self._check_keys({k: v for k, v in state.items() if not empty(v)}, top.keys(), strict, path)
        wanted = {k: v for k, v in state.items() if k in top}
        stateful = {k: v for k, v in wanted.items() if hasattr(v, "state_dict") or isinstance(v, nn.Module)}
        payload = self._collect_state(stateful)
        for key, value in stateful.items():
            if isinstance(value, nn.Module):
                shapes = {fqn: md.size for fqn, md in metadata.state_dict_metadata.items()
                          if fqn in top[key] and isinstance(md, TensorStorageMetadata)}
                _check_model_state(_unwrap(value), shapes, key, strict)
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
                     no_dist=not self._distributed())
        for key, value in wanted.items():
            if isinstance(value, nn.Module):
                set_model_state_dict(_unwrap(value), payload[key])
            elif isinstance(value, torch.optim.Optimizer):
                owner = self._owner(value, state)
                if owner is not None:
                    with self._allow_step():
                        set_optimizer_state_dict(owner, value, payload[key])
                else:
                    value.load_state_dict(payload[key])
            elif hasattr(value, "load_state_dict") and callable(value.load_state_dict):
                value.load_state_dict(payload[key])
            else:
                state[key] = payload[key]
        return {k: payload[k] for k in extras if k in payload}

    @staticmethod
    def _check_keys(state: Mapping[str, Any], available, strict: bool, path: Path) -> None:
        missing = [k for k in state if k not in set(available)]
        if missing and strict:
            raise LitModelError(f"checkpoint {path} has no {', '.join(map(repr, missing))}; it holds "
                                f"{', '.join(map(repr, available))} (pass strict=False to skip missing items)")

    def load_raw(self, source: str | os.PathLike | Mapping[str, torch.Tensor], module: nn.Module,
                 strict: bool = True) -> None:
        """Load a plain full model state dict (a dict, a ``torch.save`` file or a ``.safetensors`` file,
        e.g. a converted Hugging Face checkpoint) into a set-up (possibly FSDP-sharded) model; each
        rank keeps only its shards (and from a ``.safetensors`` file reads only them, one tensor at a
        time: build the model with ``init_module(empty_init=True)`` so no rank ever holds it whole)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if isinstance(source, Mapping):
            sd = source
        else:
            source = Path(source)
            if not source.is_file():
                raise LitModelError(f"weights file {source} does not exist; check the path")
            if source.suffix == ".safetensors":  # tensor by tensor, each rank reading only its shards
                from litmodel.fabric.sharded_load import load_safetensors_sharded

                missing = load_safetensors_sharded(_unwrap(module), source, strict=strict)
                if strict and missing:
                    raise LitModelError(f"{source} has no tensor {missing[0]!r} ({len(missing)} missing in all); "
                                        "load a checkpoint of the same model, or pass strict=False")
                return
            else:
                sd = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        module = _unwrap(module)
        _check_model_state(module, {f"model.{k}": v.shape for k, v in sd.items()}, "model", strict)
        options = StateDictOptions(full_state_dict=_is_fsdp(module), strict=strict)
        set_model_state_dict(module, dict(sd), options=options)


def _shared_parameters(module: nn.Module) -> list[list[str]]:
    """Names of parameters held by several modules (tied embeddings and head), grouped per parameter."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(module: nn.Module, ties: list[list[str]]) -> None:
    """Point every holder of a shared parameter at the first holder's (new) parameter again."""
    for first, *others in ties:
        owner, _, attr = first.rpartition(".")
        param = getattr(module.get_submodule(owner), attr)
        for name in others:
            holder, _, attr = name.rpartition(".")
            setattr(module.get_submodule(holder), attr, param)
