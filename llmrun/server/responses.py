"""The OpenAI Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``.

Only translation, as in ``openai.py``: ``instructions`` and ``input`` items (messages,
``function_call``, ``function_call_output``) become internal messages, the event stream
becomes output items and Responses' typed server-sent events. A response is stored (unless
``store`` is false, or the server runs with ``--no-log``) in the log database with the
conversation up to it, so ``previous_response_id`` continues it, even after a restart;
as OpenAI, a previous response's ``instructions`` are not carried over.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from llmrun.errors import LlmrunError, UsageError
from llmrun.server.inference import (
    Finished,
    InferenceRequest,
    ReasoningDelta,
    Stream,
    TextDelta,
    ToolCallDelta,
    final_answer,
    start,
)
from llmrun.server.sampling import sampling_from
from llmrun.server.transport import SSE_HEADERS, EventStream, Lenient, unless_disconnected
from llmrun.tools import NO_PARAMETERS, Tool, ToolChoice

router = APIRouter(prefix="/v1/responses")


class ResponseNotFound(LlmrunError):
    http_status = 404


class FunctionTool(Lenient):
    type: str = "function"
    name: str = ""
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedToolChoice(Lenient):
    type: Literal["function"]
    name: str


class TextFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextOptions(Lenient):
    format: TextFormat | None = None


class ResponsesRequest(Lenient):
    model: str
    input: str | list[dict[str, Any]] = ""
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    text: TextOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_output_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, Any] | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = None  # {"effort": "none"}: a reasoning model answers without thinking

    @property
    def think(self) -> bool | None:
        effort = (self.reasoning or {}).get("effort")
        return None if effort is None else effort not in ("none", "minimal")


def _content_text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            texts.append(str(part.get("text", "")))
        elif kind in ("input_image", "input_file", "input_audio"):
            raise UsageError(f"{kind} content is not supported: llmrun serves text-only models", "send input_text")
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        else:
            raise UsageError(f"{where} holds content of unknown type {kind!r}", "send input_text parts")
    return "".join(texts)


def _items_to_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``input`` as internal messages: consecutive function calls join one assistant turn."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}] if items else []
    messages: list[dict[str, Any]] = []
    thought = ""  # a reasoning item's text, for the assistant turn that follows it
    for number, item in enumerate(items):
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise UsageError(f"input.{number} has role {role!r}", "use user, assistant, system or developer")
            text = _content_text(item.get("content"), f"input.{number}")
            messages.append({"role": "system" if role == "developer" else role, "content": text})
            if role == "assistant" and thought:
                messages[-1]["reasoning_content"], thought = thought, ""
        elif kind == "function_call":
            function = {"name": str(item.get("name") or ""), "arguments": item.get("arguments") or "{}"}
            call = {"id": str(item.get("call_id") or ""), "type": "function", "function": function}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # the same turn's text, or calls
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
                if thought:
                    messages[-1]["reasoning_content"], thought = thought, ""
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _content_text(output, f"input.{number}.output")
            messages.append({"role": "tool", "tool_call_id": str(item.get("call_id") or ""), "content": text})
        elif kind == "reasoning":  # the thinking of the assistant turn that follows (its template keeps or drops it)
            parts = [*(item.get("content") or []), *(item.get("summary") or [])]
            thought = "\n\n".join(str(part.get("text") or "") for part in parts if isinstance(part, dict)).strip()
        else:
            raise UsageError(f"input.{number} is an item of type {kind!r} that llmrun does not take",
                             "send messages, function_call and function_call_output items")  # fmt: skip
    return messages


def _tools(body: ResponsesRequest) -> tuple[tuple[Tool, ...], ToolChoice]:
    tools = []
    for tool in body.tools or []:
        if tool.type != "function":
            raise UsageError(f"tool type {tool.type!r} is a hosted OpenAI tool, which llmrun does not run",
                             "declare function tools")  # fmt: skip
        if not tool.name:
            raise UsageError("a function tool has no name", "give every tool a name")
        tools.append(Tool(tool.name, tool.description or "", tool.parameters or dict(NO_PARAMETERS)))
    choice = body.tool_choice
    if choice is None:
        return tuple(tools), ToolChoice("auto")
    if isinstance(choice, str):
        return tuple(tools), ToolChoice(choice)
    return tuple(tools), ToolChoice("function", choice.name)


def _format(body: ResponsesRequest) -> tuple[dict[str, Any] | None, bool]:
    text_format = body.text.format if body.text is not None else None
    if text_format is None or text_format.type == "text":
        return None, False
    if text_format.type == "json_object":
        return None, True
    if text_format.schema_ is None:
        raise UsageError("text.format json_schema needs a schema", "give text.format.schema")
    return text_format.schema_, False


class _Conversation:
    """The stored conversation a request continues, and the messages it sends."""

    def __init__(self, history: list[dict[str, Any]], added: list[dict[str, Any]], instructions: str | None) -> None:
        self.history = history  # what previous responses said, and were told
        self.added = added  # this request's input
        self.instructions = instructions

    def messages(self) -> list[dict[str, Any]]:
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return [*system, *self.history, *self.added]


async def _conversation(request: Request, body: ResponsesRequest) -> _Conversation:
    history: list[dict[str, Any]] = []
    if body.previous_response_id:
        log_store = request.app.state.pool.log_store
        if log_store is None:
            raise UsageError("previous_response_id needs stored responses, and this server runs with --no-log",
                             "send the whole conversation, or restart the server without --no-log")  # fmt: skip
        stored = await asyncio.to_thread(log_store.api_response, body.previous_response_id)
        if stored is None:
            raise ResponseNotFound(f"no stored response {body.previous_response_id!r}",
                                "give the id of a response created with store true")  # fmt: skip
        history = stored[1]
    added = _items_to_messages(body.input)
    if not history and not added:
        raise UsageError("input is empty", "give a string or a list of input items")
    return _Conversation(history, added, body.instructions)


def _output_items(event: Finished, message_id: str, call_ids: dict[int, str]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if event.reasoning:
        items.append(_reasoning_item(f"rs_{uuid.uuid4().hex[:24]}", event.reasoning, "completed"))
    if event.text or not event.tool_calls:
        items.append(_message_item(message_id, event.text, "completed"))
    for number, call in enumerate(event.tool_calls):
        items.append(_call_item(call_ids.get(number) or f"fc_{uuid.uuid4().hex[:24]}", call.id, call.name,
                                call.arguments, "completed"))  # fmt: skip
    return items


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    )
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if status == "completed" else []
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}  # fmt: skip


def _usage(event: Finished) -> dict[str, Any]:
    return {
        "input_tokens": event.usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": event.usage.cached_tokens},
        "output_tokens": event.usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": event.usage.total_tokens,
    }


def _response(
    body: ResponsesRequest, response_id: str, created: int, model: str, status: str,
    output: list[dict[str, Any]], event: Finished | None,
) -> dict[str, Any]:  # fmt: skip
    """The response object, as created (in progress) or when done."""
    incomplete = event is not None and event.finish_reason == "length"
    text_format: dict[str, Any] = {"type": "text"}
    if body.text is not None and body.text.format is not None:
        text_format = body.text.format.model_dump(by_alias=True, exclude_none=True)
    choice = body.tool_choice
    return {
        "id": response_id, "object": "response", "created_at": created, "model": model,
        "status": "incomplete" if incomplete else status, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {}, "output": output, "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": (body.reasoning or {}).get("effort"), "summary": None},
        "store": body.store, "temperature": body.temperature, "top_p": body.top_p,
        "text": {"format": text_format},
        "tool_choice": choice.model_dump() if isinstance(choice, NamedToolChoice) else (choice or "auto"),
        "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
        "truncation": "disabled", "user": body.user,
        "usage": _usage(event) if event is not None else None,
    }  # fmt: skip


def _assistant_turn(event: Finished) -> dict[str, Any]:
    """The answer as it joins the stored conversation."""
    turn: dict[str, Any] = {"role": "assistant", "content": event.text}
    if event.tool_calls:
        turn["tool_calls"] = [{"id": call.id, "type": "function",
                               "function": {"name": call.name, "arguments": call.arguments}}
                              for call in event.tool_calls]  # fmt: skip
    return turn


async def _store(request: Request, body: ResponsesRequest, conversation: _Conversation, response: dict[str, Any],
                 event: Finished) -> None:  # fmt: skip
    log_store = request.app.state.pool.log_store
    if not body.store or log_store is None:
        return
    turns = [*conversation.history, *conversation.added, _assistant_turn(event)]
    await asyncio.to_thread(log_store.save_api_response, response, turns)


@router.post("", response_model=None)
async def create_response(body: ResponsesRequest, request: Request) -> Any:
    conversation = await _conversation(request, body)
    schema, json_any = _format(body)
    tools, choice = _tools(body)
    sampling = sampling_from(temperature=body.temperature, top_p=body.top_p)
    inference = InferenceRequest(
        model=body.model, messages=conversation.messages(), sampling=sampling, max_tokens=body.max_output_tokens,
        json_schema=schema, json_any=json_any, tools=tools, tool_choice=choice,
        parallel_tool_calls=body.parallel_tool_calls, think=body.think,
        effort=(body.reasoning or {}).get("effort"), route="/v1/responses",
    )  # fmt: skip
    stream = await start(request.app.state.pool, inference)
    response_id = f"resp_{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if not body.stream:
        event = await unless_disconnected(request, final_answer(stream))
        output = _output_items(event, f"msg_{uuid.uuid4().hex[:24]}", {})
        response = _response(body, response_id, created, stream.model_name, "completed", output, event)
        await _store(request, body, conversation, response, event)
        return response
    events = _events(request, body, conversation, stream, response_id, created)
    return EventStream(events, media_type="text/event-stream", headers=SSE_HEADERS)


async def _events(
    request: Request, body: ResponsesRequest, conversation: _Conversation, stream: Stream, response_id: str,
    created: int,
) -> AsyncIterator[str]:  # fmt: skip
    """Responses' event sequence: each output item is added, filled by deltas, and done, then the response."""
    sequence = 0
    model = stream.model_name

    def sse(kind: str, data: dict[str, Any]) -> str:
        nonlocal sequence
        sequence += 1
        record = {"type": kind, "sequence_number": sequence - 1, **data}
        return f"event: {kind}\ndata: {json.dumps(record, separators=(',', ':'), ensure_ascii=False)}\n\n"

    started = _response(body, response_id, created, model, "in_progress", [], None)
    yield sse("response.created", {"response": started})
    yield sse("response.in_progress", {"response": started})
    output: list[dict[str, Any]] = []
    message: dict[str, Any] | None = None  # the open message item
    text: list[str] = []
    call: dict[str, Any] | None = None  # the open function call item
    call_ids: dict[int, str] = {}
    thought: dict[str, Any] | None = None  # the open reasoning item
    thinking: list[str] = []

    def close_reasoning() -> list[str]:
        nonlocal thought
        if thought is None:
            return []
        whole = "".join(thinking)
        done = _reasoning_item(thought["id"], whole, "completed")
        index = output.index(thought)
        output[index] = done
        thought = None
        where = {"item_id": done["id"], "output_index": index, "content_index": 0}
        return [sse("response.reasoning_text.done", {**where, "text": whole}),
                sse("response.output_item.done", {"output_index": index, "item": done})]  # fmt: skip

    def close_message() -> list[str]:
        nonlocal message
        if message is None:
            return []
        whole = "".join(text)
        part = {"type": "output_text", "text": whole, "annotations": [], "logprobs": []}
        done = _message_item(message["id"], whole, "completed")
        index = output.index(message)
        output[index] = done
        message = None
        where = {"item_id": done["id"], "output_index": index, "content_index": 0}
        return [sse("response.output_text.done", {**where, "text": whole, "logprobs": []}),
                sse("response.content_part.done", {**where, "part": part}),
                sse("response.output_item.done", {"output_index": index, "item": done})]  # fmt: skip

    def close_call() -> list[str]:
        nonlocal call
        if call is None:
            return []
        done = {**call, "status": "completed"}
        index = output.index(call)
        output[index] = done
        call = None
        return [sse("response.function_call_arguments.done", {"item_id": done["id"], "output_index": index,
                                                              "name": done["name"], "arguments": done["arguments"]}),
                sse("response.output_item.done", {"output_index": index, "item": done})]  # fmt: skip

    try:
        async for event in stream:
            if isinstance(event, ReasoningDelta):
                if thought is None:
                    thinking.clear()
                    thought = _reasoning_item(f"rs_{uuid.uuid4().hex[:24]}", "", "in_progress")
                    output.append(thought)
                    yield sse("response.output_item.added", {"output_index": len(output) - 1, "item": thought})
                thinking.append(event.text)
                where = {"item_id": thought["id"], "output_index": output.index(thought), "content_index": 0}
                yield sse("response.reasoning_text.delta", {**where, "delta": event.text})
            elif isinstance(event, TextDelta) and event.text:
                for line in [*close_reasoning(), *close_call()]:
                    yield line
                if message is None:
                    text.clear()
                    message = _message_item(f"msg_{uuid.uuid4().hex[:24]}", "", "in_progress")
                    output.append(message)
                    index = len(output) - 1
                    yield sse("response.output_item.added", {"output_index": index, "item": message})
                    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                    yield sse("response.content_part.added", {"item_id": message["id"], "output_index": index,
                                                              "content_index": 0, "part": part})  # fmt: skip
                text.append(event.text)
                where = {"item_id": message["id"], "output_index": output.index(message), "content_index": 0}
                yield sse("response.output_text.delta", {**where, "delta": event.text, "logprobs": []})
            elif isinstance(event, ToolCallDelta):
                if event.id is not None:
                    for line in [*close_reasoning(), *close_message(), *close_call()]:
                        yield line
                    call = _call_item(f"fc_{uuid.uuid4().hex[:24]}", event.id, event.name or "", "", "in_progress")
                    call_ids[event.call_index] = call["id"]
                    output.append(call)
                    yield sse("response.output_item.added", {"output_index": len(output) - 1, "item": call})
                if event.arguments and call is not None:
                    call["arguments"] += event.arguments
                    yield sse("response.function_call_arguments.delta", {"item_id": call["id"],
                                                                         "output_index": output.index(call),
                                                                         "delta": event.arguments})  # fmt: skip
            elif isinstance(event, Finished):
                if event.error is not None:
                    raise event.error
                for line in [*close_reasoning(), *close_message(), *close_call()]:
                    yield line
                if not any(item["type"] != "reasoning" for item in output):  # an empty answer is still a message
                    output.append(_message_item(f"msg_{uuid.uuid4().hex[:24]}", "", "completed"))
                done = _response(body, response_id, created, model, "completed", output, event)
                await _store(request, body, conversation, done, event)
                kind = "response.incomplete" if done["status"] == "incomplete" else "response.completed"
                yield sse(kind, {"response": done})
    except Exception as error:  # noqa: BLE001 - the status line is sent: report in the stream
        message_text = str(error) if isinstance(error, LlmrunError) else f"internal error: {error}"
        failed = _response(body, response_id, created, model, "failed", output, None)
        failed["error"] = {"code": "server_error", "message": message_text}
        yield sse("error", {"code": "server_error", "message": message_text, "param": None})
        yield sse("response.failed", {"response": failed})
    finally:
        stream.close()


@router.get("/{response_id}", response_model=None)
async def get_response(response_id: str, request: Request) -> Any:
    log_store = request.app.state.pool.log_store
    stored = await asyncio.to_thread(log_store.api_response, response_id) if log_store is not None else None
    if stored is None:
        raise ResponseNotFound(f"no stored response {response_id!r}", "responses are kept when created with store true")
    return stored[0]


@router.delete("/{response_id}", response_model=None)
async def delete_response(response_id: str, request: Request) -> Any:
    log_store = request.app.state.pool.log_store
    deleted = await asyncio.to_thread(log_store.delete_api_response, response_id) if log_store is not None else False
    if not deleted:
        raise ResponseNotFound(f"no stored response {response_id!r}", "see the id a create call returned")
    return {"id": response_id, "object": "response", "deleted": True}
