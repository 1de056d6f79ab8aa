"""EleutherAI's lm-evaluation-harness on a litmodel model, scored by litmodel itself (no conversion to HF).

* `LitLM`: the harness's `LM` interface (`loglikelihood`, `loglikelihood_rolling`, `generate_until`,
  chat templates) over a litmodel model and `litmodel.tokenizer.Tokenizer`. Tokenization, truncation,
  rolling windows and stop-sequence handling follow lm-eval's Hugging Face backend (`HFLM`) so that the
  numbers are the same; the scoring is batched (`litmodel.scoring`) and generation reuses
  `litmodel.generate.generate_tokens`.
* `task_manager(tasks, include_path)`: the harness's `TaskManager`, checking every task name (unknown
  names get a one-line error with the close matches).
* `run_tasks(lm, tasks, ...)`: `lm_eval.simple_evaluate` with our defaults; returns lm-eval's results dict.

lm-eval is an optional dependency (``pip install -e ".[eval]"``): importing this module without it raises
a `LitModelError` saying so.
"""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch.nn as nn
from tqdm import tqdm

from litmodel.fabric import capture_rng_state, restore_rng_state
from litmodel.generate import generate_tokens
from litmodel.sampling import make_generator
from litmodel.scoring import score_continuations
from litmodel.utils import LitModelError

try:
    import datasets
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # the [eval] extra is not installed
    raise LitModelError(f'lm-eval is not installed ({err.msg}); install it with `pip install -e ".[eval]"`') from None

