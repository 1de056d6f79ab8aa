"""Where a Fabric runs: the accelerator and device options (checked), and the job this process belongs to
(torchrun, SLURM, or ``Fabric.launch``) read from its environment variables."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from litmodel.utils import LitModelError


ACCELERATORS = ("auto", "cpu", "cuda")


CPU_PROCESSES_PER_CORE = 4  # cpu: at most 4 processes per core (more is a typo, not a plan)


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


def check_accelerator(accelerator: str) -> str:
    """``accelerator`` as "cpu" or "cuda" ("gpu" means cuda; "auto": cuda when a GPU is available)."""
    if accelerator == "gpu":
        accelerator = "cuda"
    if accelerator not in ACCELERATORS:
        raise LitModelError(f"unknown accelerator {accelerator!r}; choose one of {', '.join(ACCELERATORS)}")
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise LitModelError("accelerator='cuda' but no CUDA GPU is available; use accelerator='cpu'")
    return accelerator


def resolve_devices(accelerator: str, devices: int | str, num_nodes: int,
                    env: ClusterEnv | None) -> tuple[int, ClusterEnv | None]:
    """Check ``devices`` x ``num_nodes`` against this machine and the job ``env`` that started this process.
    Returns the number of devices ("auto" resolved) and the job to join (None: ``launch`` starts the processes)."""
    if not isinstance(num_nodes, int) or num_nodes < 1:
        raise LitModelError(f"num_nodes must be a positive integer, got {num_nodes!r}")
    if devices == "auto":
        devices = (env.local_world_size if env else torch.cuda.device_count() if accelerator == "cuda" else 1)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise LitModelError(f"devices must be a positive integer or 'auto', got {devices!r}")
    if accelerator == "cuda" and devices > torch.cuda.device_count():
        raise LitModelError(f"devices={devices} but this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                            f"use devices<={torch.cuda.device_count()}")
    max_cpu = cpu_count() * CPU_PROCESSES_PER_CORE
    if accelerator == "cpu" and devices > max_cpu:
        raise LitModelError(f"devices={devices} CPU processes but this machine has {cpu_count()} core(s); "
                            f"use devices<={max_cpu} (at most {CPU_PROCESSES_PER_CORE} per core)")
    if env is not None:
        if env.kind == "slurm" and env.world_size == 1 and num_nodes == 1:
            env = None  # one SLURM task asking for several devices: launch them ourselves
        elif env.world_size != devices * num_nodes:
            hint = ("srun --ntasks-per-node" if env.kind == "slurm" else "torchrun --nproc_per_node")
            raise LitModelError(
                f"{env.kind} started {env.world_size} processes but Fabric was asked for "
                f"devices={devices} x num_nodes={num_nodes}; make {hint} equal devices and the node count "
                "equal num_nodes")
    elif num_nodes > 1:
        raise LitModelError(f"num_nodes={num_nodes} needs the processes started on every node by torchrun or "
                            "srun; see the README section on multi-node training")
    return devices, env


def select_device(accelerator: str, env: ClusterEnv | None) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` (made current), or the CPU, its cores shared among the
    processes of this node."""
    if accelerator == "cuda":
        device = torch.device("cuda", env.local_rank if env else 0)
        torch.cuda.set_device(device)
        return device
    local_world = env.local_world_size if env else 1
    if local_world > 1:
        torch.set_num_threads(max(1, cpu_count() // local_world))
    return torch.device("cpu")


def is_distributed() -> bool:
    """Whether this process is one of several in a running process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def cpu_count() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
