"""Prompt styles: rendering a record or a conversation to token ids, with a flag per id that says whether
training learns it (the assistant's answer) or not (system/user text, template markup).

The styles (``prompt_style``; default ``"chat"`` when the tokenizer has a chat template, else
``"alpaca"``):

* ``"chat"``: the conversation is rendered with the checkpoint's chat template. An Alpaca record
  becomes ``[{"role": "user", "content": instruction + "\\n\\n" + input}, {"role": "assistant",
  "content": output}]`` (no ``"\\n\\n" + input`` when the input is empty). The ids are exactly
  ``tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)``.
  Assistant turn ``i`` spans from the end of the rendering of ``messages[:i]`` with the generation
  prompt to the end of the rendering of ``messages[:i+1]``, cut after its last end-of-turn token
  (``<|im_end|>``, ``<|eot_id|>``, EOS...). Both renderings must be token prefixes of the full
  conversation; a turn for which that fails is not learned (counted in ``stats["unstable_turns"]``,
  warned about once), a record with no learnable turn left is dropped, and a dataset with none left
  raises a `LitModelError` suggesting ``prompt_style="alpaca"``.
* ``"alpaca"``: the classic Alpaca prompt (``### Instruction:`` / ``### Input:`` / ``### Response:``),
  for base models. The prompt is encoded (with BOS as the tokenizer's config says), then the answer
  is encoded separately and EOS appended. Chat records must alternate user / assistant (after an
  optional system message, which replaces the Alpaca preamble); every assistant answer is learned.
"""

from __future__ import annotations

from litmodel.utils import LitModelError

PROMPT_STYLES = ("chat", "alpaca")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n")
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.\n\n")


def record_to_messages(rec: dict) -> list[dict]:
    """Chat messages of a record (an Alpaca record becomes one user and one assistant message)."""
    if "messages" in rec:
        return [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
    content = rec["instruction"] + ("\n\n" + rec["input"] if rec.get("input") else "")
    return [{"role": "user", "content": content}, {"role": "assistant", "content": rec["output"]}]


def alpaca_prompt(instruction: str, input: str = "", system: str | None = None) -> str:
    """The Alpaca prompt up to and including ``### Response:\\n`` (the answer follows directly)."""
    preamble = system + "\n\n" if system else (ALPACA_PREAMBLE_INPUT if input else ALPACA_PREAMBLE)
    text = f"{preamble}### Instruction:\n{instruction}\n\n"
    if input:
        text += f"### Input:\n{input}\n\n"
    return text + "### Response:\n"


def alpaca_turns(rec_or_messages: dict | list[dict], where: str, need_answer: bool = True) -> list[tuple[str, str | None]]:
    """(prompt text, answer) pairs of an Alpaca-style rendering; the last answer is None for a prompt only."""
    if isinstance(rec_or_messages, dict) and "messages" not in rec_or_messages:
        rec = rec_or_messages
        return [(alpaca_prompt(rec["instruction"], rec.get("input") or ""), rec.get("output"))]
    msgs = rec_or_messages["messages"] if isinstance(rec_or_messages, dict) else rec_or_messages
    system = None
    if msgs and msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    turns: list[tuple[str, str | None]] = []
    for k in range(0, len(msgs), 2):
        user, answer = msgs[k], msgs[k + 1] if k + 1 < len(msgs) else None
        if user["role"] != "user" or (answer is not None and answer["role"] != "assistant"):
            raise LitModelError(f"{where}: the alpaca prompt style needs messages alternating user, assistant "
                                "(after an optional system message); use prompt_style='chat' for other conversations")
        prompt = alpaca_prompt(user["content"], system=system) if k == 0 else \
            f"### Instruction:\n{user['content']}\n\n### Response:\n"
        turns.append((prompt, answer["content"] if answer is not None else None))
    if not turns:
        raise LitModelError(f"{where}: no user message; the alpaca prompt style needs user/assistant pairs")
    if need_answer and turns[-1][1] is None:
        turns.pop()  # a trailing user message has no answer to learn
    return turns


def _end_of_turn_ids(tokenizer) -> set[int]:
    ids = getattr(tokenizer, "end_of_turn_ids", None) or getattr(tokenizer, "stop_ids", None) or set()
    ids = set(ids)
    if getattr(tokenizer, "eos_id", None) is not None:
        ids.add(tokenizer.eos_id)
    return ids


def tokenize_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool], int]:
    """(ids, learn flag per id, number of assistant turns that were not prefix-stable)."""
    def render(msgs: list[dict], gen: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True))

    full = render(messages, False)
    learn = [False] * len(full)
    eot = _end_of_turn_ids(tokenizer)
    unstable = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:  # no prompt to render before it
            unstable += 1
            continue
        before = render(messages[:i], True)
        upto = full if i == len(messages) - 1 else render(messages[: i + 1], False)
        if len(upto) <= len(before) or full[: len(before)] != before or full[: len(upto)] != upto:
            unstable += 1
            continue
        start, end = len(before), len(upto)
        last = max((j for j in range(start, end) if full[j] in eot), default=None)
        if last is not None:
            end = last + 1  # e.g. learn "...<|im_end|>" but not the "\n" the template writes after it
        learn[start:end] = [True] * (end - start)
    return full, learn, unstable


def tokenize_alpaca(tokenizer, turns: list[tuple[str, str | None]]) -> tuple[list[int], list[bool]]:
    if tokenizer.eos_id is None:
        raise LitModelError("the tokenizer has no EOS token, which the alpaca prompt style appends after each answer; "
                            "use a tokenizer with an eos_token")
    ids: list[int] = []
    learn: list[bool] = []
    for k, (prompt, answer) in enumerate(turns):
        p = tokenizer.encode(prompt, bos=None if k == 0 else False)
        ids += p
        learn += [False] * len(p)
        if answer is not None:
            a = tokenizer.encode(answer, bos=False, eos=False) + [tokenizer.eos_id]
            ids += a
            learn += [True] * len(a)
    return ids, learn


def tokenize_record(tokenizer, rec: dict, prompt_style: str, where: str = "record") -> tuple[list[int], list[bool], int]:
    """(token ids, learn flag per token, unstable assistant turns) of one validated record."""
    if prompt_style == "chat":
        return tokenize_chat(tokenizer, record_to_messages(rec))
    ids, learn = tokenize_alpaca(tokenizer, alpaca_turns(rec, where))
    return ids, learn, 0


def resolve_prompt_style(tokenizer, prompt_style: str | None) -> str:
    has_template = bool(getattr(tokenizer, "has_chat_template", False))
    if prompt_style is None:
        return "chat" if has_template else "alpaca"
    if prompt_style not in PROMPT_STYLES:
        raise LitModelError(f"unknown prompt_style {prompt_style!r}; choose {' or '.join(PROMPT_STYLES)}")
    if prompt_style == "chat" and not has_template:
        raise LitModelError("prompt_style 'chat' needs a chat template but the tokenizer has none; "
                            "use prompt_style='alpaca' for base models")
    return prompt_style
