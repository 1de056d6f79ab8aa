"""The preference-tuning recipe (DPO, with LoRA or full finetuning) behind `finetune/dpo.py`.

Read it top to bottom: `finetune_dpo` is the command-line entry point (its arguments are the flags); it checks
the inputs before any process starts or any file is written, then `fabric.launch(main, ...)`. `main` loads the
checkpoint dir and the preference pairs, applies LoRA (or keeps every weight trainable), sets up the reference
model, and runs the one training loop (`litmodel.training.fit`) with DPO's loss (`litmodel.dpo`), then writes
``out_dir/final/`` exactly as the SFT recipes do (`litmodel.finetune`).

The reference model:

* LoRA: the policy itself with its adapters disabled (`litmodel.lora.disable_adapters`): no second copy.
* full finetuning: a frozen copy of the starting checkpoint (sharded like the policy under FSDP), or, with
  ``--dpo.precompute_reference true``, no copy: the reference log-probs of every pair are computed in one pass
  before training (and again, identically, when a run resumes: the starting model is still in place then).

Per step and at each validation the loop logs the DPO loss and, as TRL names them, ``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``
(means over the pairs of the global batch; ``val_`` prefixed at validation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import torch

from litmodel.checkpoint import check_checkpoint_dir, load_config, load_model
from litmodel.data.preference import JSON, PreferenceData, load_preference_records  # noqa: F401 (JSON: --data JSON)
from litmodel.dpo import METRICS, DPOArgs, DPOObjective, count_pairs, precompute_reference
from litmodel.fabric import Fabric
from litmodel.finetune import (FinetuneEvalArgs, FinetuneTrainArgs, LoRAArgs, build_finetune_model, make_loaders,
                               prepare_run, print_sample, resume_hooks, setup_data, write_final)
from litmodel.plot import write_loss_plot
from litmodel.precision import param_dtype
from litmodel.sharded_checkpoint import fill_from_checkpoint
from litmodel.lora import LoRAConfig
from litmodel.flops import forward_flops_per_token, train_flops_per_token
from litmodel.training import build_optimizer, fit, resolve_resume
from litmodel.utils import LitModelError


def dpo_train_defaults() -> FinetuneTrainArgs:
    # pairs per step; TRL's default learning rate (1e-6) is for full finetuning, LoRA takes larger steps
    return FinetuneTrainArgs(global_batch_size=16, micro_batch_size=1, epochs=1, lr=5e-5, min_lr=0.0, warmup_steps=10,
                             weight_decay=0.0, save_interval=200)


@dataclass
class DPORunSpec:
    """Everything `main` needs, in one picklable object (sent to spawned workers)."""

    method: Literal["lora", "full"]
    checkpoint_dir: Path
    data: PreferenceData
    out_dir: Path
    train: FinetuneTrainArgs
    eval: FinetuneEvalArgs
    dpo: DPOArgs
    resume: Union[bool, str]
    seed: int
    lora: Optional[LoRAConfig] = None
    merge: bool = True
    hparams: dict = field(default_factory=dict)


def finetune_dpo(checkpoint_dir: Path, data: Optional[PreferenceData] = None, out_dir: Path = Path("out/finetune/dpo"),
                 method: Literal["lora", "full"] = "lora", precision: str = "auto", devices: Union[int, str] = 1,
                 num_nodes: int = 1, strategy: str = "auto", accelerator: str = "auto",
                 resume: Union[bool, str] = False, seed: int = 42, logger: Literal["csv", "tensorboard", "both"] = "csv",
                 train: FinetuneTrainArgs = dpo_train_defaults(), eval: FinetuneEvalArgs = FinetuneEvalArgs(),
                 dpo: DPOArgs = DPOArgs(), lora: LoRAArgs = LoRAArgs(), merge: bool = True) -> Path:
    """Preference-tune a model with DPO (direct preference optimisation) on prompt / chosen / rejected pairs.

    Args:
        checkpoint_dir: The model to tune (usually an SFT'd chat model): a checkpoint dir written by
            scripts/download.py, scripts/convert_hf_checkpoint.py or a finetuning run (its out_dir/final).
        data: The preference pairs: --data JSON --data.json_path FILE (.json list or .jsonl) of records
            {"prompt", "chosen", "rejected"} (prompt: a string or chat messages; chosen/rejected: strings or
            assistant messages), with --data.val_split_fraction, --data.prompt_style chat|alpaca, --data.seed.
        out_dir: Where logs, resumable step-XXXXXX checkpoints and the final checkpoint dir (out_dir/final) go.
        method: lora (adapters on frozen weights; the reference is the base with adapters disabled) or full (every
            weight; the reference is a frozen copy, or precomputed log-probs with --dpo.precompute_reference true).
            The default --train.lr 5e-5 suits LoRA; full finetuning wants far smaller steps (TRL's default: 1e-6).
        precision: 32-true, bf16-mixed, bf16-true, 16-mixed, 16-true, or auto (bf16-mixed where the hardware runs
            bf16 fast, else 32-true).
        devices: Processes per node (GPUs, or CPU processes).
        num_nodes: Nodes; several nodes are started by torchrun or srun.
        strategy: auto (single or ddp), single, ddp or fsdp.
        accelerator: cpu, cuda or auto.
        resume: auto (the latest step checkpoint in out_dir), a step checkpoint path, or false (refuses an out_dir
            that already holds a run).
        seed: Seed for initialisation, dropout and data order.
        logger: csv, tensorboard or both (under out_dir).
        train: Batch sizes in PAIRS (each pair is two sequences, chosen and rejected, in one forward), epochs /
            max_steps, learning rate, warmup, clipping, activation checkpointing, checkpoint interval.
            max_seq_length (default: the model's block_size) cuts longer pairs, prompt first.
        eval: Validation interval and size (DPO loss, reward accuracy and margins on the validation pairs), and the
            greedy sample answer to the first validation prompt.
        dpo: beta (strength of the pull towards the reference), loss (sigmoid or ipo), label_smoothing
            (conservative DPO), precompute_reference (full finetuning without a second copy of the model).
        lora: LoRA rank (r), alpha, dropout and targets (comma-separated: query, key, value, projection, mlp, head);
            --method lora only.
        merge: LoRA: also write the merged model into out_dir/final so every other script reads it as is.
    """
    from litmodel.tokenizer import load_tokenizer

    out_dir = Path(out_dir)
    resolve_resume(out_dir, resume)  # refuse to overwrite another run
    checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
    load_tokenizer(checkpoint_dir)
    config = load_config(checkpoint_dir)
    if method not in ("lora", "full"):
        raise LitModelError(f"unknown --method {method!r}; choose lora or full")
    if data is None:
        raise LitModelError("no preference data; pass --data JSON --data.json_path FILE (.json or .jsonl) with "
                            "prompt / chosen / rejected records")
    load_preference_records(data.json_path)  # missing file / keys, empty dataset: one line naming the record
    dpo.check()  # beta <= 0 etc.
    fabric, hparams = prepare_run(checkpoint_dir, config, data, out_dir, precision, devices, num_nodes, strategy,
                                  accelerator, seed, logger, train, eval)
    lora_config = lora.to_config() if method == "lora" else None
    hparams.update(method=method, **{f"dpo.{k}": v for k, v in vars(dpo).items()})
    if lora_config is not None:
        hparams.update({f"lora.{k}": str(v) for k, v in lora_config.to_dict().items()}, merge=merge)
    spec = DPORunSpec(method, checkpoint_dir, data, out_dir, train, eval, dpo, resume, seed, lora_config, merge,
                      hparams)
    fabric.launch(main, spec)
    return out_dir / "final"


def main(fabric: Fabric, spec: DPORunSpec) -> None:
    train, out_dir = spec.train, Path(spec.out_dir)
    resume_from = resolve_resume(out_dir, spec.resume)
    fabric.seed_everything(spec.seed)

    # 1. tokenizer and pairs
    tokenizer, config, max_seq_length = setup_data(fabric, spec.checkpoint_dir, spec.data, train,
                                                   cut=", prompt first")
    data = spec.data

    # 2. the policy (LoRA on the frozen base, or every weight trainable), set up on the devices; its optimizer
    model = build_finetune_model(fabric, spec.checkpoint_dir, spec.method, spec.lora, max_seq_length=max_seq_length)
    optimizer = fabric.setup_optimizers(build_optimizer(model, train))

    # 3. the reference: precomputed log-probs, a frozen copy (full), or the policy with adapters disabled (LoRA)
    ref_model = None
    if not spec.dpo.precompute_reference and spec.method == "full":
        ref_model = load_reference_copy(fabric, spec.checkpoint_dir)
    objective = DPOObjective(spec.dpo, ref_model, autocast=fabric.autocast)
    if spec.dpo.precompute_reference:
        for dataset in (data.train_dataset, data.val_dataset):
            if dataset is not None:
                dataset.reference = precompute_reference(fabric, objective, model, dataset, train.micro_batch_size,
                                                         data.pad_id)
        fabric.print(f"reference log-probs precomputed for {len(data.train_dataset)} train / "
                     f"{len(data.val_dataset) if data.val_dataset else 0} val pairs")

    # 4. loaders (seeded, resumable), schedule length in optimizer steps
    train_loader, val_loader, accum, schedule_steps, max_steps = make_loaders(fabric, data, train)

    # 5. what a resumable checkpoint holds (as the SFT recipes), hyperparameters, the sample answer
    state, save_fn, load_fn = resume_hooks(fabric, model, optimizer, spec.method, spec.lora)
    if fabric.is_global_zero and resume_from is None:
        for logger in fabric.loggers:
            logger.log_hyperparams(spec.hparams)
    evaluators = []
    if spec.eval.max_new_tokens > 0:
        sample_set = data.val_dataset if data.val_dataset is not None else data.train_dataset
        sample = (data.format_prompt(spec.eval.sample_prompt or sample_set.prompts[0]), [])
        evaluators.append(lambda fabric, model, step: print_sample(fabric, model, tokenizer, sample,
                                                                   spec.eval.max_new_tokens, step, out_dir))
    reference = "precomputed" if spec.dpo.precompute_reference else "frozen copy" if ref_model is not None \
        else "base with adapters disabled"
    fabric.print(f"DPO ({spec.dpo.loss}, beta {spec.dpo.beta}, reference: {reference}) for {max_steps} steps (schedule: {schedule_steps} steps, {len(train_loader) / accum:.1f} per "
                 f"epoch) of {train.global_batch_size} pairs ({accum} micro-batch(es) of {train.micro_batch_size} "
                 f"pair(s) per process, {fabric.world_size} process(es))")

    # 6. the one training loop, normalised per pair over the global batch
    lengths = data.train_dataset.lengths()
    mean_row = max(1, round(sum(lengths) / (2 * len(lengths))))
    # per token read: the policy's training FLOPs + the reference's forward (2N) when it runs every step
    fpt = train_flops_per_token(model, config, mean_row)
    if not spec.dpo.precompute_reference:
        fpt += forward_flops_per_token(model, config, mean_row)
    fit(fabric, model, optimizer, train_loader, train=train, eval=spec.eval, out_dir=out_dir, max_steps=max_steps,
        schedule_steps=schedule_steps, loss_fn=objective, count_fn=count_pairs, unit_name="pairs",
        val_loader=val_loader, evaluators=evaluators, state=state, resume_from=resume_from, save_fn=save_fn,
        load_fn=load_fn, flops_per_token=fpt, show=("rewards/accuracies", "rewards/margins"))

    # 7. out_dir/final: the checkpoint dir every other script reads (LoRA: adapter + merged model)
    write_final(fabric, model, spec.method, spec.lora, spec.checkpoint_dir, out_dir, spec.merge)
    write_loss_plot(fabric, out_dir)


def load_reference_copy(fabric: Fabric, checkpoint_dir: Path) -> torch.nn.Module:
    """A frozen copy of the starting checkpoint, full finetuning's reference: on the device, or under FSDP sharded
    like the policy (built on meta, each rank reads only its shards). The RNG is left untouched."""
    sharded = fabric.strategy == "fsdp"
    ref = load_model(checkpoint_dir, device="meta" if sharded else fabric.device, dtype=param_dtype(fabric.precision))
    if sharded:
        with torch.random.fork_rng(devices=[]):  # setup initialises meta weights before they are overwritten
            ref = fabric.setup(ref)
        fill_from_checkpoint(ref, checkpoint_dir)
    return ref.requires_grad_(False).eval()


def setup(argv: Optional[list[str]] = None, description: str = "") -> Path:
    """Parse ``--config x.yaml`` and flags, then run `finetune_dpo`."""
    from litmodel.finetune import parse_args

    return finetune_dpo(**parse_args(finetune_dpo, argv, description))


__all__ = ["METRICS", "DPORunSpec", "dpo_train_defaults", "finetune_dpo", "main", "setup"]
