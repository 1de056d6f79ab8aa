"""Fabric keeps training state intact: compiled DDP still skips the all-reduce while accumulating,
``init_module(empty_init=True)`` keeps weight ties, every rank resumes its own RNG stream, FSDP
loads a checkpoint shard by shard (each rank reads only its rows), and atomic writes fsync before
they publish. Distributed checks run in one 2-process DDP group and one 2-process FSDP group."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from litmodel import build_model
from litmodel.checkpoint import MODEL_FILE, load_model, save_checkpoint_dir
from litmodel.config import Config
from litmodel.fabric import Fabric, capture_rng_state, restore_rng_state
from litmodel.lora import apply_lora, mark_only_lora_as_trainable

TINY = dict(model_type="llama", block_size=16, vocab_size=96, n_layer=2, n_head=4, n_query_groups=2, n_embd=32,
            intermediate_size=48)


def tiny(**kw) -> Config:
    return Config(**{**TINY, **kw})


def batches(n: int, rank: int, B: int = 2, T: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [torch.randint(0, 96, (B, T + 1), generator=g) for _ in range(n)]


def train(fabric, model, opt, data, accum):
    """Optimizer steps of ``accum`` micro-batches each (no-sync on all but the last)."""
    for i, batch in enumerate(data):
        last = i % accum == accum - 1
        with fabric.no_backward_sync(model, enabled=not last):
            logits = model(batch[:, :-1])
            fabric.backward(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()) / accum)
        if last:
            opt.step()
            opt.zero_grad()


def rng_draws() -> tuple:
    import random

    import numpy as np

    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


# ------------------------------------------------------------------------------------------- DDP
def ddp_worker(fabric: Fabric, out_dir: str) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    rank = fabric.global_rank
    # 1. torch.compile around the set-up model: no_backward_sync still reaches DDP
    results = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny())
        model.init_weights()
        model = fabric.setup(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        calls = []
        phase = {"now": None}

        def counting_hook(state, bucket):
            calls.append(phase["now"])
            return allreduce_hook(None, bucket)

        model._forward_module.register_comm_hook(None, counting_hook)
        # aot_eager: dynamo and AOT autograd as with inductor, without its C++ build (inductor: checked by hand)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        data = batches(6, rank)
        for i in range(0, 6, 3):
            for j, batch in enumerate(data[i:i + 3]):
                phase["now"] = "sync" if j == 2 else "accumulate"
                with fabric.no_backward_sync(run, enabled=j < 2):
                    logits = run(batch[:, :-1])
                    fabric.backward(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()) / 3)
            opt.step()
            opt.zero_grad()
        results[compiled] = (calls, {k: v.detach().clone() for k, v in model.state_dict().items()})
    torch._dynamo.reset()

    # 2. tied embeddings under init_module(empty_init=True) + DDP, through a step and save/load
    fabric.seed_everything(1)
    with fabric.init_module(empty_init=True):
        tied = build_model(tiny(tie_embeddings=True))
    tied, opt = fabric.setup(tied, torch.optim.SGD(tied.parameters(), lr=0.5))
    tied_after_setup = tied.lm_head.weight is tied.wte.weight
    train(fabric, tied, opt, batches(2, rank), accum=2)
    path = Path(out_dir) / "tied.pt"
    fabric.save(path, {"model": tied})
    with fabric.init_module(empty_init=True):
        fresh = build_model(tiny(tie_embeddings=True))
    fresh = fabric.setup(fresh)
    fabric.load(path, {"model": fresh})
    tied_after_load = fresh.lm_head.weight is fresh.wte.weight and torch.equal(fresh.wte.weight, tied.wte.weight)

    # 3. per-rank RNG: each rank gets its own stream back, not rank 0's
    fabric.seed_everything(7, per_rank=True)
    fabric.save(Path(out_dir) / "rng.pt", {"rng": capture_rng_state()})
    expected = rng_draws()
    state = {"rng": {}}
    fabric.load(Path(out_dir) / "rng.pt", state)
    restore_rng_state(state["rng"])
    own_stream = rng_draws() == expected  # checked on every rank: launch returns rank 0's result only
    return {"calls": {k: v[0] for k, v in results.items()}, "states": {k: v[1] for k, v in results.items()},
            "tied": (tied_after_setup, tied_after_load), "rng_ok": fabric.all_gather(float(own_stream)).tolist(),
            "all_rng": fabric.all_gather(torch.tensor(expected[2])).tolist()}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ddp_compile_keeps_no_sync_ties_survive_and_rng_is_per_rank(tmp_path):
    res = Fabric(accelerator="cpu", devices=2, strategy="ddp").launch(ddp_worker, str(tmp_path))
    calls = res["calls"]
    assert calls[False].count("accumulate") == 0 and calls[False].count("sync") >= 2
    assert calls[True].count("accumulate") == 0, calls[True]  # the bug: an all-reduce on every micro-batch
    assert calls[True].count("sync") == calls[False].count("sync")
    for k, v in res["states"][False].items():
        torch.testing.assert_close(res["states"][True][k], v, atol=1e-6, rtol=1e-5)
    assert res["tied"] == (True, True)
    assert res["rng_ok"] == [1.0, 1.0]
    rank0, rank1 = res["all_rng"]
    assert rank0 != rank1  # seeded per rank: restoring rank 0's state on rank 1 would repeat rank 0's numbers


def test_init_module_empty_init_keeps_ties_single_device(tmp_path):
    fabric = Fabric(accelerator="cpu")
    with fabric.init_module(empty_init=True):
        model = build_model(tiny(tie_embeddings=True))
    model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.5))
    assert model.lm_head.weight is model.wte.weight and not model.wte.weight.is_meta
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in model.parameters()]
    before = model.wte.weight.detach().clone()
    train(fabric, model, opt, batches(1, 0), accum=1)
    assert not torch.equal(model.wte.weight, before)  # the head's gradient reaches the embedding
    save_checkpoint_dir(tmp_path / "ckpt", model.module, model.config)
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.lm_head.weight is loaded.wte.weight and torch.equal(loaded.lm_head.weight, model.lm_head.weight)


# ------------------------------------------------------------------------------------------ FSDP
def _vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def fsdp_worker(fabric: Fabric, small: str, lora_ref: dict, big: str, out_dir: str) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from litmodel.safetensors_io import mmap_safetensors
    from litmodel.fabric.sharded_load import local_box
    from litmodel.sharded_checkpoint import fill_from_checkpoint

    out = {}
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only

    def equal(sd: dict, ref: dict) -> bool:
        return not fabric.is_global_zero or (sd.keys() >= ref.keys() and all(torch.equal(sd[k], v)
                                                                               for k, v in ref.items()))
    # 1. meta -> fully_shard -> load_raw(safetensors): equal to the file, tie kept
    with fabric.init_module(empty_init=True):
        model = build_model(Config.from_yaml(Path(small) / "model_config.yaml"))
    model = fabric.setup(model)
    fabric.load_raw(Path(small) / MODEL_FILE, model)
    sd = get_model_state_dict(model.module, options=full)
    ref = mmap_safetensors(Path(small) / MODEL_FILE)
    out["small_equal"] = equal(sd, {**ref, "lm_head.weight": ref["wte.weight"]})
    out["small_tied"] = model.lm_head.weight is model.wte.weight

    # 2. the finetuning recipe's path: LoRA on meta, sharded, filled; adapters equal a one-process apply_lora
    #    (a dense model and a mixture of experts: per-expert adapters, 3-d expert weights sharded by expert)
    for name in ("small", "moe"):
        torch.manual_seed(3)
        lmodel = load_model(Path(small).parent / name, device="meta")
        lora_rng = torch.get_rng_state()
        apply_lora(lmodel, targets=("query", "value", "mlp"), r=2, alpha=4)
        mark_only_lora_as_trainable(lmodel)
        lmodel = fabric.setup(lmodel)
        fill_from_checkpoint(lmodel, Path(small).parent / name, lora_rng)
        lsd = get_model_state_dict(lmodel.module, options=full)
        out[f"lora_equal_{name}"] = equal(lsd, lora_ref[name]["state"])
        out[f"rng_after_{name}"] = torch.equal(torch.get_rng_state(), lora_ref[name]["rng_after"])

    # 3. per-rank RNG through a sharded (DCP) checkpoint
    fabric.seed_everything(11, per_rank=True)
    fabric.save(Path(out_dir) / "dcp", {"model": model, "rng": capture_rng_state()})
    expected = rng_draws()
    state = {"model": model, "rng": {}}
    fabric.load(Path(out_dir) / "dcp", state)
    restore_rng_state(state["rng"])
    out["rng"] = fabric.all_gather(float(rng_draws() == expected)).tolist()

    # 4. memory: a bigger checkpoint; this rank's peak grows by about its shards + one tensor's local rows
    del model, lmodel, sd, lsd, ref, state
    cfg = Config.from_yaml(Path(big) / "model_config.yaml")
    fabric.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak-RSS mark (VmHWM) to the current RSS
    rss0 = _vm_kb("VmRSS")
    with fabric.init_module(empty_init=True):
        bmodel = build_model(cfg)
    bmodel = fabric.setup(bmodel)
    fabric.load_raw(Path(big) / MODEL_FILE, bmodel)
    out["peak_mb"] = (_vm_kb("VmHWM") - rss0) / 1024
    params = list(bmodel.module.parameters())
    out["local_mb"] = sum(p.to_local().numel() * p.element_size() for p in params) / 2**20
    out["full_mb"] = sum(p.numel() * p.element_size() for p in params) / 2**20
    out["largest_local_mb"] = max(torch.Size(local_box(p)[0]).numel() * p.element_size() for p in params) / 2**20
    bsd = get_model_state_dict(bmodel.module, options=full)
    out["big_equal"] = equal(bsd, mmap_safetensors(Path(big) / MODEL_FILE))
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fsdp_loads_only_each_ranks_shards(tmp_path):
    lora_ref = {}
    moe = tiny(model_type="qwen3_moe", n_expert=4, n_expert_per_token=2, moe_intermediate_size=16)
    for name, cfg in (("small", tiny(tie_embeddings=True)), ("moe", moe)):
        torch.manual_seed(0)
        model = build_model(cfg)
        model.init_weights()
        save_checkpoint_dir(tmp_path / name, model, cfg)
        # the reference LoRA model: one process, real weights, the same seed
        torch.manual_seed(3)
        ref = load_model(tmp_path / name)
        apply_lora(ref, targets=("query", "value", "mlp"), r=2, alpha=4)
        lora_ref[name] = {"state": {k: v.clone() for k, v in ref.state_dict().items()},
                          "rng_after": torch.get_rng_state()}
    # ~150 MB in fp32: big enough that "whole model per rank" and "own shards" differ clearly in RSS
    big_cfg = tiny(vocab_size=8192, n_layer=8, n_embd=512, n_head=8, n_query_groups=8, intermediate_size=1536)
    with torch.device("meta"):
        big = build_model(big_cfg)
    big = big.to_empty(device="cpu")
    for p in big.parameters():  # cheaper than init_weights: the values only need to differ
        p.data.uniform_(-1, 1)
    save_checkpoint_dir(tmp_path / "big", big, big_cfg)
    del big
    res = Fabric(accelerator="cpu", devices=2, strategy="fsdp").launch(
        fsdp_worker, str(tmp_path / "small"), lora_ref, str(tmp_path / "big"), str(tmp_path))
    assert res["small_equal"] and res["small_tied"]
    assert res["lora_equal_small"] and res["rng_after_small"]
    assert res["lora_equal_moe"] and res["rng_after_moe"]
    assert res["rng"] == [1.0, 1.0]
    assert res["big_equal"]
    bound = res["local_mb"] + res["largest_local_mb"] + 24  # + allocator/bookkeeping slack
    assert bound < 0.8 * res["full_mb"]  # the bound means something: well below the whole model
    print({k: v for k, v in res.items() if k.endswith("_mb")})
    assert res["peak_mb"] < bound, res


# ------------------------------------------------------------------------------------------ fsync
@pytest.fixture
def io_log(monkeypatch):
    """Record os.fsync (by path) and os.replace calls, in order."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _check_published(events, tmp: str, target: Path) -> None:
    """``tmp`` (and what it holds) was fsynced before the rename onto ``target``, the parent after it."""
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[1] == tmp and e[2] == str(target))
    synced_before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    assert tmp in synced_before, events
    if Path(target).is_dir():
        for f in Path(target).rglob("*"):
            assert str(Path(tmp) / f.relative_to(target)) in synced_before, (f, events)
    assert ("fsync", str(Path(target).parent)) in events[rename:], events


