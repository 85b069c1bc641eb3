"""How chat messages become one prompt string for /v1/chat/completions.

A model converted from Hugging Face keeps its tokenizer_config.json (`convert` copies it beside
tokenizer.json); when that file has a `chat_template`, it is rendered with Jinja as `transformers`
does (`add_generation_prompt=True`, its special token strings as variables). A leading BOS string the
template writes is dropped, since the server adds the model's BOS id to every prompt.

Every other model gets SIMPLE, one line per message and an open assistant turn:

    System: You are terse.
    User: Hi!
    Assistant: Hello.
    User: Name a colour.
    Assistant:

and its replies stop at "\\nUser:" (the model starting the next user turn itself).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

Message = Mapping[str, str]  # {"role": ..., "content": ...}
_ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """render(messages) -> the prompt text; stop: stop strings added to every chat request."""
    render: Callable[[Sequence[Message]], str]
    stop: tuple[str, ...] = ()
    name: str = "simple"


def _render_simple(messages: Sequence[Message]) -> str:
    lines = [f"{_ROLE_NAMES[m['role']]}: {m['content']}" for m in messages]
    return "\n".join(lines + ["Assistant:"])


SIMPLE = ChatTemplate(_render_simple, stop=("\nUser:",))


def _token_text(value: Any) -> str:
    """A special token in tokenizer_config.json: a string or {"content": ...}."""
    return value.get("content", "") if isinstance(value, dict) else (value or "")


def _template_text(config: Mapping[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def from_tokenizer_dir(directory: str) -> ChatTemplate | None:
    """The Jinja chat template of a Hugging Face tokenizer directory, or None when it has none."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    source = _template_text(config)
    if source is None:
        return None
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"the model's chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(source)
    specials = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}

    def render(messages: Sequence[Message]) -> str:
        text = compiled.render(messages=[dict(m) for m in messages], add_generation_prompt=True, **specials)
        bos = specials["bos_token"]
        return text[len(bos):] if bos and text.startswith(bos) else text

    return ChatTemplate(render, name=path)
