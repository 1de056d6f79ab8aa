"""What ``Fabric.setup*`` returns and how it runs: the module and data-loader wrappers, RNG helpers."""

from __future__ import annotations

import random
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import (BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler,
                              SequentialSampler)

from litmodel.precision import Precision
from litmodel.utils import apply_to_tensors

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


class FabricModule(nn.Module):
    """What ``fabric.setup`` returns: runs the forward under the precision's autocast, forwards
    attribute access (``model.config``, ``model.set_kv_cache``...) to the original model, and
    gives the original model's ``state_dict``/``named_parameters`` (no ``module.`` prefixes).
    ``.module`` is the original (for FSDP: the sharded) model."""

    def __init__(self, forward_module: nn.Module, original_module: nn.Module, precision: Precision) -> None:
        super().__init__()
        self._forward_module = forward_module
        self._original_module = original_module
        self._precision = precision

    @property
    def module(self) -> nn.Module:
        return self._original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._precision.convert_input((args, kwargs))
        with self._precision.forward_context():
            out = self._forward_module(*args, **kwargs)
        return self._precision.convert_output(out)

    def state_dict(self, *args: Any, **kwargs: Any):
        return self._original_module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any):
        return self._original_module.load_state_dict(*args, **kwargs)

    def named_parameters(self, *args: Any, **kwargs: Any):  # names as in the original model
        for name, p in self._original_module.named_parameters(*args, **kwargs):
            yield clean_name(name), p

    def named_buffers(self, *args: Any, **kwargs: Any):
        for name, b in self._original_module.named_buffers(*args, **kwargs):
            yield clean_name(name), b

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("_original_module"), name)


def unwrap(module: nn.Module) -> nn.Module:
    """The original model inside ``FabricModule``, DDP and ``torch.compile`` wrappers."""
    while True:
        if isinstance(module, FabricModule):
            module = module._original_module
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):  # torch.compile
            module = module._orig_mod
        else:
            return module


def clean_name(name: str) -> str:
    """A parameter name without the prefixes wrappers add (activation checkpointing, compile, FSDP1)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def is_fsdp(module: nn.Module) -> bool:
    """Whether FSDP2 sharded ``module`` or a part of it."""
    # deferred: torch.distributed.fsdp (with torch.distributed.tensor) adds ~1.5 s to `import litmodel.fabric`
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in unwrap(module).modules())


class ResumableSampler(DistributedSampler):
    """A seeded ``DistributedSampler`` that can skip the first ``skip`` samples once (resume)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


def with_resumable_sampler(dl: DataLoader, world_size: int, rank: int, seed: int) -> DataLoader:
    """``dl`` rebuilt with a seeded ``ResumableSampler`` (shuffled when the original sampler was random) if it
    is map-style with a plain sequential/random/distributed sampler; any other loader as it is."""
    if isinstance(dl.dataset, IterableDataset) or type(dl.batch_sampler) is not BatchSampler \
            or not isinstance(dl.sampler, (SequentialSampler, RandomSampler, DistributedSampler)):
        return dl
    shuffle = isinstance(dl.sampler, RandomSampler) or getattr(dl.sampler, "shuffle", False)
    sampler = ResumableSampler(dl.dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                               drop_last=False)
    kw = dict(batch_size=dl.batch_size, num_workers=dl.num_workers, collate_fn=dl.collate_fn,
              pin_memory=dl.pin_memory, drop_last=dl.drop_last, timeout=dl.timeout,
              worker_init_fn=dl.worker_init_fn, generator=dl.generator, persistent_workers=dl.persistent_workers)
    if dl.num_workers > 0:
        kw.update(prefetch_factor=dl.prefetch_factor, multiprocessing_context=dl.multiprocessing_context)
    return DataLoader(dl.dataset, sampler=sampler, **kw)


