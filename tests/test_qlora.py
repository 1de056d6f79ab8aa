"""QLoRA (--quantize nf4) end to end through the real CLI: learning, several processes, merging, resume."""

import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import yaml

from tests.helpers import run_and_kill
from tests.test_finetune import COMMON, FULL, LORA, QA, ROOT, answers, base, data_args, losses, read_tensors, run_cli  # noqa: F401

if importlib.util.find_spec("torchao") is None:
    pytest.skip("needs torchao (the quant extra)", allow_module_level=True)

QLORA = [*COMMON, *LORA, "--quantize", "nf4"]


@pytest.fixture(scope="module")
def qlora_run(base):
    out = base["root"] / "qlora"
    r = run_cli("finetune/lora.py", ["--checkpoint_dir", base["ckpt"], "--out_dir", out, *data_args(base["json"]),
                                     *QLORA])
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_qlora_cli_learns_the_answers(base, qlora_run):
    out, r = qlora_run
    assert "base in NF4" in r.stdout
    final = out / "final"
    cfg = yaml.safe_load((final / "lora_config.yaml").read_text())
    assert cfg["quantize"] == "nf4" and cfg["base_checkpoint_dir"] == str(base["ckpt"])
    assert answers(final) == [a for _, a in QA]



def test_merged_qlora_output_is_the_trained_model(base, qlora_run):
    """out_dir/final's merged model (base dtype) = the NF4 base the adapter was trained on + the update: the same
    logits as the training-time model (NF4 weights + LoRA), and not the update on the unrounded base."""
    from litmodel.checkpoint import load_model
    from litmodel.lora import merge_lora
    from litmodel.lora_checkpoint import load_lora
    from litmodel.nf4 import load_model_nf4

    final = qlora_run[0] / "final"
    idx = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = load_lora(load_model_nf4(base["ckpt"], dtype=torch.float32), final)(idx)
        merged = load_model(final)
        assert merged.wte.weight.dtype == load_model(base["ckpt"]).wte.weight.dtype
        torch.testing.assert_close(merged(idx), trained, rtol=1e-4, atol=1e-4)
        unrounded = merge_lora(load_lora(load_model(base["ckpt"]), final))(idx)
        assert (unrounded - trained).abs().max() > 1e-3


# ---- several processes and resume: short runs (4 steps, a checkpoint every 2), killed from outside at step 2 ------
SHORT = ["--train.max_steps", "4", "--train.save_interval", "2", "--eval.max_new_tokens", "0"]
METHODS = {"qlora": ("finetune/lora.py", [*QLORA, *SHORT]), "lora": ("finetune/lora.py", [*COMMON, *LORA, *SHORT]),
           "full": ("finetune/full.py", [*COMMON, *FULL, *SHORT])}
TWO = {"fsdp": ["--devices", "2", "--strategy", "fsdp"], "ddp": ["--devices", "2", "--strategy", "ddp"], "1": []}
# (method, processes): killed after the step-2 checkpoint and resumed; compared with the 1-process uninterrupted run
# (LoRA: 1 process in tests/test_finetune.py, 2 ranks in tests/test_training.py)
KILLED = [("qlora", "1"), ("qlora", "fsdp"), ("full", "1"), ("full", "fsdp")]
STRAIGHT = [("qlora", "1"), ("full", "1"), ("qlora", "ddp")]


def _args(base, method, procs, out):
    script, args = METHODS[method]
    return script, ["--checkpoint_dir", base["ckpt"], "--out_dir", out, *data_args(base["json"]), *args, *TWO[procs]]


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def references(base):
    """The 1-process uninterrupted short runs, started on first use (in parallel threads)."""
    root = base["root"] / "short"
    pool = ThreadPoolExecutor(3)
    futures = {case: pool.submit(run_cli, *_args(base, *case, root / "-".join(case))) for case in STRAIGHT}
    yield root, futures
    pool.shutdown()


def _reference(references, case):
    r = references[1][case].result()
    assert r.returncode == 0, r.stderr[-3000:]
    return references[0]


def _kill_and_resume(base, root, case):
    out = root / ("killed-" + "-".join(case))
    script, args = _args(base, *case, out)
    sharded_full = case[0] == "full" and case[1] == "fsdp"  # full finetuning under FSDP saves a DCP dir
    first = run_and_kill([sys.executable, str(ROOT / script), *map(str, args)],
                         out / ("step-000002" if sharded_full else "step-000002.pt"), cwd=ROOT, env=ENV)
    assert first.returncode == -9, first.stderr[-3000:]
    assert not (out / "final").exists()
    resumed = run_cli(script, [*args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    return out


def _final(root, name, method):
    return read_tensors(root / name / "final" / ("model.safetensors" if method == "full" else "lora.safetensors"))


def _assert_same_run(root, ref_name, name, method):
    a, b = losses(root / ref_name), losses(root / name)
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (name, step, a[step], b[step])
    ta, tb = _final(root, ref_name, method), _final(root, name, method)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=5e-5, msg=f"{name}: {k}")


@pytest.mark.slow
@pytest.mark.parametrize("case", KILLED, ids=lambda c: "-".join(c))
def test_killed_and_resumed_equals_one_uninterrupted_process(base, references, case):
    """QLoRA and full finetuning, 1 process and 2 FSDP processes, SIGKILLed from outside once the step-2
    checkpoint exists and resumed with --resume auto: the losses and final weights of one uninterrupted process."""
    out = _kill_and_resume(base, base["root"] / "short", case)
    method = case[0]
    _assert_same_run(_reference(references, (method, "1")), f"{method}-1", out.name, method)
    if method != "full":  # a LoRA checkpoint holds only what trains: LoRA weights and their optimizer state
        step = torch.load(out / "step-000004.pt", weights_only=True)
        assert step["lora_state"] and all(k.endswith(("lora_A", "lora_B")) for k in step["lora_state"])
        assert "model" not in step and step["optimizer_state"]


@pytest.mark.slow
def test_qlora_ddp_equals_one_process(references):
    root = _reference(references, ("qlora", "ddp"))
    _reference(references, ("qlora", "1"))
    _assert_same_run(root, "qlora-1", "qlora-ddp", "qlora")
