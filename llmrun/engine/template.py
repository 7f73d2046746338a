"""Chat templates from GGUF files, rendered in a sandboxed Jinja environment (they are untrusted).

A template renders as Hugging Face transformers' ``apply_chat_template(..., tokenize=False)`` renders it, since
that is where model authors write and test them: the same Jinja options, filters, globals and ``{% generation %}``
tag, and the same variables (``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the special tokens
and any extra keyword). ``tests/test_templates.py`` compares the two on the real templates vendored in llama.cpp.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.meta import find_undeclared_variables
from jinja2.parser import Parser
from jinja2.runtime import Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from llmrun.errors import InvalidModelFile

# The names a message's reasoning may come under; templates read the first (gpt-oss's read ``thinking``).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(Extension):
    """``{% generation %}…{% endgeneration %}`` marks the assistant's text (for training masks): we render the body.

    The body is a call block, as in transformers, so a ``{% set %}`` inside it stays inside it.
    """

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Macro) -> str:
        return str(caller())


class _DictBuilder:
    """The ``dict`` global: builds dicts, and gives a template nothing else of the class."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _check_namespace_name(name: object) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"a chat template cannot store the underscore-prefixed attribute {name!r} on a namespace")


class _SafeNamespace(Namespace):
    """``namespace()`` that refuses underscore-prefixed attributes (no way to reach CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # as Namespace: `namespace(self=...)` must work
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _check_namespace_name(name)
        Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        Namespace.__setitem__(self, name, value)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, ') and sorts keys; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _DictBuilder()
    environment.globals["namespace"] = _SafeNamespace
    return environment


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    return _environment().from_string(template)


def _plain(value: Any) -> Any:
    """A copy made of plain JSON types only: a template sees no object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # a subclass (an enum...) is cut back to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as a template sees them: no None-valued keys, and the reasoning under each of its names."""
    result = []
    for message in messages:
        # An API's `content: null` or `tool_calls: null` would otherwise render as "None" in many templates.
        message = {key: value for key, value in _plain(message).items() if value is not None}
        reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        result.append(message)
    return result


def _template_failed(exc: BaseException) -> InvalidModelFile:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return InvalidModelFile(f"the model's chat template failed: {reason}", "use --raw to send the prompt as plain text")


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    bos_token: str,
    eos_token: str,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> str:
    """Render a conversation into the model's prompt text.

    ``tools`` are JSON schemas (``{"type": "function", "function": {...}}``); ``documents`` are dicts (usually
    ``title`` and ``text``); ``extra`` keywords (``enable_thinking``...) become template variables too.
    """
    try:
        return str(
            _compile(template).render(
                messages=_template_messages(messages),
                tools=_plain(tools),
                documents=_plain(documents),
                add_generation_prompt=add_generation_prompt,
                **_plain({"bos_token": bos_token, "eos_token": eos_token, **extra}),
            )
        )
    except Exception as exc:  # noqa: BLE001 - the template is untrusted code: whatever it raises is the model's fault
        raise _template_failed(exc) from None


@lru_cache(maxsize=16)
def template_supports_tools(template: str) -> bool:
    """Whether the template reads the ``tools`` variable (a template that ignores it would drop them silently)."""
    try:
        return "tools" in find_undeclared_variables(_environment().parse(template))
    except TemplateError as exc:
        raise _template_failed(exc) from None
