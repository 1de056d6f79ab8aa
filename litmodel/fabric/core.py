"""The ``Fabric`` object: launching, model/optimizer/data setup, the training step, collectives and logging.

Its helpers live beside it: ``environment`` (options, torchrun/SLURM detection), ``launcher`` (spawning
workers, joining the process group), ``strategies`` (DDP/FSDP2 placement), ``wrappers`` (FabricModule,
FabricDataLoader, RNG), ``checkpoint`` (what ``save``/``load``/``load_raw`` do).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from litmodel.fabric.checkpoint import load_checkpoint, load_raw_weights, save_checkpoint
from litmodel.fabric.environment import (ClusterEnv, check_accelerator, detect_cluster_env, is_distributed,
                                         resolve_devices, select_device)
from litmodel.fabric.launcher import join_process_group, spawn_and_supervise
from litmodel.fabric.strategies import (DDPStrategy, FSDPStrategy, apply_activation_checkpointing,
                                        check_optimizers_hold, check_sharded_optimizers, check_strategy, fsdp_mesh,
                                        materialize, no_gradient_sync, parameter_names, repoint_optimizer,
                                        resolve_strategy, shard_fsdp, shared_parameters, total_grad_norm, wrap_ddp)
from litmodel.fabric.wrappers import FabricDataLoader, FabricModule, seed_everything, unwrap, with_resumable_sampler
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

    The contract (Lightning Fabric's names):
        launch(fn, *args)              start or join the processes, run ``fn(fabric, *args)`` in each
        init_module(empty_init)        build a model on the device (or meta) in the precision's dtype
        setup(model, *optimizers)      place/shard the model -> FabricModule (and the re-pointed optimizers);
            setup_module, setup_optimizers, setup_dataloaders, to_device
        autocast(), backward(loss), step(optimizer), clip_gradients(...), no_backward_sync(model)
        all_reduce, all_gather, broadcast, barrier     collectives (no-ops in one process)
        print, log, log_dict, seed_everything, teardown
        save(path, state), load(path, state), load_raw(source, model)     see ``fabric/checkpoint.py``
        world_size, global_rank, local_rank, node_rank, is_global_zero, device, strategy, precision, loggers
    For the helper modules: ``join(env)`` (each spawned worker), ``models`` and ``allow_optimizer_step()``
    (checkpointing).
    """

    def __init__(self, accelerator: str = "auto", devices: int | str = 1, num_nodes: int = 1,
                 strategy: str | DDPStrategy | FSDPStrategy = "auto", precision: str | int = "32-true",
                 loggers: Logger | list[Logger] | None = None, activation_checkpointing: bool = False) -> None:
        self.accelerator = check_accelerator(accelerator)
        precision = check_precision(precision)
        if self.accelerator == "cuda" and precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
            raise LitModelError(f"precision={precision!r} needs a GPU with bfloat16 support (Ampere or newer); "
                                "use precision='16-mixed' or '32-true'")
        self._precision = Precision(precision, self.accelerator)
        strategy = check_strategy(strategy)
        self.devices, self._env = resolve_devices(self.accelerator, devices, num_nodes, detect_cluster_env())
        self.num_nodes = num_nodes
        self._world_size = self.devices * num_nodes
        self._strategy = resolve_strategy(strategy, self._world_size, self.devices)
        self._strategy_name = self._strategy if isinstance(self._strategy, str) else self._strategy.name

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

    @property
    def models(self) -> list[nn.Module]:
        """The original models set up by this Fabric, in setup order."""
        return list(self._modules)

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
            self.join(self._env)
            return fn(self, *args, **kwargs) if fn is not None else None
        if fn is None:
            raise LitModelError(f"fabric.launch() without a function cannot start {self._world_size} processes; "
                                "pass the training function: fabric.launch(main, ...), or run under torchrun")
        return spawn_and_supervise(self, fn, args, kwargs)

    def join(self, env: ClusterEnv | None) -> None:
        """Take this process's place in the job ``env`` (None: one process): its device, the process group, the
        gradient scaler. ``launch`` calls it, and so does each worker process it spawns."""
        self._env = env
        self._device = select_device(self.accelerator, env)
        backend = "nccl" if self.accelerator == "cuda" else "gloo"
        if join_process_group(env, backend, self._world_size, single_process_group=self._strategy_name == "fsdp"):
            self._owns_pg = True
        if self._precision.name == "16-mixed":
            if self._strategy_name == "fsdp":
                # deferred: torch.distributed.fsdp (with torch.distributed.tensor) adds ~1.5 s to the import
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self._scaler = ShardedGradScaler(device=self._device.type)
            else:
                self._scaler = torch.amp.GradScaler(self._device.type)
        self._launched = True

    def _require_launched(self) -> None:
        if not self._launched:
            if self._world_size > 1 and self._env is None:
                raise LitModelError("this Fabric runs several processes: call fabric.launch(fn) and use it inside fn")
            self.join(self._env)

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
        names = parameter_names(module)
        check_optimizers_hold(_optimizers, names)
        on_meta = any(t.is_meta for t in [*module.parameters(), *module.buffers()])
        ties = shared_parameters(module)  # to_empty gives each holder its own copy: re-tied below
        dtype = self._precision.param_dtype
        if dtype is not None and any(t.is_floating_point() and t.dtype != dtype
                                     for t in [*module.parameters(), *module.buffers()]):
            module.to(dtype)  # (skipped when already there: .to(dtype) would dequantize NF4 weights, see litmodel/nf4.py)
        if self.activation_checkpointing:
            apply_activation_checkpointing(module)
        forward_module = module
        if self._strategy_name == "fsdp":
            if self._mesh is None:
                self._mesh = fsdp_mesh(self._strategy, self._device.type, self._world_size, self.devices)
            shard_fsdp(module, self._strategy, self._mesh, self._precision, self._device)
            if on_meta:
                offload = self._strategy.cpu_offload and self._device.type == "cuda"
                materialize(module, "cpu" if offload else self._device, ties,
                            shard_mesh=self._mesh if self._device.type == "cpu" else None)
        else:
            if on_meta:
                materialize(module, self._device, ties)
            elif move_to_device:
                module.to(self._device)
            if self._strategy_name == "ddp":
                forward_module = wrap_ddp(module, self._strategy, self._device)
        for opt in _optimizers:
            repoint_optimizer(opt, module, names)
        self._setup_optimizers(_optimizers)
        self._modules.append(module)
        return FabricModule(forward_module, module, self._precision)

    def setup_optimizers(self, *optimizers: torch.optim.Optimizer):
        """Register optimizers built from an already set-up model's parameters."""
        self._require_launched()
        if self._strategy_name == "fsdp":
            check_sharded_optimizers(optimizers)
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

    def setup_dataloaders(self, *dataloaders: DataLoader, use_distributed_sampler: bool = True,
                          move_to_device: bool = True):
        """Wrap loaders in ``FabricDataLoader``. A map-style loader with a plain sequential/random
        sampler gets a seeded ``DistributedSampler`` (seed from ``seed_everything``, else 0; shuffled
        when the original was random), also with one process, so the order is reproducible and resumable."""
        self._require_launched()
        out = []
        for dl in dataloaders:
            if use_distributed_sampler:
                dl = with_resumable_sampler(dl, self._world_size, self.global_rank, self._seed or 0)
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
    def allow_optimizer_step(self) -> Iterator[None]:
        """Let ``optimizer.step()`` run outside ``fabric.step`` (16-mixed forbids it): the zero-lr step that
        torch.distributed.checkpoint's state-dict helpers may take to create an optimizer's state."""
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
        params = [p for p in unwrap(module).parameters() if p.grad is not None]
        if clip_val is not None:
            torch.nn.utils.clip_grad_value_(params, clip_val)
            return None
        norm = total_grad_norm(params, norm_type, error_if_nonfinite)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    @contextlib.contextmanager
    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Iterator[None]:
        """Skip the gradient all-reduce/reduce-scatter for accumulating micro-batches. Run both the
        forward and the backward inside; the first step outside synchronises the accumulated sum."""
        if not enabled or self._world_size == 1 and self._strategy_name != "fsdp":
            yield
            return
        with no_gradient_sync(module):
            yield

    # ---------------------------------------------------------------- collectives
    def all_reduce(self, data: torch.Tensor | float, op: str = "mean") -> torch.Tensor:
        ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if op not in ops:
            raise LitModelError(f"unknown all_reduce op {op!r}; choose one of {', '.join(ops)}")
        tensor = torch.as_tensor(data, device=self.device).clone()
        if not is_distributed():
            return tensor
        dist.all_reduce(tensor, op=ops[op])
        return tensor / dist.get_world_size() if op == "mean" else tensor

    def all_gather(self, data: torch.Tensor | float) -> torch.Tensor:
        """Returns a tensor of shape ``(world_size, *data.shape)``."""
        tensor = torch.as_tensor(data, device=self.device).contiguous()
        if not is_distributed():
            return tensor.unsqueeze(0)
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor)
        return torch.stack(out)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not is_distributed():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if is_distributed():
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

    # ---------------------------------------------------------------- checkpoints (fabric/checkpoint.py)
    def save(self, path: str | os.PathLike, state: Mapping[str, Any]) -> None:
        """Save modules, optimizers, anything with ``state_dict()`` and plain values, atomically: one file
        written by rank 0, or under FSDP a sharded DCP directory each rank writes its shards to."""
        save_checkpoint(self, path, state)

    def load(self, path: str | os.PathLike, state: dict | None = None, strict: bool = True) -> dict:
        """Load what ``save`` wrote (by any number of processes) into ``state`` in place; returns the
        checkpoint's items ``state`` did not ask for."""
        return load_checkpoint(self, path, state, strict)

    def load_raw(self, source: str | os.PathLike | Mapping[str, torch.Tensor], module: nn.Module,
                 strict: bool = True) -> None:
        """Load a plain full model state dict (a dict, a ``torch.save`` or ``.safetensors`` file) into a set-up,
        possibly sharded, model; each rank keeps (and from safetensors reads) only its shards."""
        load_raw_weights(source, module, strict)
