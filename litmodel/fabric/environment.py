"""Configuration pieces of the Fabric runtime: valid options, strategies, cluster environments."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Mapping

from litmodel.utils import LitModelError


ACCELERATORS = ("auto", "cpu", "cuda")


STRATEGIES = ("auto", "single", "ddp", "fsdp")


_CPU_PROCESSES_PER_CORE = 4  # cpu: at most 4 processes per core (more is a typo, not a plan)


class WorkerError(LitModelError):
    """A launched worker failed; ``rank`` and ``exc_type`` say which and how (traceback on stderr)."""

    def __init__(self, message: str, rank: int, exc_type: str = "") -> None:
        super().__init__(message)
        self.rank, self.exc_type = rank, exc_type


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


@dataclass
class ClusterEnv:
    """Where this process sits in a job started by torchrun, srun or ``Fabric.launch``."""

    kind: str  # "torchrun" | "slurm" | "launch"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM hostlist such as ``gpu[003-005,9],cpu1`` -> ``gpu003``."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def detect_cluster_env(environ: Mapping[str, str] | None = None) -> ClusterEnv | None:
    """Read torchrun / ``Fabric.launch`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``...) or SLURM
    (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURM_NODELIST``) variables.

    torchrun's variables win over SLURM's (torchrun inside an sbatch job). An interactive SLURM
    shell (``srun --pty bash``, job name ``bash``/``interactive``) is not treated as a SLURM job.
    Returns None outside any of them.
    """
    env = os.environ if environ is None else environ
    try:
        if "RANK" in env and "WORLD_SIZE" in env:
            world = int(env["WORLD_SIZE"])
            rank = int(env["RANK"])
            local_rank = int(env.get("LOCAL_RANK", rank))
            local_world = int(env.get("LOCAL_WORLD_SIZE", world))
            node_rank = int(env.get("GROUP_RANK", env.get("NODE_RANK", rank // max(local_world, 1))))
            kind = "launch" if env.get("LITMODEL_LAUNCHED") == "1" else "torchrun"
            return ClusterEnv(kind, rank, world, local_rank, local_world, node_rank,
                              env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
            world = int(env["SLURM_NTASKS"])
            num_nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", 1)))
            local_world = int(env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or max(world // max(num_nodes, 1), 1))
            nodelist = env.get("SLURM_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
            job_id = re.sub(r"\D", "", env.get("SLURM_JOB_ID", "")) or "0"
            port = int(env.get("MASTER_PORT", 15000 + int(job_id[-4:])))
            return ClusterEnv("slurm", int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), local_world,
                              int(env.get("SLURM_NODEID", 0)), env.get("MASTER_ADDR", _first_slurm_host(nodelist)),
                              port)
    except ValueError as err:
        raise LitModelError(f"malformed distributed environment variable ({err}); check the torchrun/srun command")
    return None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
