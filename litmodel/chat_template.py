"""Chat templates: find a checkpoint's Jinja template, compile it and render a conversation as transformers does.

``Tokenizer.apply_chat_template`` renders through ``render_chat_template``; checkpoints without a template of their
own use ``FALLBACK_CHAT_TEMPLATE``.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from litmodel.utils import LitModelError

# Used when a checkpoint has no chat template of its own: "<role>: <content>\n" per turn, then "assistant: ".
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

# Tokens that end an assistant turn in common chat formats (added to `end_of_turn_ids` when in the vocabulary).
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "</s>",
)


def read_chat_template(directory: Path, config: dict) -> str | None:
    """The chat template of a tokenizer dir: ``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of named templates: the ``default`` one, else the first); ``None`` when
    there is none."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) and template.strip() else None


def render_chat_template(template: str, messages: Sequence[dict], variables: dict[str, Any],
                         add_generation_prompt: bool = True, tools: list[dict] | None = None,
                         documents: list[dict] | None = None) -> str:
    """The text of ``messages`` rendered with ``template``; message keys whose value is ``None`` are dropped first.
    ``variables``: the other template variables (the special tokens, ``enable_thinking=...``)."""
    messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    try:
        return compile_chat_template(template).render(
            messages=messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as err:
        raise LitModelError(
            f"chat template error: {err}; fix the conversation or pass another chat_template"
        ) from None


@lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile like transformers' ``chat_template_utils``: sandboxed, trim/lstrip blocks, loop controls,
    a ``tojson`` that does not HTML-escape, ``raise_exception`` and ``strftime_now`` globals, and a no-op
    ``{% generation %}`` block."""
    class GenerationBlock(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant masks
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise LitModelError(
            f"the chat template does not compile ({err} at line {err.lineno}); fix chat_template"
        ) from None
