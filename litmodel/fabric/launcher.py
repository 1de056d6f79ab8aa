"""Processes of a job: starting one per device on this machine and supervising them (``Fabric.launch``), and
joining the process group of a job (spawned here, or started by torchrun/srun)."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from litmodel.fabric.environment import ClusterEnv, detect_cluster_env
from litmodel.utils import LitModelError, tune_allocator

if TYPE_CHECKING:
    from litmodel.fabric.core import Fabric


class WorkerError(LitModelError):
    """A launched worker failed; ``rank`` and ``exc_type`` say which and how (traceback on stderr)."""

    def __init__(self, message: str, rank: int, exc_type: str = "") -> None:
        super().__init__(message)
        self.rank, self.exc_type = rank, exc_type


def spawn_and_supervise(fabric: Fabric, fn: Callable, args: tuple, kwargs: dict) -> Any:
    """Run ``fn(fabric, *args, **kwargs)`` in ``fabric.world_size`` spawned processes; return rank 0's result,
    or stop them all and raise ``WorkerError`` when one fails."""
    world = fabric.world_size
    # The launcher hosts the rendezvous store itself: no free-port race with other jobs.
    store = dist.TCPStore("127.0.0.1", 0, world, True, timeout=datetime.timedelta(minutes=10), wait_for_workers=False)
    run_dir = tempfile.mkdtemp(prefix="litmodel-launch-")
    ctx = mp.get_context("spawn")
    procs = []
    try:
        for rank in range(world):
            worker_args = (fabric, fn, args, kwargs, rank, world, store.port, run_dir, os.getpid())
            p = ctx.Process(target=_worker_main, args=worker_args, name=f"litmodel-rank-{rank}", daemon=False)
            p.start()
            procs.append(p)
        failed: list[int] = []
        while not failed and any(p.exitcode is None for p in procs):
            wait([p.sentinel for p in procs if p.exitcode is None], timeout=1.0)
            failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if failed:
            time.sleep(0.2)  # let simultaneously failing ranks write their reports
            error = _worker_error(procs, run_dir, failed)
            _stop(procs)
            raise error
        result_file = os.path.join(run_dir, "result.pt")
        return torch.load(result_file, weights_only=False) if os.path.exists(result_file) else None
    except BaseException:
        _stop(procs)
        raise
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        del store


def _stop(procs: list) -> None:
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.time() + 5
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
        if p.exitcode is None:
            p.kill()
            p.join()


def _worker_error(procs: list, run_dir: str, failed: list[int]) -> WorkerError:
    """Name the root cause among the failed ranks ``failed`` (exit codes read before stopping the rest)."""
    reports = {}
    for name in os.listdir(run_dir):
        if name.startswith("error-"):
            with contextlib.suppress(OSError, ValueError), open(os.path.join(run_dir, name)) as f:
                report = json.load(f)
                reports[report["rank"]] = report
    # a rank that died without a report (killed: out of memory, signal) is the cause; the others
    # usually fail on the broken connection afterwards
    for rank in failed:
        if rank not in reports:
            code = procs[rank].exitcode
            how = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            return WorkerError(f"rank {rank} {how} (out of memory? see the output above)", rank)
    first = min(reports.values(), key=lambda r: r["time"])
    if first["litmodel"]:
        return WorkerError(f"rank {first['rank']}: {first['message']}", first["rank"], first["type"])
    return WorkerError(f"rank {first['rank']} failed with {first['type']}: {first['message']} (traceback above)",
                       first["rank"], first["type"])


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the launching process dies (no orphaned ranks)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(fabric: Fabric, fn: Callable, args: tuple, kwargs: dict, rank: int, world_size: int,
                 port: int, run_dir: str, parent_pid: int) -> None:
    _die_with_parent()
    if os.getppid() != parent_pid:
        os._exit(1)
    if os.environ.get("LITMODEL_ALLOCATOR_TUNED") == "1":  # the launching entry point tuned its allocator
        tune_allocator()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), GROUP_RANK="0", NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LITMODEL_LAUNCHED="1")
    try:
        fabric.join(detect_cluster_env())
        result = fn(fabric, *args, **kwargs)
        if rank == 0:
            try:
                torch.save(result, os.path.join(run_dir, "result.pt"))
            except Exception as err:  # an unpicklable result is not worth failing the run
                warnings.warn(f"launch: rank 0's return value could not be sent back ({err})")
        fabric.barrier()
        fabric.teardown()
    except SystemExit as err:
        if err.code in (None, 0):
            os._exit(0)
        _report_and_die(err, rank, run_dir)
    except BaseException as err:  # noqa: BLE001 - report anything, then die without hanging
        _report_and_die(err, rank, run_dir)


def _report_and_die(err: BaseException, rank: int, run_dir: str) -> None:
    text = str(err).strip()
    info = {"rank": rank, "type": type(err).__name__, "message": text.splitlines()[0] if text else "",
            "litmodel": isinstance(err, LitModelError), "time": time.time()}
    with open(os.path.join(run_dir, f"error-{rank}.json"), "w") as f:
        json.dump(info, f)
    if not isinstance(err, LitModelError):  # the launcher prints a LitModelError's one line
        print(f"[rank {rank}] " + "".join(traceback.format_exception(err)), file=sys.stderr, end="")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def join_process_group(env: ClusterEnv | None, backend: str, world_size: int, single_process_group: bool) -> bool:
    """Create the default process group of the job ``env`` unless one is running; returns whether it was
    created here (its owner destroys it). One process gets a group only with ``single_process_group``
    (FSDP needs one): an in-memory store, no networking."""
    created = False
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=int(os.environ.get("LITMODEL_DIST_TIMEOUT_MIN", 30)))
        if env.kind == "launch":
            store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, False, timeout=timeout)
            dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", env.master_addr)
            os.environ.setdefault("MASTER_PORT", str(env.master_port))
            dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                    timeout=timeout)
        created = True
        atexit.register(_destroy_process_group)  # exiting with a live gloo/nccl group can abort
    elif world_size == 1 and single_process_group and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
    if world_size > 1 and dist.get_world_size() != world_size:
        raise LitModelError(f"the running process group has {dist.get_world_size()} ranks but this Fabric "
                            f"expects {world_size}")
    return created


def _destroy_process_group() -> None:
    with contextlib.suppress(Exception):
        if dist.is_initialized():
            dist.destroy_process_group()
