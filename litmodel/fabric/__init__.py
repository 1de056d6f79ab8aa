"""A small Fabric-like runtime on plain ``torch.distributed``.

``Fabric`` launches processes (or joins the ones ``torchrun``/``srun`` started), places the model
(single device, DDP, or FSDP2 ``fully_shard`` per transformer block), runs the forward under the
chosen precision, and saves/loads training state (one file, or a sharded
``torch.distributed.checkpoint`` directory under FSDP). See the README, "Distributed training with litmodel.fabric".

Modules: ``core`` (the Fabric class: launch, setup, step, collectives, logging), ``checkpoint``
(save/load/load_raw, DCP directories, consolidation), ``environment`` (accelerator/devices options,
torchrun/SLURM detection), ``launcher`` (spawning and supervising local workers, joining the process
group), ``strategies`` (DDP/FSDP2 options and model placement), ``wrappers`` (FabricModule,
FabricDataLoader, RNG), ``sharded_load`` (each rank reading only its shards from safetensors).
"""

from litmodel.fabric.checkpoint import consolidate_checkpoint, load_full_model_state
from litmodel.fabric.core import Fabric
from litmodel.fabric.environment import ACCELERATORS, ClusterEnv, detect_cluster_env
from litmodel.fabric.launcher import WorkerError
from litmodel.fabric.strategies import STRATEGIES, DDPStrategy, FSDPStrategy
from litmodel.fabric.wrappers import (FabricDataLoader, FabricModule, capture_rng_state, restore_rng_state,
                                      seed_everything)
from litmodel.loggers import CSVLogger, Logger, TensorBoardLogger
from litmodel.precision import PRECISIONS

__all__ = [
    "Fabric", "DDPStrategy", "FSDPStrategy", "FabricModule", "FabricDataLoader", "ClusterEnv",
    "detect_cluster_env", "consolidate_checkpoint", "load_full_model_state", "capture_rng_state",
    "restore_rng_state", "seed_everything", "CSVLogger", "TensorBoardLogger", "Logger", "WorkerError",
    "ACCELERATORS", "STRATEGIES", "PRECISIONS",
]
