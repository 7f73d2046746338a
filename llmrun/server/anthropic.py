"""The Anthropic Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

Only translation, as in ``openai.py``: content blocks become the internal OpenAI-like
messages (``tool_use`` a call, ``tool_result`` a ``tool`` message, a last assistant turn
the prefill the answer continues), and the event stream becomes Anthropic's server-sent
events (``message_start``, ``content_block_start``/``delta``/``stop``, ``message_delta``,
``message_stop``). Errors take Anthropic's shape in ``errors.py``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from llmrun.errors import UsageError
from llmrun.server.inference import (
    Finished,
    InferenceRequest,
    ReasoningDelta,
    Stream,
    TextDelta,
    ToolCallDelta,
    count_tokens,
    final_answer,
    start,
)
from llmrun.server.pool import parse_keep_alive
from llmrun.server.sampling import sampling_from
from llmrun.server.transport import SSE_HEADERS, EventStream, Lenient, unless_disconnected
from llmrun.tools import NO_PARAMETERS, Tool, ToolChoice

router = APIRouter(prefix="/v1/messages")


class ToolDefinition(Lenient):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom", or one of Anthropic's own tools (refused)


class ToolChoiceBody(Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class OutputFormat(Lenient):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Lenient):
    format: OutputFormat | None = None  # structured output: the answer is JSON matching the schema
    effort: str | None = None  # accepted, and left to the model


class Message(Lenient):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class CountTokensRequest(Lenient):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoiceBody | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None
    output_config: OutputConfig | None = None
    thinking: dict[str, Any] | None = None  # {"type": "enabled" | "adaptive" | "disabled", ...}
    keep_alive: str | float | int | None = None  # llmrun's (as Ollama's): how long the model stays loaded


def _text_of(blocks: str | list[dict[str, Any]], where: str) -> str:
    """The text of a string or a list of text blocks (a system prompt, a tool result)."""
    if isinstance(blocks, str):
        return blocks
    texts = []
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind in ("image", "document", "search_result"):
            raise UsageError(f"{kind} blocks are not supported in {where}: llmrun serves text-only models",
                             "send text blocks only")  # fmt: skip
        else:
            raise UsageError(f"{where} holds a block of unknown type {kind!r}", "send text blocks")
    return "\n\n".join(texts)


def _messages(body: CountTokensRequest) -> tuple[list[dict[str, Any]], str]:
    """Anthropic's system and messages as internal messages, and the prefill (a last assistant turn's text)."""
    converted: list[dict[str, Any]] = []
    if body.system:
        converted.append({"role": "system", "content": _text_of(body.system, "system")})
    for number, message in enumerate(body.messages):
        blocks = [{"type": "text", "text": message.content}] if isinstance(message.content, str) else message.content
        texts: list[str] = []
        thoughts: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in blocks:
            kind = block.get("type")
            if kind == "text":
                texts.append(str(block.get("text", "")))
            elif kind == "tool_use" and message.role == "assistant":
                arguments = block.get("input") if isinstance(block.get("input"), dict) else {}
                calls.append({"id": str(block.get("id") or f"toolu_{number}_{len(calls)}"), "type": "function",
                              "function": {"name": str(block.get("name") or ""), "arguments": arguments}})  # fmt: skip
            elif kind == "tool_result" and message.role == "user":
                result = _text_of(block.get("content") or "", "a tool_result")
                if block.get("is_error"):
                    result = f"Error: {result}"
                converted.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id") or ""),
                                  "content": result})  # fmt: skip
            elif kind == "thinking" and message.role == "assistant":
                thoughts.append(str(block.get("thinking") or ""))  # the template keeps it, or drops it
            elif kind == "redacted_thinking":
                continue  # another model's encrypted thinking: nothing a local model can read
            elif kind in ("image", "document", "search_result"):
                raise UsageError(f"{kind} blocks are not supported: llmrun serves text-only models",
                                 "send text, tool_use and tool_result blocks")  # fmt: skip
            else:
                raise UsageError(f"messages.{number} holds a block of type {kind!r} that a {message.role} turn"
                                 " cannot have", "see the Messages API's content blocks")  # fmt: skip
        text = "\n\n".join(texts)
        if message.role == "assistant":
            entry: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                entry["tool_calls"] = calls
            if any(thoughts):
                entry["reasoning_content"] = "\n\n".join(thought for thought in thoughts if thought)
            converted.append(entry)
        elif texts or not converted or converted[-1]["role"] != "tool":
            converted.append({"role": "user", "content": text})
    prefill = ""
    if converted and converted[-1]["role"] == "assistant" and not converted[-1].get("tool_calls"):
        prefill = converted.pop()["content"].rstrip()  # as Anthropic: the answer continues it (no trailing space)
    return converted, prefill


def _tools(body: CountTokensRequest) -> tuple[tuple[Tool, ...], ToolChoice, bool]:
    tools = []
    for tool in body.tools or []:
        if tool.type not in (None, "custom"):
            raise UsageError(f"tool type {tool.type!r} is one of Anthropic's own tools, which llmrun does not run",
                             "declare it as a custom tool with name, description and input_schema")  # fmt: skip
        tools.append(Tool(tool.name, tool.description or "", tool.input_schema or dict(NO_PARAMETERS)))
    choice = body.tool_choice
    if choice is None:
        return tuple(tools), ToolChoice("auto"), True
    parallel = not choice.disable_parallel_tool_use
    if choice.type == "tool":
        if not choice.name:
            raise UsageError("tool_choice of type tool needs a name", "name the tool to use")
        return tuple(tools), ToolChoice("function", choice.name), parallel
    return tuple(tools), ToolChoice({"any": "required"}.get(choice.type, choice.type)), parallel


def _request(body: MessagesRequest) -> InferenceRequest:
    messages, prefill = _messages(body)
    tools, choice, parallel = _tools(body)
    stops = tuple(stop for stop in body.stop_sequences or () if stop)
    sampling = sampling_from(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k)
    output_format = body.output_config.format if body.output_config is not None else None
    schema = output_format.schema_ if output_format is not None else None
    return InferenceRequest(
        model=body.model, messages=messages, prefill=prefill, sampling=sampling, max_tokens=body.max_tokens,
        stop=stops, json_schema=schema, tools=tools, tool_choice=choice, parallel_tool_calls=parallel,
        think=_think(body.thinking), keep_alive_s=parse_keep_alive(body.keep_alive), route="/v1/messages",
    )  # fmt: skip


def _think(thinking: dict[str, Any] | None) -> bool | None:
    if not thinking or "type" not in thinking:
        return None
    return bool(thinking["type"] != "disabled")


def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _stop_reason(event: Finished) -> str:
    if event.tool_calls:
        return "tool_use"
    if event.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if event.stop_sequence is not None else "end_turn"


def _usage(event: Finished) -> dict[str, Any]:
    """Anthropic counts prompt tokens read from the cache apart from the input tokens."""
    return {
        "input_tokens": event.usage.prompt_tokens - event.usage.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": event.usage.cached_tokens,
        "output_tokens": event.usage.completion_tokens,
    }


def _content(event: Finished) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if event.reasoning:  # unsigned: a local model's thinking needs no proof
        blocks.append({"type": "thinking", "thinking": event.reasoning, "signature": ""})
    if event.text:
        blocks.append({"type": "text", "text": event.text})
    for call in event.tool_calls:
        blocks.append({"type": "tool_use", "id": _tool_id(call.id), "name": call.name,
                       "input": json.loads(call.arguments)})  # fmt: skip
    return blocks


@router.post("", response_model=None)
async def messages(body: MessagesRequest, request: Request) -> Any:
    stream = await start(request.app.state.pool, _request(body))
    message_id = f"msg_{uuid.uuid4().hex[:24]}"
    model_name = stream.model_name
    if not body.stream:
        finished = await unless_disconnected(request, final_answer(stream))
        return {
            "id": message_id, "type": "message", "role": "assistant", "model": model_name,
            "content": _content(finished), "stop_reason": _stop_reason(finished),
            "stop_sequence": finished.stop_sequence, "usage": _usage(finished),
        }  # fmt: skip
    return EventStream(_events(stream, message_id), media_type="text/event-stream", headers=SSE_HEADERS)


def _sse(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _events(stream: Stream, message_id: str) -> AsyncIterator[str]:
    """Anthropic's event sequence: a block opens at its first piece and closes when another kind begins."""
    usage = {"input_tokens": stream.prompt_tokens, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
             "output_tokens": 0}  # fmt: skip
    start_message: dict[str, Any] = {"id": message_id, "type": "message", "role": "assistant",
                                     "model": stream.model_name, "content": [], "stop_reason": None,
                                     "stop_sequence": None, "usage": usage}  # fmt: skip
    yield _sse("message_start", {"message": start_message})
    yield _sse("ping", {})
    index, open_kind = -1, None
    try:
        async for event in stream:
            if isinstance(event, ReasoningDelta):
                if open_kind != "thinking":
                    if open_kind is not None:
                        yield _sse("content_block_stop", {"index": index})
                    index, open_kind = index + 1, "thinking"
                    opened = {"type": "thinking", "thinking": "", "signature": ""}
                    yield _sse("content_block_start", {"index": index, "content_block": opened})
                piece = {"type": "thinking_delta", "thinking": event.text}
                yield _sse("content_block_delta", {"index": index, "delta": piece})
            elif isinstance(event, TextDelta) and event.text:
                if open_kind != "text":
                    if open_kind is not None:
                        yield _sse("content_block_stop", {"index": index})
                    index, open_kind = index + 1, "text"
                    yield _sse("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
                yield _sse("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": event.text}})
            elif isinstance(event, ToolCallDelta):
                if event.id is not None:
                    if open_kind is not None:
                        yield _sse("content_block_stop", {"index": index})
                    index, open_kind = index + 1, "tool_use"
                    block: dict[str, Any] = {
                        "type": "tool_use",
                        "id": _tool_id(event.id),
                        "name": event.name,
                        "input": {},
                    }
                    yield _sse("content_block_start", {"index": index, "content_block": block})
                if event.arguments:
                    piece = {"type": "input_json_delta", "partial_json": event.arguments}
                    yield _sse("content_block_delta", {"index": index, "delta": piece})
            elif isinstance(event, Finished):
                if event.error is not None:
                    raise event.error
                if open_kind is not None:
                    yield _sse("content_block_stop", {"index": index})
                delta = {"stop_reason": _stop_reason(event), "stop_sequence": event.stop_sequence}
                yield _sse("message_delta", {"delta": delta, "usage": _usage(event)})
                yield _sse("message_stop", {})
    except Exception as error:  # noqa: BLE001 - the status line is sent: report in the stream, as Anthropic does
        from llmrun.server.errors import anthropic_error_body

        yield _sse("error", {"error": anthropic_error_body(error)["error"]})
    finally:
        stream.close()


@router.post("/count_tokens", response_model=None)
async def count_tokens_route(body: CountTokensRequest, request: Request) -> Any:
    messages, prefill = _messages(body)
    tools, choice, parallel = _tools(body)
    inference = InferenceRequest(
        model=body.model, messages=messages, prefill=prefill, tools=tools, tool_choice=choice,
        parallel_tool_calls=parallel, route="/v1/messages/count_tokens",
    )  # fmt: skip
    return {"input_tokens": await count_tokens(request.app.state.pool, inference)}