def test_atomic_writes_fsync_before_publishing(tmp_path, io_log):
    from litmodel.atomic import atomic_dir, atomic_file, publish

    with atomic_file(tmp_path / "a.txt") as tmp:
        tmp.write_text("x")
        tmp_file = str(tmp)
    _check_published(io_log, tmp_file, tmp_path / "a.txt")

    io_log.clear()
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"123")
        tmp_dir = str(tmp)
    _check_published(io_log, tmp_dir, tmp_path / "d")

    io_log.clear()  # a checkpoint written by fabric.save (one file)
    fabric = Fabric(accelerator="cpu")
    fabric.save(tmp_path / "state.pt", {"step": 1})
    tmp_file = next(e[1] for e in io_log if e[0] == "replace" and e[2] == str(tmp_path / "state.pt"))
    _check_published(io_log, tmp_file, tmp_path / "state.pt")

    io_log.clear()  # hf.publish into a new dir (one rename) and into an existing one (file by file)
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"w")
    publish(staging, tmp_path / "hf")
    _check_published(io_log, str(staging), tmp_path / "hf")
    io_log.clear()
    staging.mkdir()
    (staging / "config.json").write_text("{}")
    publish(staging, tmp_path / "hf", last=("config.json",))
    rename = next(i for i, e in enumerate(io_log) if e[0] == "replace")
    assert ("fsync", str(staging / "config.json")) in io_log[:rename]
    assert ("fsync", str(tmp_path / "hf")) in io_log[rename:]


def test_load_raw_safetensors_one_process_and_bad_checkpoints(tmp_path):
    from litmodel.utils import LitModelError

    torch.manual_seed(0)
    src = build_model(tiny(tie_embeddings=True))
    src.init_weights()
    save_checkpoint_dir(tmp_path / "ckpt", src, src.config)
    fabric = Fabric(accelerator="cpu")
    with fabric.init_module(empty_init=True):
        model = build_model(tiny(tie_embeddings=True))
    model = fabric.setup(model)
    fabric.load_raw(tmp_path / "ckpt" / MODEL_FILE, model)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.lm_head.weight is model.wte.weight
    wider = fabric.setup(build_model(tiny(n_embd=64)))
    with pytest.raises(LitModelError, match=r"'blocks.0.attn.proj.weight' has shape \(32, 32\) but the model's is "
                                            r"\(64, 64\)"):
        fabric.load_raw(tmp_path / "ckpt" / MODEL_FILE, wider)
    untied = fabric.setup(build_model(tiny()))  # the file stores a tied head once: lm_head.weight is missing
    with pytest.raises(LitModelError, match=r"has no tensor 'lm_head.weight' \(1 missing in all\)"):
        fabric.load_raw(tmp_path / "ckpt" / MODEL_FILE, untied)