class FabricDataLoader:
    """Wraps a DataLoader: sets the sampler's epoch, moves batches to the device, and keeps a
    resumable position. ``state_dict()`` is ``{"epoch", "batches_yielded", "samples_yielded",
    "seed"}`` (``samples_yielded`` counts all ranks' samples; ``seed`` is the shuffle seed, restored
    on load). Put the loader itself in the state given to ``fabric.save``/``fabric.load``: the next
    ``iter()`` continues after the last batch handed out, skipping at the sampler level (no data is
    read), also with another number of processes or another batch size (the position is kept in
    global samples). Other loaders skip ``batches_yielded`` batches by iterating."""

    def __init__(self, dataloader: DataLoader, device: torch.device | None) -> None:
        self.dataloader = dataloader
        self.device = device
        self.epoch = 0
        self.batches_yielded = 0
        self._resume: dict | None = None

    def __len__(self) -> int:
        return len(self.dataloader)

    @property
    def sampler(self):
        return self.dataloader.sampler

    def _samples_per_batch(self) -> int | None:
        sampler, bs = self.dataloader.sampler, self.dataloader.batch_size
        if isinstance(sampler, ResumableSampler) and bs is not None:
            return bs * sampler.num_replicas
        return None

    def __iter__(self) -> Iterator[Any]:
        sampler = self.dataloader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        resume, self._resume = self._resume, None
        skip_batches = 0
        if resume:
            per_batch = self._samples_per_batch()
            if per_batch and resume.get("samples_yielded") is not None:
                local = int(resume["samples_yielded"]) // sampler.num_replicas
                sampler.skip = local
                self.batches_yielded = -(-local // self.dataloader.batch_size)
            else:
                skip_batches = self.batches_yielded = int(resume["batches_yielded"])
        else:
            self.batches_yielded = 0
        iterator = iter(self.dataloader)
        for _ in range(skip_batches):
            next(iterator, None)
        for batch in iterator:
            self.batches_yielded += 1
            yield apply_to_tensors(batch, self._move) if self.device is not None else batch
        self.epoch += 1
        self.batches_yielded = 0

    def _move(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=self.device.type == "cuda")

    def state_dict(self) -> dict:
        per_batch = self._samples_per_batch()
        samples = self.batches_yielded * per_batch if per_batch else None
        seed = getattr(self.dataloader.sampler, "seed", None)
        if self._resume is not None:  # loaded but not iterated yet: keep the loaded position
            return dict(self._resume, epoch=self.epoch, seed=seed)
        return {"epoch": self.epoch, "batches_yielded": self.batches_yielded, "samples_yielded": samples, "seed": seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_yielded = int(state["batches_yielded"])
        self._resume = {"batches_yielded": self.batches_yielded, "samples_yielded": state.get("samples_yielded")}
        if state.get("seed") is not None and isinstance(self.dataloader.sampler, ResumableSampler):
            self.dataloader.sampler.seed = int(state["seed"])  # the saved shuffle order wins


def seed_everything(seed: int) -> int:
    """Seed python ``random``, numpy and torch (all devices)."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def _local_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_local(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def capture_rng_state() -> dict:
    """RNG states of python, numpy, torch (and cuda) as tensors/lists: safe for ``weights_only`` loads.

    Under a process group of several ranks it is collective (call it on every rank): the result
    holds every rank's state, ``{"ranks": [state_of_rank_0, ...]}``, the same on all ranks, so a
    checkpoint written by rank 0 (or deduplicated by DCP) restores each rank's own stream."""
    state = _local_rng_state()
    rank, world = _rank_and_world()
    if world == 1:
        return state
    gathered: list = [None] * world
    dist.all_gather_object(gathered, state)
    return {"ranks": gathered}


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``capture_rng_state`` returned: each rank its own state. Resumed with more
    ranks than were saved, rank ``r`` continues from saved rank ``r % saved`` re-seeded by ``r``
    (so no two ranks draw the same numbers)."""
    if "ranks" not in state:
        _restore_local(state)
        return
    ranks = state["ranks"]
    rank, _ = _rank_and_world()
    _restore_local(ranks[rank % len(ranks)])
    if rank >= len(ranks):
        seed_everything(int(torch.randint(0, 2**31 - 1, ()).item()) + rank)