DEFAULT_MAX_GEN_TOKS = 256  # as lm-eval's HF backend
DEFAULT_SEEDS = (0, 1234, 1234, 1234)  # lm-eval's python, numpy, torch and few-shot seeds
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class LitLM(TemplateLM):
    """A litmodel model + tokenizer as an lm-eval `LM`.

    ``max_length``: the context window used for scoring and generation (default: the model's block_size).
    ``batch_size``: requests per forward pass (loglikelihood) or per generation batch.
    ``seed``: the sampling generator's seed for ``do_sample`` generation requests.
    """

    def __init__(self, model: nn.Module, tokenizer, batch_size: int = 1, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = DEFAULT_SEEDS[2], name: str = "litmodel",
                 progress: bool = True) -> None:
        super().__init__()
        block_size = model.config.block_size
        if max_length is not None and not 2 <= max_length <= block_size:
            raise LitModelError(f"--max_seq_length must be between 2 and the model's block_size {block_size}, "
                                f"got {max_length}")
        if batch_size < 1:
            raise LitModelError(f"--batch_size must be >= 1, got {batch_size}")
        if tokenizer.eos_id is None and tokenizer.bos_id is None:
            raise LitModelError(f"the tokenizer in {tokenizer.checkpoint_dir} has neither an EOS nor a BOS token, "
                                "which the harness needs as the context of an empty prompt; add one to "
                                "tokenizer_config.json")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or block_size  # the harness reads these two as attributes
        self.max_gen_toks = max_gen_toks
        self.name = name
        self.progress = progress
        self._device = next(model.parameters()).device
        self._generator = make_generator(seed, self._device)

    # ---- what the harness asks about the model -------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.tokenizer.bos_id

    @property
    def prefix_token_id(self) -> int:
        """The context of an empty prompt: BOS, else EOS (as the HF backend)."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.checkpoint_dir).replace("/", "__")

    def get_model_info(self) -> dict:
        params = {p.data_ptr(): p.numel() for p in self.model.parameters()}  # a tied head counted once
        return {"model": self.name, "model_num_parameters": sum(params.values()),
                "model_dtype": str(next(self.model.parameters()).dtype)}

    # ---- tokenization (HF backend semantics) ----------------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Like `HFLM.tok_encode`: the tokenizer's default special tokens, unless ``add_special_tokens`` says
        otherwise or the string already starts with the prefix (BOS) token's text."""
        if add_special_tokens is None and string.startswith(self.tokenizer.decode([self.prefix_token_id])):
            add_special_tokens = False
        special = None if add_special_tokens in (None, True) else False
        ids = self.tokenizer.encode(string, bos=special, eos=special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- loglikelihood --------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        progress = False if disable_tqdm or not self.progress else "loglikelihood requests"
        results = score_continuations(self.model, pairs, self.max_length, self.batch_size, progress=progress)
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents: lm-eval's disjoint rolling windows of `max_length` tokens,
        the first conditioned on the prefix token, every token predicted once."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, pred))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation -------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate for each (context, gen_kwargs) until a stop string of ``until``, the EOS token or
        ``max_gen_toks`` tokens; greedy unless ``do_sample`` (then ``temperature``/``top_k``/``top_p``)."""
        args = [req.args for req in requests]
        # batches share gen_kwargs; longest context first, as the HF backend
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        encoded = [self.tok_encode(context) for context, _ in args]
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until requests",
                   disable=disable_tqdm or not self.progress)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(encoded[i]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                texts = self._generate_batch([encoded[i] for i in batch], args[batch[0]][1])
                for i, text in zip(batch, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
                bar.update(len(batch))
        bar.close()
        self.model.clear_kv_cache()  # free it before any scoring
        return out  # type: ignore[return-value]

    def _generate_batch(self, contexts: list[list[int]], gen_kwargs: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id], False))
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        max_ctx_len = self.max_length - max_gen_toks
        if max_ctx_len < 1:
            raise LitModelError(f"a task asks for max_gen_toks={max_gen_toks}, which does not fit the context of "
                                f"{self.max_length} tokens; raise --max_seq_length or lower the task's max_gen_toks")
        do_sample = bool(kwargs.get("do_sample"))
        temperature = float(kwargs.get("temperature", 0.0)) if do_sample else 0.0
        top_k = kwargs.get("top_k")
        top_p = float(kwargs.get("top_p") or 1.0)
        prompts = [c[-max_ctx_len:] or [self.prefix_token_id] for c in contexts]  # an empty prompt: BOS
        stops = set(self.tokenizer.stop_ids)
        strings = [s for s in until if s]
        generated: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        steps = generate_tokens(self.model, prompts, max_gen_toks, temperature=temperature,
                                top_k=int(top_k) if top_k else None, top_p=top_p, stop_tokens=stops,
                                generator=self._generator, pad_id=self.prefix_token_id)
        for toks in steps:
            for b, t in enumerate(toks.tolist()):
                if done[b]:
                    continue
                if t in stops:
                    done[b] = True
                    continue
                generated[b].append(t)
                # a stop string may span tokens: look at the text so far (as HF's stopping criteria do)
                if strings and any(s in self.tokenizer.decode(generated[b][-_lookback(s):]) for s in strings):
                    done[b] = True
            if all(done):
                steps.close()
                break
        return [postprocess_generated_text(self.tok_decode(ids), until, None) for ids in generated]

    # ---- chat templates ------------------------------------------------------------------------------------
    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        if not self.tokenizer.has_chat_template:
            raise LitModelError(f"{self.tokenizer.checkpoint_dir} has no chat template (tokenizer_config.json "
                                "chat_template or chat_template.jinja); drop --apply_chat_template")
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered with the checkpoint's chat template. Without ``add_generation_prompt``
        the last (assistant) message is left open, to be continued (transformers' ``continue_final_message``)."""
        self.chat_template(True)
        try:
            return self._render_chat(chat_history, add_generation_prompt)
        except LitModelError:  # e.g. a template that rejects system messages: drop them (as the HF backend)
            return self._render_chat([m for m in chat_history if m["role"] != "system"], add_generation_prompt)

    def _render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if add_generation_prompt:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        messages = [dict(m) for m in messages]
        final = messages[-1]["content"]
        messages[-1]["content"] = final + _CONTINUE_TAG
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        tag = _CONTINUE_TAG.strip()
        if tag not in text:
            raise LitModelError("the chat template drops the final message's text, so it cannot be continued; "
                                "drop --apply_chat_template")
        loc = text.rindex(tag)
        return text[:loc] if text[loc:loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:loc].rstrip()


def _lookback(stop: str) -> int:
    """Tokens of generated text to decode to find ``stop``: one per character is an upper bound, plus a few
    for a partial character."""
    return len(stop) + 3


# ---- tasks ---------------------------------------------------------------------------------------------------
def task_manager(tasks: Sequence[str], include_path: str | Path | None = None):
    """lm-eval's `TaskManager` for ``tasks``; a one-line error for an unknown name, with close matches.

    Building the index of lm-eval's ~15k built-in tasks takes ~10 s, so when every name is a task under
    ``include_path`` only that directory is indexed.
    """
    if include_path is not None and not Path(include_path).exists():
        raise LitModelError(f"--include_path {include_path} does not exist; pass a directory of task YAML files")
    names = [t for t in tasks if not Path(t).is_file()]  # a task YAML path is a task too
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(n in local.task_index and local.task_index[n].kind in (Kind.TASK, Kind.PY_TASK) for n in names):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    known = set(manager.all_tasks)
    for name in names:
        if name in known or ("*" in name and manager.match_tasks([name])):
            continue
        close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        where = f" or under --include_path {include_path}" if include_path is not None else ""
        raise LitModelError(f"unknown task {name!r}{where}; {hint}list the tasks with `lm-eval ls tasks`")
    return manager


def expand_tasks(manager, tasks: Sequence[str]) -> list[str]:
    """Task names with glob patterns (``mmlu_*``) expanded."""
    out: list[str] = []
    for t in tasks:
        out += manager.match_tasks([t]) if "*" in t else [t]
    return out


def run_tasks(lm, tasks: Sequence[str], manager=None, num_fewshot: int | None = None,
              limit: int | float | None = None, include_path: str | Path | None = None,
              apply_chat_template: bool = False, fewshot_as_multiturn: bool | None = None,
              seed: int | None = None, log_samples: bool = False, bootstrap_iters: int = 100_000,
              verbose: bool = True) -> dict[str, Any]:
    """Run lm-eval's tasks on ``lm`` (a `LitLM`, or any lm-eval `LM`) and return its results dict (``results``,
    ``configs``, ``n-shot``, ...; ``samples`` when ``log_samples``). ``seed`` sets python, numpy, torch and
    few-shot seeds (default: lm-eval's 0/1234/1234/1234). ``fewshot_as_multiturn`` defaults to
    ``apply_chat_template``, as lm-eval's CLI."""
    check_limit(limit)
    manager = manager or task_manager(tasks, include_path)
    seeds = DEFAULT_SEEDS if seed is None else (seed,) * 4
    level = logging.getLogger("lm_eval").level
    if not verbose:  # during training: keep the log to our own lines
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        datasets.disable_progress_bars()
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=expand_tasks(manager, tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
            apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=apply_chat_template if fewshot_as_multiturn is None else fewshot_as_multiturn,
            log_samples=log_samples, bootstrap_iters=bootstrap_iters, random_seed=seeds[0],
            numpy_random_seed=seeds[1], torch_random_seed=seeds[2], fewshot_random_seed=seeds[3])
    finally:
        logging.getLogger("lm_eval").setLevel(level)
        if not verbose:
            datasets.enable_progress_bars()
    if results is None:  # lm-eval builds the results on LOCAL_RANK 0 only (the other FSDP ranks ran the forwards)
        return {}
    if isinstance(lm, LitLM):
        results["config"]["model"] = lm.name
        results["config"]["batch_size"] = lm.batch_size
    return results


def check_limit(limit: int | float | None) -> None:
    if limit is not None and not limit > 0:
        raise LitModelError(f"--limit must be > 0 (a number of examples per task, or a fraction below 1), got {limit}")


def headline_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``{"task/metric": value}`` for every numeric metric of every task (stderr left out; a filter other than
    "none" is appended, e.g. ``gsm8k/exact_match_strict-match``): what a training loop logs."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue  # metrics are "<metric>,<filter>"; alias, sample_len and stderrs are not logged
            metric, _, filt = key.partition(",")
            flat[f"{task}/{metric if filt in ('', 'none') else f'{metric}_{filt}'}"] = float(value)
    return flat


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise LitModelError(f"--tasks {tasks!r} names no task; pass comma-separated names such as arc_easy,piqa")
    return names


def check_tasks(tasks: str | Sequence[str], limit: int | float | None = None,
                include_path: str | Path | None = None) -> list[str]:
    """The task names, after the checks a recipe runs before it starts any process: a name lm-eval does not
    know (with the close matches) or ``limit <= 0`` is a one-line `LitModelError`."""
    names = parse_tasks(tasks)
    check_limit(limit)
    task_manager(names, include_path)
    return names


def harness_evaluator(tasks: str | Sequence[str], tokenizer, limit: int | float | None = 100,
                      include_path: str | Path | None = None, max_length: int | None = None, batch_size: int = 4,
                      num_fewshot: int | None = None) -> Callable[..., dict[str, float]]:
    """An evaluator for `litmodel.training.fit`: runs the harness ``tasks`` (``limit`` examples each) on the
    model being trained and returns ``{"task/metric": value}``, which the loop logs next to the val loss.

    Task names are checked here, before training starts. Under FSDP every rank runs the requests (each
    forward gathers the shards); otherwise only rank 0 does, on the unwrapped module (no DDP collectives).
    lm-eval seeds python, numpy and torch; the training run's random state is put back afterwards.
    """
    names = parse_tasks(tasks)
    check_limit(limit)
    limit = int(limit) if limit is not None and limit >= 1 else limit
    manager = task_manager(names, include_path)

    def evaluate(fabric, model, step: int) -> dict[str, float]:
        if not (fabric.strategy == "fsdp" or fabric.is_global_zero):
            capture_rng_state()  # collective under a process group: every rank takes part
            return {}
        rng = capture_rng_state()
        module = getattr(model, "module", model)
        lm = LitLM(module, tokenizer, batch_size=batch_size, max_length=max_length, progress=False)
        try:
            with fabric.autocast():
                results = run_tasks(lm, names, manager, num_fewshot=num_fewshot, limit=limit, bootstrap_iters=0,
                                    verbose=False)
        finally:
            module.clear_kv_cache()
            restore_rng_state(rng)
        return headline_metrics(results) if fabric.is_global_zero else {}

    return evaluate
