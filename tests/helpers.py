"""Test helpers shared by several test files (import as ``from tests.helpers import ...``)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path


def run_and_kill(cmd: list[str], kill_when: Path, cwd: Path, env: dict | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` and SIGKILL it from outside (process group included) as soon as the file ``kill_when``
    exists, e.g. a run's first resumable checkpoint: the crash a power cut or an OOM kill would cause,
    with no test hook in the product code. Returns the completed process (stdout/stderr as text)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f.read()), daemon=True)
               for k, f in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in readers:
        t.start()
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and not Path(kill_when).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kill_when} did not appear within {timeout}s")
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for t in readers:
            t.join(10)
    return subprocess.CompletedProcess(cmd, proc.returncode, out.get("stdout", ""), out.get("stderr", ""))


def tiny_chat_checkpoint(root: Path, text: str, chat_template: str, *, name: str, block_size: int,
                         vocab_size: int = 300, adjust=None) -> Path:
    """A tiny random Llama checkpoint dir under ``root/ckpt`` with a byte-level BPE tokenizer trained on ``text``
    (special tokens <|endoftext|>, <|im_start|>, <|im_end|>) and ``chat_template``. Weights N(0, 0.3) after
    ``torch.manual_seed(0)``; ``adjust(model, tokenizer)`` may edit them (under no_grad) before saving."""
    import torch
    import transformers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from litmodel import Config, build_model
    from litmodel.checkpoint import save_checkpoint_dir

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([text], trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>",
                                                  eos_token="<|endoftext|>")
    hf_tok.chat_template = chat_template
    hf_tok.save_pretrained(root / "tok")
    torch.manual_seed(0)
    cfg = Config(name=name, block_size=block_size, vocab_size=tk.get_vocab_size(), n_layer=2, n_head=4,
                 n_query_groups=2, n_embd=32, intermediate_size=64)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
        if adjust is not None:
            adjust(model, tk)
    return save_checkpoint_dir(root / "ckpt", model, cfg, tokenizer_dir=root / "tok")


# Runs several CLI invocations in one interpreter (each as `python <script> <args>` would: runpy with
# run_name="__main__"), so a dozen cases cost one torch import. Argument: JSON {case: argv}; prints JSON
# {case: [exit code, stdout, stderr]}. Used by test_convert.py and test_download.py.
CLI_DRIVER = r"""
import contextlib, io, json, runpy, sys
results = {}
for case, argv in json.loads(sys.argv[1]).items():
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = list(argv)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    results[case] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


def perturbed_hf_model(hf_config, seed: int = 0):
    """A tiny transformers model built from ``hf_config`` with every weight perturbed by N(0, 0.1), so biases, norm
    weights and routers are not their 0/1/uniform defaults (a conversion that drops one shows in the logits)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model
