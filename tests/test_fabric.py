"""Tests for litmodel.fabric: real 2-process gloo groups on CPU, compared against one process.

Two process groups (DDP, FSDP) each run many checks; everything else runs in this process.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from litmodel.fabric import (CSVLogger, Fabric, FSDPStrategy, TensorBoardLogger, capture_rng_state,
                             consolidate_checkpoint, detect_cluster_env, load_full_model_state, restore_rng_state)
from litmodel.fabric.environment import _first_slurm_host
from litmodel.utils import LitModelError

ROOT = Path(__file__).resolve().parents[1]
V, D, T, N_BLOCKS = 64, 32, 8, 2
CLIP = 0.5
LR = 1e-2


# ------------------------------------------------------------------------------------------ model
class Block(nn.Module):
    def __init__(self, d: int = D, n_head: int = 2) -> None:
        super().__init__()
        self.n_head = n_head
        self.norm_1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)  # a key bias has an exactly-zero gradient
        self.proj = nn.Linear(d, d)
        self.norm_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, C = x.shape
        q, k, v = self.qkv(self.norm_1(x)).view(B, S, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, S, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.norm_2(x))))


class TinyLM(nn.Module):
    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.wte = nn.Embedding(V, d)
        self.wpe = nn.Embedding(T, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(N_BLOCKS))
        self.norm_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, V, bias=False)
        self.register_buffer("pos", torch.arange(T), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(self.pos[: idx.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm_f(x))

    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def reset_buffers(self) -> None:
        self.pos = torch.arange(T, device=self.wte.weight.device)


def make_opt(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)


def make_data() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (64, T + 1), generator=g)


def initial_state() -> dict:
    torch.manual_seed(0)
    model = TinyLM()
    model.init_weights()
    return {k: v.clone() for k, v in model.state_dict().items()}


def new_model(init_state: dict) -> TinyLM:
    model = TinyLM()
    model.load_state_dict(init_state)
    return model


def loss_fn(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def run_steps(fabric, model, opt, it, steps, accum, phase=None):
    """``steps`` optimizer steps of ``accum`` micro-batches each; returns (global mean losses, norms)."""
    losses, norms = [], []
    for _ in range(steps):
        total = 0.0
        for micro in range(accum):
            (batch,) = next(it)
            syncing = micro == accum - 1
            if phase is not None:
                phase["now"] = "sync" if syncing else "accumulate"
            with fabric.no_backward_sync(model, enabled=not syncing):
                loss = loss_fn(model, batch)
                fabric.backward(loss / accum)
            total = total + loss.detach() / accum
        norms.append(fabric.clip_gradients(model, opt, max_norm=CLIP).item())
        fabric.step(opt)
        opt.zero_grad()
        losses.append(fabric.all_reduce(total, "mean").item())
    return losses, norms


def full_state(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().float().cpu().clone() for k, v in sd.items()}


def loader(fabric, data, batch_size):
    return fabric.setup_dataloaders(DataLoader(TensorDataset(data), batch_size=batch_size, shuffle=True))


def assert_states_close(a: dict, b: dict, atol=2e-5, rtol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


# ------------------------------------------------------------------------------------------ workers
def ddp_worker(fabric: Fabric, init_state: dict, data: torch.Tensor, out_dir: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    rank = fabric.global_rank
    # ranks, devices, threads, collectives
    assert (fabric.world_size, fabric.local_rank, fabric.node_rank) == (2, rank, 0)
    assert fabric.is_global_zero == (rank == 0) and fabric.device == torch.device("cpu")
    assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) // 2)
    assert fabric.all_reduce(torch.tensor(rank + 1.0), op="sum").item() == 3.0
    assert fabric.all_reduce(rank + 1.0).item() == 1.5
    assert fabric.all_reduce(torch.tensor(float(rank)), op="max").item() == 1.0
    assert fabric.all_gather(torch.tensor([rank, 10 + rank])).tolist() == [[0, 10], [1, 11]]
    assert fabric.broadcast({"from": rank}) == {"from": 0}
    fabric.barrier()

    fabric.seed_everything(42)
    model = new_model(init_state)
    opt = make_opt(model)  # created before setup: fine for DDP
    model, opt = fabric.setup(model, opt)
    assert isinstance(model._forward_module, nn.parallel.DistributedDataParallel)
    assert type(model.module.blocks[0]).__name__ == "CheckpointWrapper"
    phase, calls = {"now": None}, []

    def counting_hook(state, bucket):
        calls.append(phase["now"])
        return allreduce_hook(None, bucket)

    model._forward_module.register_comm_hook(None, counting_hook)
    it = iter(loader(fabric, data, 2))
    losses, norms = run_steps(fabric, model, opt, it, 4, 2, phase)
    assert calls.count("accumulate") == 0 and calls.count("sync") >= 4, calls
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # single-file save (rank 0) and load on every rank
    path = Path(out_dir) / "ddp.pt"
    fabric.save(path, {"model": model, "optimizer": opt, "step": 4})
    model2 = fabric.setup(TinyLM())
    opt2 = make_opt(model2)
    st = {"model": model2, "optimizer": opt2, "step": 0}
    fabric.load(path, st)
    assert st["step"] == 4
    for k, v in model2.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert dist.is_initialized()
    return {"losses": losses, "norms": norms, "state": state}


def fsdp_worker(fabric: Fabric, init_state: dict, data: torch.Tensor, ref_ckpt: str, out_dir: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.tensor import DTensor

    rank = fabric.global_rank
    out = Path(out_dir)
    result = {}

    # 1. meta-device init: only this rank's shards are allocated, then re-initialised
    with fabric.init_module(empty_init=True):
        meta = TinyLM()
    assert all(p.is_meta for p in meta.parameters())
    meta = fabric.setup(meta)
    for name, p in meta.named_parameters():
        assert isinstance(p, DTensor) and not p.is_meta, name
        assert p.to_local().shape[0] == math.ceil(p.shape[0] / 2) or p.shape[0] == 1, (name, p.to_local().shape)
    w = meta.module.blocks[0].fc.weight.to_local()
    assert 0.015 < w.std().item() < 0.025 and meta.module.norm_f.weight.to_local().eq(1).all()
    shards = fabric.all_gather(w[:2].contiguous())
    assert not torch.equal(shards[0], shards[1])  # each shard drew its own values
    assert torch.equal(meta.module.pos, torch.arange(T))  # reset_buffers ran
    loss_fn(meta, data[:2]).backward()

    # 2. full sharding + activation checkpointing + accumulation; optimizer made before setup is re-pointed
    fabric.seed_everything(42)
    model = new_model(init_state)
    opt = make_opt(model)
    model, opt = fabric.setup(model, opt)
    assert all(isinstance(p, DTensor) for g in opt.param_groups for p in g["params"])
    assert type(model.module.blocks[0]).__name__ == "FSDPCheckpointWrapper"
    phase, calls = {"now": None}, []
    original_rs = dist.reduce_scatter_single  # what FSDP2 calls in torch 2.13

    def counting_rs(*args, **kwargs):
        calls.append(phase["now"])
        return original_rs(*args, **kwargs)

    dist.reduce_scatter_single = counting_rs
    try:
        data_loader = loader(fabric, data, 2)
        it = iter(data_loader)
        l1, n1 = run_steps(fabric, model, opt, it, 2, 2, phase)
    finally:
        dist.reduce_scatter_single = original_rs
    assert calls.count("accumulate") == 0 and calls.count("sync") >= 2 * (N_BLOCKS + 1), calls
    ckpt = out / "fsdp-step2"
    fabric.save(ckpt, {"model": model, "optimizer": opt, "loader": data_loader, "step": 2, "rng": capture_rng_state()})
    assert (ckpt / ".metadata").is_file() and len(list(ckpt.glob("*.distcp"))) == 2
    l2, n2 = run_steps(fabric, model, opt, it, 2, 2)
    result.update(losses=l1 + l2, norms=n1 + n2, state=full_state(model))

    # 3. a save that fails on rank 1 while writing leaves the step-2 checkpoint in place
    original_write = FileSystemWriter.write_data

    def failing_write(self, plan, planner):
        if rank == 1:
            raise OSError("disk full (simulated)")
        return original_write(self, plan, planner)

    FileSystemWriter.write_data = failing_write
    try:
        match = r"failed \(on rank 1: OSError: disk full \(simulated\)\); the previous"
        with pytest.raises(LitModelError, match=match):
            fabric.save(ckpt, {"model": model, "optimizer": opt, "loader": data_loader, "step": 4})
    finally:
        FileSystemWriter.write_data = original_write
    fabric.barrier()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [], list(out.iterdir())

    # 4. resume from a single-file checkpoint written by one process: optimizer created after setup
    with fabric.init_module():
        model2 = TinyLM()
    model2 = fabric.setup(model2)
    opt2 = make_opt(model2)
    fabric.setup_optimizers(opt2)
    loader2 = loader(fabric, data, 2)
    st = {"model": model2, "optimizer": opt2, "loader": loader2, "step": 0}
    fabric.load(ref_ckpt, st)
    assert st["step"] == 2
    l3, _ = run_steps(fabric, model2, opt2, iter(loader2), 2, 2)
    result.update(resumed_from_file=l3, resumed_state=full_state(model2))

    # 5. hybrid sharding over a (replicate=2, shard=1) mesh
    fh = Fabric(accelerator="cpu", devices=2, strategy=FSDPStrategy(sharding_strategy="hybrid", shard_size=1))
    fh.launch()
    fh.seed_everything(42)
    mh = fh.setup(new_model(init_state))
    assert fh._mesh.shape == (2, 1)
    oh = make_opt(mh)
    lh, _ = run_steps(fh, mh, oh, iter(loader(fh, data, 2)), 4, 2)
    result.update(hybrid_losses=lh, hybrid_state=full_state(mh))

    # 6. bf16-mixed: parameters stay fp32, losses track fp32
    fb = Fabric(accelerator="cpu", devices=2, strategy="fsdp", precision="bf16-mixed")
    fb.launch()
    fb.seed_everything(42)
    mb = fb.setup(new_model(init_state))
    ob = make_opt(mb)
    lb, _ = run_steps(fb, mb, ob, iter(loader(fb, data, 2)), 4, 2)
    assert all(p.dtype == torch.float32 and p.to_local().dtype == torch.float32 for p in mb.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in mb.parameters())
    result.update(bf16_losses=lb)

    # 7. 16-mixed: sharded gradient scaler, fabric.step
    f16 = Fabric(accelerator="cpu", devices=2, strategy="fsdp", precision="16-mixed")
    f16.launch()
    f16.seed_everything(42)
    m16 = f16.setup(new_model(init_state))
    o16 = make_opt(m16)
    f16.setup_optimizers(o16)
    l16, _ = run_steps(f16, m16, o16, iter(loader(f16, data, 2)), 2, 2)
    assert type(f16._scaler).__name__ == "ShardedGradScaler" and f16._scaler.get_scale() == 65536.0  # no overflow
    result.update(fp16_losses=l16)
    return result


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def init_state():
    return initial_state()


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, init_state, data):
    """One process, global batch 8, no accumulation; saves a single-file checkpoint after step 2."""
    out = tmp_path_factory.mktemp("ref")
    fabric = Fabric(accelerator="cpu")
    fabric.seed_everything(42)
    model = new_model(init_state)
    opt = make_opt(model)
    model, opt = fabric.setup(model, opt)
    data_loader = loader(fabric, data, 8)
    it = iter(data_loader)
    l1, n1 = run_steps(fabric, model, opt, it, 2, 1)
    fabric.save(out / "ref.pt", {"model": model, "optimizer": opt, "loader": data_loader, "step": 2})
    step2 = {k: v.clone() for k, v in model.state_dict().items()}
    l2, n2 = run_steps(fabric, model, opt, it, 2, 1)
    return {"losses": l1 + l2, "norms": n1 + n2, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "ckpt": out / "ref.pt", "step2": step2}


# ------------------------------------------------------------------------------------------ multi-process
@pytest.mark.timeout(150)
def test_ddp_matches_single_process(reference, init_state, data, tmp_path):
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp", activation_checkpointing=True)
    res = fabric.launch(ddp_worker, init_state, data, str(tmp_path))
    assert all(n > CLIP for n in reference["norms"])  # clipping was active
    torch.testing.assert_close(res["norms"], reference["norms"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res["losses"], reference["losses"], rtol=1e-5, atol=1e-6)
    assert_states_close(res["state"], reference["state"])


@pytest.mark.timeout(180)
def test_fsdp_matches_single_process_and_checkpoints_reshard(reference, init_state, data, tmp_path):
    fabric = Fabric(accelerator="cpu", devices=2, strategy="fsdp", activation_checkpointing=True)
    res = fabric.launch(fsdp_worker, init_state, data, str(reference["ckpt"]), str(tmp_path))
    torch.testing.assert_close(res["norms"], reference["norms"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res["losses"], reference["losses"], rtol=1e-5, atol=1e-6)
    assert_states_close(res["state"], reference["state"])
    # 1 process -> 2 FSDP ranks (single file): continues exactly like the uninterrupted run
    torch.testing.assert_close(res["resumed_from_file"], reference["losses"][2:], rtol=1e-5, atol=1e-6)
    assert_states_close(res["resumed_state"], reference["state"])
    torch.testing.assert_close(res["hybrid_losses"], reference["losses"], rtol=1e-5, atol=1e-6)
    assert_states_close(res["hybrid_state"], reference["state"])
    assert max(abs(a - b) for a, b in zip(res["bf16_losses"], reference["losses"])) < 0.03
    assert max(abs(a - b) for a, b in zip(res["fp16_losses"], reference["losses"])) < 0.01

    # 2 FSDP ranks -> 1 process (DCP directory, survived the failed overwrite): same continuation
    ckpt = tmp_path / "fsdp-step2"
    single = Fabric(accelerator="cpu")
    model = new_model(init_state)
    opt = make_opt(model)
    model, opt = single.setup(model, opt)
    data_loader = loader(single, data, 8)
    st = {"model": model, "optimizer": opt, "loader": data_loader, "step": 0, "rng": None}
    single.load(ckpt, st)
    assert st["step"] == 2 and len(st["rng"]["ranks"]) == 2  # every rank's RNG state (capture_rng_state)
    assert all(set(r) >= {"python", "numpy", "torch"} for r in st["rng"]["ranks"])
    assert_states_close(model.state_dict(), reference["step2"])
    losses, _ = run_steps(single, model, opt, iter(data_loader), 2, 1)
    torch.testing.assert_close(losses, reference["losses"][2:], rtol=1e-5, atol=1e-6)

    # consolidation helpers
    full = load_full_model_state(ckpt)
    assert_states_close(full, reference["step2"])
    out = consolidate_checkpoint(ckpt, tmp_path / "consolidated.pth")
    assert_states_close(torch.load(out, weights_only=True), reference["step2"])
    whole = consolidate_checkpoint(ckpt, tmp_path / "whole.pth", model_only=False)
    st2 = {"model": single.setup(new_model(init_state)), "step": 0}
    assert "loader" in single.load(whole, st2, strict=False) and st2["step"] == 2
    # a checkpoint of another model shape: one clear line naming the tensor and both shapes
    with pytest.raises(LitModelError, match=r"'model.wte.weight' has shape \(64, 32\) but the model's is \(64, 16\)"):
        single.load(ckpt, {"model": single.setup(TinyLM(d=16))})


SCRIPT = ROOT / "tests" / "fabric_workers" / "launch_script.py"


def run_script(*cmd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=80)


@pytest.mark.timeout(90)
def test_failing_worker_stops_the_launch():
    start = time.time()
    proc = run_script(str(SCRIPT), "raise")  # spawned workers re-import the script as __mp_main__
    assert proc.returncode == 1, proc.stderr
    assert "ValueError: boom on rank 1" in proc.stderr  # the worker's traceback
    assert "error: rank 1 failed with ValueError: boom on rank 1" in proc.stderr  # the launcher's line
    assert time.time() - start < 60


@pytest.mark.timeout(90)
def test_launch_joins_torchrun_group():
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT), "ok")
    assert proc.returncode == 0, proc.stderr
    assert "rank 0/2 local 0 node 0 sum=3.0" in proc.stdout and "rank 1/2 local 1 node 0 sum=3.0" in proc.stdout
    assert "launch returned: result of rank 1" in proc.stdout  # launch returns fn's value in every process


# ------------------------------------------------------------------------------------------ in-process
def test_launch_single_device_runs_in_process():
    import torch.distributed as dist

    fabric = Fabric(accelerator="cpu", devices=1)
    assert fabric.launch(lambda f, x: (x, f.global_rank, f.world_size, str(f.device)), 7) == (7, 0, 1, "cpu")
    assert not dist.is_initialized()
    assert fabric.strategy == "single" and fabric.all_reduce(3.0).item() == 3.0
    assert fabric.all_gather(torch.tensor(2)).tolist() == [2] and fabric.broadcast("x") == "x"


def test_cluster_env_detection(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                                           "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"):
            monkeypatch.delenv(k)
    assert detect_cluster_env() is None
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                "MASTER_ADDR": "node0", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"}
    env = detect_cluster_env(torchrun)
    assert (env.kind, env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank,
            env.master_addr, env.master_port) == ("torchrun", 5, 8, 1, 4, 1, "node0", 1234)
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
             "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "2(x2)", "SLURM_NODELIST": "gpu[007-008]",
             "SLURM_JOB_ID": "123456", "SLURM_JOB_NAME": "train"}
    env = detect_cluster_env(slurm)
    assert (env.kind, env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank,
            env.master_addr, env.master_port) == ("slurm", 3, 4, 1, 2, 1, "gpu007", 15000 + 3456)
    assert detect_cluster_env({**slurm, "SLURM_JOB_NAME": "bash"}) is None  # interactive shell
    assert detect_cluster_env({**slurm, **torchrun}).kind == "torchrun"  # torchrun inside sbatch
    assert _first_slurm_host("a1,b[2-3]") == "a1" and _first_slurm_host("n[09,11-12]") == "n09"

    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    fabric = Fabric(accelerator="cpu", devices=2, num_nodes=2, strategy="ddp")
    assert (fabric.global_rank, fabric.local_rank, fabric.node_rank, fabric.world_size, fabric.is_global_zero) == \
        (3, 1, 1, 4, False)
    with pytest.raises(LitModelError, match="srun --ntasks-per-node"):
        Fabric(accelerator="cpu", devices=4, num_nodes=2)
    for key in slurm:
        monkeypatch.delenv(key)
    for key, value in torchrun.items():
        monkeypatch.setenv(key, value)
    assert Fabric(accelerator="cpu", devices=4, num_nodes=2).node_rank == 1
    with pytest.raises(LitModelError, match="torchrun started 8 processes.*devices=2 x num_nodes=1"):
        Fabric(accelerator="cpu", devices=2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(strategy="deepspeed"), "unknown strategy 'deepspeed'; choose one of auto, single, ddp, fsdp"),
    (dict(precision="8-mixed"), "unknown precision '8-mixed'; choose one of 32-true, bf16-mixed"),
    (dict(accelerator="tpu"), "unknown accelerator 'tpu'; choose one of auto, cpu, cuda"),
    (dict(accelerator="cpu", devices=100_000), "devices=100000 CPU processes but this machine has"),
    (dict(accelerator="cpu", devices=0), "devices must be a positive integer"),
    (dict(accelerator="cpu", num_nodes=2), "num_nodes=2 needs the processes started on every node"),
    (dict(accelerator="cpu", devices=2, strategy="single"), "strategy='single' runs one process"),
    (dict(accelerator="cpu", devices=2, strategy=FSDPStrategy("hybrid", shard_size=3)), "shard_size=3 must divide"),
])
def test_bad_configuration(kwargs, match):
    with pytest.raises(LitModelError, match=match):
        Fabric(**kwargs)


def test_bad_hardware_and_usage(monkeypatch, tmp_path):
    with pytest.raises(LitModelError, match="sharding_strategy 'zero3'; choose one of full, hybrid"):
        FSDPStrategy("zero3")
    if not torch.cuda.is_available():
        with pytest.raises(LitModelError, match="no CUDA GPU is available"):
            Fabric(accelerator="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(LitModelError, match="devices=2 but this machine has 1 CUDA GPU"):
        Fabric(accelerator="cuda", devices=2)
    with pytest.raises(LitModelError, match="needs a GPU with bfloat16 support"):
        Fabric(accelerator="cuda", precision="bf16-mixed")
    monkeypatch.undo()

    with pytest.raises(LitModelError, match="without a function cannot start 2 processes"):
        Fabric(accelerator="cpu", devices=2).launch()
    with pytest.raises(LitModelError, match="call fabric.launch"):
        Fabric(accelerator="cpu", devices=2).setup(TinyLM())
    fabric = Fabric(accelerator="cpu")
    model = fabric.setup(TinyLM())
    with pytest.raises(LitModelError, match="already set up"):
        fabric.setup(model)
    with pytest.raises(LitModelError, match="not part of the model"):
        fabric.setup(TinyLM(), make_opt(TinyLM()))
    with pytest.raises(LitModelError, match="exactly one of max_norm or clip_val"):
        fabric.clip_gradients(model, make_opt(model))
    with pytest.raises(LitModelError, match=r"state\['obj'\] contains a object"):
        fabric.save(tmp_path / "x.pt", {"obj": object()})
    with pytest.raises(LitModelError, match="does not exist"):
        fabric.load(tmp_path / "missing.pt", {"model": model})
    fabric.save(tmp_path / "m.pt", {"model": model})
    with pytest.raises(LitModelError, match="checkpoint .* has no 'optimizer'"):
        fabric.load(tmp_path / "m.pt", {"model": model, "optimizer": make_opt(model)})
    with pytest.raises(LitModelError, match=r"'model.wte.weight' has shape \(64, 32\) but the model's is \(64, 16\)"):
        fabric.load(tmp_path / "m.pt", {"model": fabric.setup(TinyLM(d=16))})
    bigger = TinyLM()
    bigger.extra = nn.Linear(2, 2)
    with pytest.raises(LitModelError, match="checkpoint has no tensor 'model.extra.bias' \\(and 1 more\\)"):
        fabric.load(tmp_path / "m.pt", {"model": fabric.setup(bigger)})
    fabric.load(tmp_path / "m.pt", {"model": fabric.setup(bigger)}, strict=False)
    # fsdp wants the sharded parameters in the optimizer
    fsdp = Fabric(accelerator="cpu", strategy="fsdp")
    fsdp._launched = True  # no process group needed for this check
    with pytest.raises(LitModelError, match="create the optimizer after fabric.setup"):
        fsdp.setup_optimizers(make_opt(TinyLM()))


def test_precisions_single_device(init_state, data):
    batch = data[:8]
    ref_fabric = Fabric(accelerator="cpu")
    ref = ref_fabric.setup(new_model(init_state))
    ref_opt = make_opt(ref)
    ref_losses, _ = run_steps(ref_fabric, ref, ref_opt, iter([(batch,)] * 4), 4, 1)

    # bf16-mixed: forward under autocast, params and outputs fp32, tracks fp32
    fabric = Fabric(accelerator="cpu", precision="bf16-mixed")
    model = fabric.setup(new_model(init_state))
    seen = []
    model.module.blocks[0].fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = make_opt(model)
    losses, _ = run_steps(fabric, model, opt, iter([(batch,)] * 4), 4, 1)
    assert seen[0] == torch.bfloat16 and model(batch[:, :-1]).dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 0.03
    with fabric.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16

    # bf16-true / 16-true: the model is cast; init_module builds in the dtype directly
    for precision, dtype in (("bf16-true", torch.bfloat16), ("16-true", torch.float16)):
        fabric = Fabric(accelerator="cpu", precision=precision)
        with fabric.init_module():
            m = TinyLM()
        assert m.wte.weight.dtype == dtype
        m = fabric.setup(new_model(init_state))
        assert all(p.dtype == dtype for p in m.parameters())
        assert m(batch[:, :-1]).dtype == torch.float32

    # 16-mixed: scaled backward, fabric.step unscales and steps; optimizer.step() is refused
    fabric = Fabric(accelerator="cpu", precision=16)
    model = fabric.setup(new_model(init_state))
    opt = make_opt(model)
    fabric.setup_optimizers(opt)
    loss = loss_fn(model, batch)
    fabric.backward(loss)
    scaled = model.module.lm_head.weight.grad.clone()
    norm = fabric.clip_gradients(model, opt, max_norm=1e9)
    torch.testing.assert_close(model.module.lm_head.weight.grad * fabric._scaler.get_scale(), scaled)
    assert math.isfinite(norm.item())
    with pytest.raises(LitModelError, match="call fabric.step"):
        opt.step()
    fabric.step(opt)
    opt.zero_grad()
    losses, _ = run_steps(fabric, model, opt, iter([(batch,)] * 3), 3, 1)
    assert losses[-1] < loss.item()


def test_activation_checkpointing_same_gradients(init_state, data):
    batch = data[:4]
    grads = []
    for ac in (False, True):
        fabric = Fabric(accelerator="cpu", activation_checkpointing=ac)
        model = fabric.setup(new_model(init_state))
        loss_fn(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert model.state_dict().keys() == init_state.keys() - {"pos"}
    assert_states_close(grads[0], grads[1], atol=1e-7, rtol=1e-6)


def test_meta_init_single_device_and_optimizer_repointing():
    fabric = Fabric(accelerator="cpu")
    with fabric.init_module(empty_init=True):
        model = TinyLM()
    opt = make_opt(model)  # holds meta parameters
    model, opt = fabric.setup(model, opt)
    params = list(model.parameters())
    assert all(not p.is_meta for p in params)
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in params]
    assert 0.015 < model.module.blocks[0].fc.weight.std().item() < 0.025
    assert torch.equal(model.pos, torch.arange(T))


def test_dataloader_resume_and_epochs():
    data = torch.arange(20).unsqueeze(1)
    fabric = Fabric(accelerator="cpu")
    fabric.seed_everything(3)
    dl = fabric.setup_dataloaders(DataLoader(TensorDataset(data), batch_size=4, shuffle=True))
    epoch0 = [b[0].flatten().tolist() for b in dl]
    epoch1 = [b[0].flatten().tolist() for b in dl]
    assert sorted(sum(epoch0, [])) == list(range(20)) and epoch0 != epoch1 and dl.epoch == 2
    it = iter(dl)
    next(it), next(it)
    state = dl.state_dict()
    assert state == {"epoch": 2, "batches_yielded": 2, "samples_yielded": 8, "seed": 3}
    rest = [b[0].flatten().tolist() for b in it]
    fabric.seed_everything(0)  # the shuffle seed comes from the state, not from the new seeding
    dl2 = fabric.setup_dataloaders(DataLoader(TensorDataset(data), batch_size=4, shuffle=True))
    dl2.load_state_dict(state)
    assert [b[0].flatten().tolist() for b in dl2] == rest and dl2.epoch == 3
    # a loader without a replaceable sampler skips by iterating
    plain = fabric.setup_dataloaders(DataLoader(TensorDataset(data), batch_size=4), use_distributed_sampler=False)
    plain.load_state_dict({"epoch": 0, "batches_yielded": 3})
    assert [b[0].flatten().tolist() for b in plain] == [list(range(12, 16)), list(range(16, 20))]


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    fabric = Fabric(accelerator="cpu")
    model = fabric.setup(TinyLM())
    path = tmp_path / "state.pt"
    fabric.save(path, {"model": model, "step": 1})
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:
            fh.truncate(100)  # half-written file, then the crash
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        fabric.save(path, {"model": model, "step": 2})
    monkeypatch.undo()
    st = {"model": model, "step": 0}
    fabric.load(path, st)
    assert st["step"] == 1 and os.listdir(tmp_path) == ["state.pt"]


def test_rng_state_roundtrip(tmp_path):
    import random

    import numpy as np

    fabric = Fabric(accelerator="cpu")
    fabric.seed_everything(5)
    state = capture_rng_state()
    fabric.save(tmp_path / "rng.pt", {"rng": state})
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    loaded = {"rng": None}
    fabric.load(tmp_path / "rng.pt", loaded)
    restore_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_loggers(tmp_path):
    csv_logger = CSVLogger(tmp_path, "run")
    tb = TensorBoardLogger(tmp_path, "tb")
    fabric = Fabric(accelerator="cpu", loggers=[csv_logger, tb])
    fabric.log_dict({"loss": torch.tensor(1.5)}, step=1)
    fabric.log_dict({"loss": 1.0, "lr": 0.1}, step=2)  # a new key rewrites the header
    fabric.log("loss", 0.5, step=3)
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert lines == ["step,loss,lr", "1,1.5,", "2,1.0,0.1", "3,0.5,"]
    fabric.teardown()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    resumed = CSVLogger(tmp_path, "run")  # appends to an existing file
    resumed.log_metrics({"lr": 0.2}, step=4)
    assert (tmp_path / "run" / "metrics.csv").read_text().splitlines()[-1] == "4,,0.2"
