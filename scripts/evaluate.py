r"""Evaluate a litmodel checkpoint: lm-evaluation-harness tasks, or the perplexity of a text file.

    python scripts/evaluate.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M --tasks hellaswag,arc_easy
    python scripts/evaluate.py --checkpoint_dir ... --tasks mmlu --num_fewshot 5 --limit 100 --batch_size 16
    python scripts/evaluate.py --checkpoint_dir ... --tasks my_task --include_path my_tasks/   # local YAML + JSONL
    python scripts/evaluate.py --checkpoint_dir ... --tasks gsm8k --apply_chat_template true     # instruct models
    python scripts/evaluate.py --checkpoint_dir ... --text_file held_out.txt --max_seq_length 1024 --stride 512

Tasks run through lm-eval (`pip install -e ".[eval]"`) with litmodel's own model (no conversion to
Hugging Face): lm-eval's results JSON goes to out_dir/results.json and its table to stdout. The
perplexity of --text_file uses a sliding window (each token scored once, with up to max_seq_length - 1
tokens of context); it prints the token-level perplexity and bits per byte and writes
out_dir/perplexity.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal, Optional

import torch

from litmodel.checkpoint import check_checkpoint_dir, load_model
from litmodel.cli import cli_main, parse_function_args
from litmodel.generation_setup import resolve_device
from litmodel.precision import INFERENCE_DTYPES
from litmodel.scoring import perplexity
from litmodel.tokenizer import load_tokenizer
from litmodel.atomic import atomic_file
from litmodel.utils import LitModelError


def main(
    checkpoint_dir: Path,
    tasks: Optional[str] = None,
    text_file: Optional[Path] = None,
    num_fewshot: Optional[int] = None,
    limit: Optional[float] = None,
    batch_size: Optional[int] = None,
    include_path: Optional[Path] = None,
    apply_chat_template: bool = False,
    fewshot_as_multiturn: Optional[bool] = None,
    log_samples: bool = False,
    max_seq_length: Optional[int] = None,
    stride: Optional[int] = None,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    device: str = "auto",
    accelerator: Optional[str] = None,
    out_dir: Optional[Path] = None,
    seed: Optional[int] = None,
) -> dict:
    """Evaluate a checkpoint on lm-evaluation-harness tasks and/or the perplexity of a text file.

    Args:
        checkpoint_dir: A litmodel checkpoint dir (model.safetensors, model_config.yaml, tokenizer files).
        tasks: Comma-separated lm-eval task or group names (globs like mmlu_* work), e.g. hellaswag,arc_easy.
        text_file: A UTF-8 text file whose perplexity and bits per byte to measure.
        num_fewshot: Few-shot examples per prompt (default: each task's own setting, else 0).
        limit: Examples per task: a count, or a fraction of the task below 1 (for quick checks).
        batch_size: Rows per forward pass (scoring) or per generation batch (default: 16 on a GPU, 4 on CPU, where
            larger batches of long prompts are slower); lower it if memory runs out.
        include_path: A directory of your own task YAML files (local JSON/JSONL data works offline).
        apply_chat_template: Render prompts with the checkpoint's chat template (as lm-eval's flag).
        fewshot_as_multiturn: Few-shot examples as chat turns (default: on with --apply_chat_template).
        log_samples: Also write every request and response to out_dir/samples_<task>.jsonl.
        max_seq_length: Context window for scoring, rolling windows and perplexity (default: the model's block_size).
        stride: Perplexity: a window starts every stride tokens (default: max_seq_length // 2).
        precision: 32-true, bf16-true or 16-true (default: 32-true on CPU, bf16-true on a GPU that has it).
        device: auto (cuda if available, else cpu), cpu, cuda or cuda:N.
        accelerator: Alias of --device (cpu, cuda, gpu or auto); overrides it when given.
        out_dir: Where results.json / perplexity.json go (default: out/evaluate/<checkpoint dir name>).
        seed: Seed for python, numpy, torch and few-shot sampling (default: lm-eval's 0/1234/1234/1234).
    """
    # check everything the user gave before loading anything or writing anything
    if tasks is None and text_file is None:
        raise LitModelError("nothing to evaluate; pass --tasks T1,T2 (lm-eval tasks) and/or --text_file FILE")
    task_list = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if tasks is not None and not task_list:
        raise LitModelError(f"--tasks {tasks!r} names no task; pass comma-separated names such as hellaswag,arc_easy")
    if text_file is not None and not Path(text_file).is_file():
        raise LitModelError(f"--text_file {text_file} does not exist; pass a UTF-8 text file")
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    tokenizer = load_tokenizer(checkpoint_dir)
    manager = None
    if task_list:
        from litmodel import evaluation  # deferred: lm-eval is an optional extra and slow to import

        evaluation.check_limit(limit)
        manager = evaluation.task_manager(task_list, include_path)
    dev = resolve_device(accelerator or device)
    if precision is None:
        precision = "bf16-true" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "32-true"
    if batch_size is None:
        batch_size = 16 if dev.type == "cuda" else 4
    out_dir = Path(out_dir) if out_dir is not None else Path("out/evaluate") / checkpoint_dir.name
    model = load_model(checkpoint_dir, device=dev, dtype=INFERENCE_DTYPES[precision])
    block_size = model.config.block_size
    if max_seq_length is not None and not 2 <= max_seq_length <= block_size:
        raise LitModelError(f"--max_seq_length must be between 2 and the model's block_size {block_size}, "
                            f"got {max_seq_length}")
    print(f"loaded {checkpoint_dir} ({precision}, {dev})", file=sys.stderr)

    report: dict = {}
    if text_file is not None:
        text = Path(text_file).read_text(encoding="utf-8")
        window = max_seq_length or block_size
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        # the first token is predicted from BOS (else EOS), as lm-eval's rolling loglikelihood does
        ids = ([prefix] if prefix is not None else []) + tokenizer.encode(text, bos=False, eos=False)
        ppl = perplexity(model, ids, window, stride or max(1, window // 2), batch_size,
                         n_bytes=len(text.encode("utf-8")), progress="perplexity windows")
        report["perplexity"] = {"text_file": str(text_file), "max_seq_length": window,
                                "stride": stride or max(1, window // 2), **ppl.as_dict()}
        print(f"{text_file}: perplexity {ppl.perplexity:.4f}, bits per byte {ppl.bits_per_byte:.4f} "
              f"({ppl.tokens} tokens, {ppl.bytes} bytes, {ppl.windows} windows, "
              f"{ppl.tokens / max(ppl.seconds, 1e-9):.0f} tokens/s)")
        with atomic_file(out_dir / "perplexity.json") as tmp:
            tmp.write_text(json.dumps(report["perplexity"], indent=2) + "\n")

    if task_list:
        from lm_eval.utils import handle_non_serializable, make_table  # deferred: lm-eval, see above

        lm = evaluation.LitLM(model, tokenizer, batch_size=batch_size, max_length=max_seq_length,
                              seed=evaluation.DEFAULT_SEEDS[2] if seed is None else seed, name=str(checkpoint_dir))
        limit = int(limit) if limit is not None and limit >= 1 else limit
        results = evaluation.run_tasks(lm, task_list, manager=manager, num_fewshot=num_fewshot, limit=limit,
                                       apply_chat_template=apply_chat_template,
                                       fewshot_as_multiturn=fewshot_as_multiturn, seed=seed, log_samples=log_samples)
        samples = results.pop("samples", None) or {}
        out_dir.mkdir(parents=True, exist_ok=True)
        for task, rows in samples.items():
            with atomic_file(out_dir / f"samples_{task}.jsonl") as tmp:
                tmp.write_text("".join(json.dumps(r, default=handle_non_serializable, ensure_ascii=False) + "\n"
                                       for r in rows), encoding="utf-8")
        with atomic_file(out_dir / "results.json") as tmp:
            tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False),
                           encoding="utf-8")
        print(make_table(results))
        if results.get("groups"):
            print(make_table(results, "groups"))
        print(f"wrote {out_dir / 'results.json'}", file=sys.stderr)
        report["results"] = results
    return report


def setup(argv: Optional[list[str]] = None) -> dict:
    return main(**parse_function_args(main, argv, __doc__))


if __name__ == "__main__":
    cli_main(setup)()
