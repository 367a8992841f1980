"""Chat rows: render a `messages` value with the model's chat template, as transformers does.

transformers compiles `chat_template` in an ImmutableSandboxedEnvironment with
trim_blocks/lstrip_blocks, the loopcontrols extension, a `tojson` filter that keeps
non-ASCII text, and the globals `raise_exception` and `strftime_now`; it renders with
`messages`, `add_generation_prompt` and the tokenizer's special tokens (`bos_token`,
`eos_token`, ...). This module does the same so prompts match what people get there.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplate", "ChatTemplateError", "MessagesError", "load_chat_template"]

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class MessagesError(ValueError):
    """A row's messages are malformed or the template refused them."""


class ChatTemplateError(ValueError):
    """The model's chat template cannot be used: tokenizer_config.json is not valid JSON, or
    the template does not compile. The message names the file and what is wrong."""


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str], origin: str = "chat_template") -> None:
        """origin: where `source` comes from, named in a ChatTemplateError."""
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{origin}: the chat template has a syntax error at line {e.lineno}: {e.message}") from None
        self.special_tokens = dict(special_tokens)

    def render(self, messages: Any) -> str:
        """The prompt text for one row's messages (add_generation_prompt=True)."""
        checked = check_messages(messages)
        try:
            return self._template.render(messages=checked, add_generation_prompt=True, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise MessagesError(f"chat template refused the messages: {e}") from None


def is_gguf_file(path: str | Path) -> bool:
    """Whether `path` is a file that starts with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(4) == b"GGUF"


def check_messages(messages: Any) -> list[dict[str, str]]:
    if messages is None:
        raise MessagesError("messages is null")
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise MessagesError("messages must be a list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise MessagesError(f"messages[{i}] is not a {{role, content}} mapping")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise MessagesError(f"messages[{i}].role must be a non-empty string")
        if not isinstance(content, str):
            raise MessagesError(f"messages[{i}].content must be a string")
        out.append(dict(m))
    if not out:
        raise MessagesError("messages is empty")
    return out


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken dicts
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def load_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """The model's chat template (chat_template.jinja, else tokenizer_config.json, or a GGUF
    file's `tokenizer.chat_template`), or None."""
    model_dir = Path(model_dir)
    if is_gguf_file(model_dir):
        from upg_batch import _native

        try:
            source, special = _native.gguf_chat_template(str(model_dir))
        except _native.EngineError as e:
            raise ChatTemplateError(str(e)) from None
        if not source:
            return None
        return ChatTemplate(source, dict(special), origin=f"{model_dir} (tokenizer.chat_template)")
    config: dict[str, Any] = {}
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            loaded = json.loads(cfg_path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ChatTemplateError(f"{cfg_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except ValueError as e:  # json.JSONDecodeError
            raise ChatTemplateError(f"{cfg_path}: not valid JSON ({e})") from None
        if not isinstance(loaded, dict):
            raise ChatTemplateError(f"{cfg_path}: not a JSON object (got {type(loaded).__name__})")
        config = loaded
    source: Any = None
    origin = f"{cfg_path} (chat_template)"
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        origin = str(jinja_file)
        try:
            source = jinja_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ChatTemplateError(f"{jinja_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    else:
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: transformers uses "default"
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
    if not isinstance(source, str) or not source:
        return None
    special = {k: t for k in _SPECIAL if (t := _token_text(config.get(k))) is not None}
    return ChatTemplate(source, special, origin=origin)
