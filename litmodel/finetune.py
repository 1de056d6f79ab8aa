"""The finetuning recipe (LoRA and full), shared by `finetune/lora.py` and `finetune/full.py`.

Read it top to bottom: `setup` parses the command line into `finetune_lora` / `finetune_full` (their
arguments are the flags; groups, defaults and help: `litmodel.finetune_args`); they check the inputs before
any process starts or any file is written, then `fabric.launch(main, ...)`. `main` loads the checkpoint dir
and the data, applies LoRA (or keeps every weight trainable), calls the training loop
(`litmodel.training.fit`: loss per answer token over the global batch, accumulation, clipping, warmup +
cosine schedule, validation with a greedy sample answer, logging, resumable checkpoints, resume), then
writes ``out_dir/final/`` and ``loss.png``. The steps of `main` are functions (`setup_data`,
`build_finetune_model`, `make_loaders`, `resume_hooks`, `write_final`) that the DPO recipe
(`litmodel/finetune_dpo.py`) calls too.

Outputs (``out_dir``):

* ``final/``: a checkpoint dir. LoRA: ``lora.safetensors`` + ``lora_config.yaml`` (which also names
  ``base_checkpoint_dir``) and, unless ``--merge false``, the merged ``model.safetensors`` +
  ``model_config.yaml`` + tokenizer files, so generate/*.py and scripts/convert_lit_checkpoint.py
  use it as is (written by `litmodel.lora_checkpoint`). Full: ``model.safetensors`` + ``model_config.yaml`` +
  tokenizer files.
* ``step-XXXXXX.pt`` (or a ``step-XXXXXX/`` DCP dir for full finetuning under FSDP): resumable state.
  LoRA saves only the trainable (LoRA) weights, gathered, plus the optimizer state, counters, RNG
  and data position, so it is small and resumes on any number of processes (`litmodel.training_state`).
* ``logs/metrics.csv`` (and/or ``tensorboard/``), ``samples.txt`` (the sample answers).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from litmodel.checkpoint import MODEL_FILE, load_config, load_model
from litmodel.data.records import load_records
from litmodel.data.sft import JSON, JSONData  # noqa: F401 (JSON: --data JSON)
from litmodel.fabric import Fabric
from litmodel.finetune_args import (FinetuneEvalArgs, FinetuneTrainArgs, LoRAArgs, RunSpec, check_quantize,
                                    check_run_inputs, document_flags, full_train_defaults, lora_hparams,
                                    lora_train_defaults, parse_args, prepare_run)
from litmodel.flops import train_flops_per_token
from litmodel.generate import generate
from litmodel.lora import LoRAConfig, apply_lora, mark_only_lora_as_trainable
from litmodel.lora_checkpoint import write_lora_checkpoint
from litmodel.losses import IGNORE_INDEX, language_model_loss
from litmodel.nf4 import load_model_nf4, nf4_model_nbytes
from litmodel.plot import write_loss_plot
from litmodel.precision import param_dtype
from litmodel.safetensors_io import SAFETENSORS_DTYPES, read_safetensors_header
from litmodel.sharded_checkpoint import fill_from_checkpoint
from litmodel.tokenizer import Tokenizer
from litmodel.training import fit
from litmodel.training_args import TrainArgs, accumulation_steps, build_optimizer
from litmodel.training_state import (load_lora_state, resolve_resume, save_final_checkpoint, save_lora_state,
                                     trainable_state)
from litmodel.utils import LitModelError


# ---- the command line: parse, check, launch -------------------------------------------------------
def setup(method: Literal["lora", "full"], argv: Optional[list[str]] = None, description: str = "") -> Path:
    """Parse ``--config x.yaml`` and flags, then run `finetune_lora` or `finetune_full`."""
    fn = finetune_lora if method == "lora" else finetune_full
    return fn(**parse_args(fn, argv, description))


@document_flags(
    "Finetune a model with LoRA: the base weights stay frozen, low-rank updates are learned.",
    merge="Also write the merged model into out_dir/final (model.safetensors + model_config.yaml + tokenizer) so the "
          "generate scripts use it as is; false keeps only the adapter and a pointer to the base model (merge later "
          "with scripts/merge_lora.py).",
    quantize="nf4 (alias bnb.nf4): QLoRA. The frozen base weights of the transformer blocks are stored in 4 bits "
             "(NF4 with double-quantized scales, torchao), quantized while loading; LoRA, norms, embedding and head "
             "stay in the training precision. About 1/7 of the fp32 memory for the quantized weights; CPU and GPU; "
             "1 process, DDP or FSDP. out_dir/final's merged model is the dequantized base + the update, in the "
             "base's dtype.")
def finetune_lora(checkpoint_dir: Path, data: Optional[JSONData] = None, out_dir: Path = Path("out/finetune/lora"),
                  precision: str = "auto", devices: Union[int, str] = 1, num_nodes: int = 1, strategy: str = "auto",
                  accelerator: str = "auto", resume: Union[bool, str] = False, seed: int = 42,
                  logger: Literal["csv", "tensorboard", "both"] = "csv",
                  train: FinetuneTrainArgs = lora_train_defaults(), eval: FinetuneEvalArgs = FinetuneEvalArgs(),
                  lora: LoRAArgs = LoRAArgs(), merge: bool = True,
                  quantize: Optional[str] = None) -> Path:
    _run("lora", **{k: v for k, v in locals().items()})
    return Path(out_dir) / "final"


@document_flags(
    "Finetune every weight of a model.",
    quantize="Not available: a quantized base cannot be finetuned in full (use finetune/lora.py --quantize nf4).")
def finetune_full(checkpoint_dir: Path, data: Optional[JSONData] = None, out_dir: Path = Path("out/finetune/full"),
                  precision: str = "auto", devices: Union[int, str] = 1, num_nodes: int = 1, strategy: str = "auto",
                  accelerator: str = "auto", resume: Union[bool, str] = False, seed: int = 42,
                  logger: Literal["csv", "tensorboard", "both"] = "csv",
                  train: FinetuneTrainArgs = full_train_defaults(), eval: FinetuneEvalArgs = FinetuneEvalArgs(),
                  quantize: Optional[str] = None) -> Path:
    if quantize is not None:
        raise LitModelError(f"--quantize {quantize} freezes the base weights in 4 bits, which only LoRA can train on "
                            "(QLoRA); use finetune/lora.py --quantize nf4, or drop --quantize for full finetuning")
    _run("full", **{k: v for k, v in locals().items() if k != "quantize"})
    return Path(out_dir) / "final"


def _run(method: str, checkpoint_dir: Path, data: Optional[JSONData], out_dir: Path, precision: str,
         devices: Union[int, str], num_nodes: int, strategy: str, accelerator: str, resume: Union[bool, str],
         seed: int, logger: str, train: TrainArgs, eval: FinetuneEvalArgs, lora: Optional[LoRAArgs] = None,
         merge: bool = True, quantize: Optional[str] = None) -> None:
    """Check every input that can be checked here (so a mistake costs no process start and writes nothing),
    build the Fabric and launch `main`."""
    out_dir = Path(out_dir)
    checkpoint_dir, config = check_run_inputs(checkpoint_dir, out_dir, resume)
    if data is None:
        raise LitModelError("no finetuning data; pass --data JSON --data.json_path FILE (.json or .jsonl)")
    load_records(data.json_path)  # missing file / keys, empty dataset: one line naming the record and key
    if eval.tasks:
        from litmodel.evaluation import check_tasks  # deferred: lm-eval is an optional extra, slow to import

        check_tasks(eval.tasks, eval.limit, eval.include_path)
    lora_config = lora.to_config() if method == "lora" else None
    if quantize is not None:
        quantize = check_quantize(quantize)
    fabric, hparams = prepare_run(checkpoint_dir, config, data, out_dir, precision, devices, num_nodes, strategy,
                                  accelerator, seed, logger, train, eval)
    hparams["method"] = method
    if lora_config is not None:
        hparams.update(lora_hparams(lora_config, merge), quantize=quantize)
    spec = RunSpec(method, checkpoint_dir, data, out_dir, train, eval, resume, seed, lora=lora_config, merge=merge,
                   quantize=quantize, hparams=hparams)
    fabric.launch(main, spec)


# ---- the recipe ----------------------------------------------------------------------------------
def main(fabric: Fabric, spec: RunSpec) -> None:
    train, out_dir = spec.train, Path(spec.out_dir)
    resume_from = resolve_resume(out_dir, spec.resume)
    fabric.seed_everything(spec.seed)

    # 1. tokenizer and data
    tokenizer, config, max_seq_length = setup_data(fabric, spec.checkpoint_dir, spec.data, train)
    harness = None
    if spec.eval.tasks:  # lm-eval tasks at each validation; names were checked before launching
        from litmodel.evaluation import harness_evaluator  # deferred: lm-eval is an optional extra, slow to import

        harness = harness_evaluator(spec.eval.tasks, tokenizer, spec.eval.limit, spec.eval.include_path,
                                    max_length=max_seq_length, batch_size=train.micro_batch_size)
    data = spec.data

    # 2. the model: LoRA on the frozen base (optionally 4-bit) or every weight trainable, set up on the devices
    model = build_finetune_model(fabric, spec.checkpoint_dir, spec.method, spec.lora, spec.quantize, max_seq_length)
    optimizer = fabric.setup_optimizers(build_optimizer(model, train))

    # 3. data loaders (seeded, resumable), schedule length
    train_loader, val_loader, accum, schedule_steps, max_steps = make_loaders(fabric, data, train)

    # 4. what a resumable checkpoint holds: LoRA only the trainable weights and their optimizer state, gathered
    #    (small, and independent of the number of processes); full finetuning the model and optimizer
    lora = dataclasses.replace(spec.lora, quantize=spec.quantize) if spec.lora else None  # QLoRA resumes/merges as QLoRA
    state, save_fn, load_fn = resume_hooks(fabric, model, optimizer, spec.method, lora)
    if fabric.is_global_zero and resume_from is None:
        for logger in fabric.loggers:
            logger.log_hyperparams(spec.hparams)
    evaluators = []
    if harness is not None:
        evaluators.append(harness)
    if spec.eval.max_new_tokens > 0:  # a greedy answer to a fixed prompt at each validation
        sample = sample_prompt(data, spec.eval.sample_prompt)
        evaluators.append(lambda fabric, model, step: print_sample(fabric, model, tokenizer, sample,
                                                                   spec.eval.max_new_tokens, step, out_dir))
    fabric.print(f"training for {max_steps} steps (schedule: {schedule_steps} steps, "
                 f"{len(train_loader) / accum:.1f} per epoch) of {train.global_batch_size} sequences "
                 f"({accum} micro-batch(es) of {train.micro_batch_size} per process, {fabric.world_size} process(es))")

    # 5. the loop (litmodel/training.py): loss per answer token over the global batch
    seq_len = data.max_seq_length if data.packed else _mean_length(data)
    fit(fabric, model, optimizer, train_loader, train=train, eval=spec.eval, out_dir=out_dir, max_steps=max_steps,
        schedule_steps=schedule_steps, val_loader=val_loader, evaluators=evaluators, state=state,
        loss_fn=language_model_loss(train.router_aux_loss_coef),
        resume_from=resume_from, save_fn=save_fn, load_fn=load_fn,
        flops_per_token=train_flops_per_token(model, config, seq_len))

    # 6. out_dir/final: the checkpoint dir every other script reads; the loss curve
    write_final(fabric, model, spec.method, lora, spec.checkpoint_dir, out_dir, spec.merge)
    write_loss_plot(fabric, out_dir)


# ---- pieces of every finetuning recipe (SFT here, DPO in litmodel/finetune_dpo.py) -------------------
def setup_data(fabric: Fabric, checkpoint_dir: Path, data, train: TrainArgs, cut: str = "") -> tuple:
    """(tokenizer, config, max_seq_length): the checkpoint's tokenizer and config, and ``data`` set up (read,
    split, tokenized) with its one-line description and the count of truncated examples printed. ``cut``: how
    they were truncated, for the note."""
    tokenizer = Tokenizer(checkpoint_dir)
    config = load_config(checkpoint_dir)
    max_seq_length = train.max_seq_length or config.block_size
    data.setup(tokenizer, max_seq_length)
    fabric.print(data.describe())
    truncated = data.stats["train"]["truncated"] + (data.stats["val"] or {}).get("truncated", 0)
    if truncated:
        fabric.print(f"note: {truncated} example(s) longer than max_seq_length={max_seq_length} were truncated{cut} "
                     "(raise --train.max_seq_length to keep them whole)")
    return tokenizer, config, max_seq_length


def make_loaders(fabric: Fabric, data, train: TrainArgs) -> tuple:
    """(train_loader, val_loader or None, accumulation steps, schedule steps, max steps): seeded, resumable loaders
    of ``train.micro_batch_size`` and the run length in optimizer steps (epochs, capped by max_steps)."""
    train_loader = fabric.setup_dataloaders(data.train_dataloader(train.micro_batch_size))
    val_loader = data.val_dataloader(train.micro_batch_size)
    val_loader = fabric.setup_dataloaders(val_loader) if val_loader is not None else None
    accum = accumulation_steps(train, fabric.world_size)
    schedule_steps = math.ceil(train.epochs * len(train_loader) / accum) if train.epochs else train.max_steps
    max_steps = min(schedule_steps, train.max_steps) if train.max_steps else schedule_steps
    return train_loader, val_loader, accum, schedule_steps, max_steps


def build_finetune_model(fabric: Fabric, checkpoint_dir: Path, method: str, lora: Optional[LoRAConfig] = None,
                         quantize: Optional[str] = None, max_seq_length: Optional[int] = None):
    """The set-up model to train: the checkpoint with LoRA applied and only LoRA trainable (``method="lora"``;
    ``quantize="nf4"`` stores the frozen base in NF4, quantized while loading), or with every weight trainable (``"full"``).
    Memory-mapped; under FSDP built on meta, then each rank reads only its shards. LoRA gets the same init
    everywhere (seeded)."""
    config = load_config(checkpoint_dir)
    dtype = param_dtype(fabric.precision)
    sharded_load = fabric.strategy == "fsdp" and not quantize  # on meta; after sharding each rank reads its shards
    if quantize:  # QLoRA: the blocks' linear weights are quantized to NF4 one tensor at a time while loading
        on_device = fabric.device if fabric.strategy != "fsdp" else torch.device("cpu")  # FSDP moves shards itself
        shards = fabric.world_size if fabric.strategy == "fsdp" else 1
        model = load_model_nf4(checkpoint_dir, device=on_device, dtype=dtype, shards=shards)
    else:
        model = load_model(checkpoint_dir, device="meta" if sharded_load else fabric.device, dtype=dtype)
    lora_rng = torch.get_rng_state()
    if method == "lora":
        apply_lora(model, **lora.to_dict())
        mark_only_lora_as_trainable(model)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    fabric.print(f"model: {config.name} ({config.model_type}), {total / 1e6:.1f}M parameters, {trainable / 1e6:.3f}M "
                 f"trainable ({method}), max_seq_length {max_seq_length or config.block_size}, {fabric.precision}"
                 + (f", base in NF4: {nf4_model_nbytes(model) / 2**20:.1f} MiB of parameters" if quantize else ""))
    model = fabric.setup(model)
    if sharded_load:
        fill_from_checkpoint(model, checkpoint_dir, lora_rng)
    return model


def resume_hooks(fabric: Fabric, model, optimizer, method: str, lora: Optional[LoRAConfig] = None):
    """(state, save_fn, load_fn) for the loop: what a resumable checkpoint holds. LoRA: only the trainable weights
    and their optimizer state, gathered (small, and independent of the number of processes); full finetuning: the
    model and optimizer (the loop's default save/load)."""
    if method == "lora":
        state = {"lora_state": {}, "optimizer_state": {}, "lora_config": lora.to_dict()}
        return (state, partial(save_lora_state, fabric, model, optimizer),
                partial(load_lora_state, fabric, model, optimizer, lora))
    return {"model": model, "optimizer": optimizer}, None, None


def write_final(fabric: Fabric, model, method: str, lora: Optional[LoRAConfig], checkpoint_dir: Path, out_dir: Path,
                merge: bool = True) -> Path:
    """``out_dir/final``: the checkpoint dir every other script reads. LoRA: the adapter and (``merge``) the merged
    model; full: the weights in the checkpoint's dtype. Collective: every rank calls it."""
    final = Path(out_dir) / "final"
    if method == "lora":
        lora_state = trainable_state(model)  # collective
        if fabric.is_global_zero:
            write_lora_checkpoint(final, lora_state, lora, checkpoint_dir, merge=merge)
        fabric.barrier()
    else:
        save_final_checkpoint(fabric, model, model.config, final, checkpoint_dir, dtype=checkpoint_dtype(checkpoint_dir))
    fabric.print(f"saved {final}" + (" (adapter only; merge with scripts/merge_lora.py)"
                                     if method == "lora" and not merge else ""))
    return final


def _mean_length(data: JSONData) -> int:
    lengths = data.train_dataset.lengths()
    return max(1, round(sum(lengths) / max(1, len(lengths))))


def checkpoint_dtype(checkpoint_dir: Path) -> torch.dtype:
    """The floating dtype the checkpoint's weights are stored in (outputs are written in it too)."""
    header, _ = read_safetensors_header(Path(checkpoint_dir) / MODEL_FILE)
    for info in header.values():
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is not None and dtype.is_floating_point:
            return dtype
    return torch.float32


def sample_prompt(data: JSONData, prompt: Optional[str]) -> tuple[list[int], list[int]]:
    """(prompt ids, expected answer ids) of the sample: ``prompt`` (formatted like the training data; no
    expected answer), else the first validation example (or the first training example without a split)
    cut before its first answer token."""
    if prompt:
        return data.format_prompt(prompt), []
    dataset = data.val_dataset if data.val_dataset is not None and len(data.val_dataset) else data.train_dataset
    item = dataset[0]
    labels = item["labels"].tolist()
    start = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    return item["input_ids"][: start + 1].tolist(), labels[start:end]


def print_sample(fabric: Fabric, model, tokenizer, sample: tuple[list[int], list[int]], max_new_tokens: int,
                 step: int, out_dir: Path) -> None:
    """Greedy answer to the fixed prompt. Under FSDP every rank runs it (the forward gathers shards)."""
    if not (fabric.strategy == "fsdp" or fabric.is_global_zero):
        return
    prompt, expected = sample
    module = model.module  # not the DDP wrapper: no collectives for a rank-0-only forward
    was_training = module.training
    module.eval()
    stop = set(tokenizer.stop_ids) | set(getattr(tokenizer, "end_of_turn_ids", ()) or ())
    length = min(len(prompt) + max_new_tokens, model.config.block_size)
    try:
        with fabric.autocast():
            out = list(generate(module, prompt, max(0, length - len(prompt)), temperature=0, stop_tokens=stop))
    finally:
        module.clear_kv_cache()
        module.train(was_training)
    if fabric.is_global_zero:
        text = tokenizer.decode(out)
        lines = [f"step {step} sample", "  prompt:   " + repr(tokenizer.decode(prompt)), "  answer:   " + repr(text)]
        if expected:
            lines.append("  expected: " + repr(tokenizer.decode([t for t in expected if t not in stop])))
        fabric.print("\n".join(lines))
        with open(out_dir / "samples.txt", "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
