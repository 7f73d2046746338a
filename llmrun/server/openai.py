"""The OpenAI API: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/models``.

Only translation: a request body becomes an ``InferenceRequest``, the event stream becomes
OpenAI's JSON or server-sent events. Unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from llmrun.errors import UsageError
from llmrun.server.inference import (
    Finished,
    InferenceRequest,
    ReasoningDelta,
    Stream,
    TextDelta,
    ToolCallDelta,
    embed,
    start,
)
from llmrun.server.sampling import sampling_from
from llmrun.server.transport import SSE_HEADERS, EventStream, Lenient, unless_disconnected
from llmrun.tools import NO_PARAMETERS, Tool, ToolCall, ToolChoice

router = APIRouter(prefix="/v1")

FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "cancelled": "stop", "error": "stop"}


class FunctionCall(Lenient):
    name: str
    arguments: str | dict[str, Any] = "{}"


class MessageToolCall(Lenient):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an assistant turn's thinking, as llama-server and vLLM return it


class FunctionDefinition(Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(Lenient):
    type: Literal["function"]
    function: dict[str, Any]


class JsonSchemaFormat(Lenient):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(Lenient):
    include_usage: bool = False


class _Sampling(Lenient):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # llama.cpp server extensions
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, ge=0)
    ignore_eos: bool = False


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning_effort: str | None = None  # "none" (or "minimal"): a reasoning model answers without thinking
    chat_template_kwargs: dict[str, Any] | None = None  # llama-server's and vLLM's: enable_thinking, ...

    @property
    def think(self) -> bool | None:
        kwargs = self.chat_template_kwargs or {}
        if isinstance(kwargs.get("enable_thinking"), bool):
            return bool(kwargs["enable_thinking"])
        if self.reasoning_effort is not None:
            return self.reasoning_effort not in ("none", "minimal")
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class EmbeddingRequest(Lenient):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    pairs = []
    for token, value in bias.items():
        try:
            pairs.append((int(token), float(value)))
        except ValueError:
            raise UsageError(f"logit_bias key {token!r} is not a token id", "use token ids as keys") from None
    return tuple(pairs)


def _message_text(message: ChatMessage) -> str:
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind in ("image_url", "input_image", "image", "input_audio", "file"):
            raise UsageError(f"{kind} content is not supported: llmrun serves text-only models", "send text parts only")
        else:
            raise UsageError(f"unknown content part type {kind!r}", "send parts of type text")
    return "".join(texts)


def _messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    rendered = []
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        entry: dict[str, Any] = {"role": role, "content": _message_text(message)}
        if message.tool_calls:
            entry["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        if message.name is not None and role in ("tool", "function"):
            entry["name"] = message.name
        if message.reasoning_content and role == "assistant":
            entry["reasoning_content"] = message.reasoning_content
        rendered.append(entry)
    return rendered


def _tools(body: ChatCompletionRequest) -> tuple[tuple[Tool, ...], ToolChoice]:
    tools = tuple(
        Tool(tool.function.name, tool.function.description or "", tool.function.parameters or dict(NO_PARAMETERS))
        for tool in body.tools or []
    )
    choice = body.tool_choice
    if choice is None:
        return tools, ToolChoice("auto")
    if isinstance(choice, str):
        return tools, ToolChoice(choice)
    name = choice.function.get("name")
    if not isinstance(name, str):
        raise UsageError("tool_choice.function.name is missing", "name the function to call")
    return tools, ToolChoice("function", name)


def _tool_calls(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    return [{"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in calls]  # fmt: skip


def _sampling(body: _Sampling) -> Any:
    return sampling_from(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        repeat_penalty=body.repeat_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, seed=body.seed, logit_bias=_logit_bias(body.logit_bias),
    )  # fmt: skip


def _usage(finished: list[Finished]) -> dict[str, Any]:
    prompt = finished[0].usage.prompt_tokens if finished else 0
    completion = sum(event.usage.completion_tokens for event in finished)
    cached = finished[0].usage.cached_tokens if finished else 0
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    drafted = sum(event.usage.drafted_tokens for event in finished)
    if drafted:  # speculative decoding, in the fields OpenAI has for its predicted outputs
        accepted = sum(event.usage.accepted_tokens for event in finished)
        usage["completion_tokens_details"] = {
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": drafted - accepted,
        }
    return usage


def _logs_here(request: Request) -> bool:
    from llmrun.client import LOG_HEADER

    return bool(request.app.state.pool.logs_here(request.headers.get(LOG_HEADER)))


def _timings(event: Finished) -> dict[str, Any]:
    """llama-server's ``timings`` object (its clients, and ``run --server``, read it): milliseconds, per answer."""
    return {
        "cache_n": event.usage.cached_tokens,
        "prompt_n": event.usage.evaluated_prompt_tokens,
        "prompt_ms": round(event.time_to_first_token_s * 1000, 3),
        "prompt_per_second": round(event.prompt_tokens_per_s, 3),
        "predicted_n": event.usage.completion_tokens,
        "predicted_ms": round(event.generation_s * 1000, 3),
        "predicted_per_second": round(event.generation_tokens_per_s, 3),
    }


def _chat_logprobs(entries: list[Any]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": entry.token,
                "logprob": entry.logprob,
                "bytes": list(entry.token_bytes),
                "top_logprobs": [
                    {"token": text, "logprob": logprob, "bytes": list(piece)} for text, piece, logprob in entry.top
                ],
            }
            for entry in entries
        ]
    }


def _assistant_message(event: Finished) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": event.text}
    if event.reasoning:
        message["reasoning_content"] = event.reasoning  # as DeepSeek's API, llama-server and vLLM name it
    if event.tool_calls:
        message["content"] = event.text or None
        message["tool_calls"] = _tool_calls(event.tool_calls)
    return message


async def _gather(stream: Stream) -> tuple[list[Finished], dict[int, list[Any]]]:
    """A whole non-streamed answer: the Finished events by index, and each answer's token log-probabilities."""
    gathered: dict[int, list[Any]] = {}
    finished: list[Finished] = []
    try:
        async for event in stream:
            if isinstance(event, TextDelta):
                if event.logprobs:
                    gathered.setdefault(event.index, []).extend(event.logprobs)
            elif isinstance(event, Finished):
                if event.error is not None:
                    raise event.error
                finished.append(event)
    finally:
        stream.close()
    return sorted(finished, key=lambda event: event.index), gathered


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _sse_stream(stream: Stream, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as error:  # noqa: BLE001 - the status line is sent: report in the stream
        from llmrun.server.errors import openai_error_body

        yield _sse(openai_error_body(error))
    finally:
        stream.close()
    yield "data: [DONE]\n\n"


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    pool = request.app.state.pool
    schema = None
    json_any = False
    if body.response_format is not None and body.response_format.type != "text":
        if body.response_format.type == "json_object":
            json_any = True
        else:
            format_schema = body.response_format.json_schema
            if format_schema is None or format_schema.schema_ is None:
                raise UsageError("response_format json_schema needs json_schema.schema", "give the JSON schema")
            schema = format_schema.schema_
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    tools, tool_choice = _tools(body)
    inference = InferenceRequest(
        model=body.model, messages=_messages(body.messages), sampling=_sampling(body),
        max_tokens=body.max_completion_tokens or body.max_tokens, stop=_stops(body.stop), n=body.n,
        logprobs=logprobs, ignore_eos=body.ignore_eos, json_schema=schema, json_any=json_any,
        tools=tools, tool_choice=tool_choice, parallel_tool_calls=body.parallel_tool_calls, think=body.think,
        effort=body.reasoning_effort, route="/v1/chat/completions", log=_logs_here(request),
    )  # fmt: skip
    stream = await start(pool, inference)
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    model_name = stream.model_name
    if not body.stream:
        finished, gathered = await unless_disconnected(request, _gather(stream))
        choices = [
            {
                "index": event.index,
                "message": _assistant_message(event),
                "logprobs": _chat_logprobs(gathered.get(event.index, [])) if logprobs is not None else None,
                "finish_reason": FINISH_REASONS.get(event.finish_reason, "stop"),
            }
            for event in finished
        ]
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
            "choices": choices, "usage": _usage(finished), "system_fingerprint": "llmrun",
            "timings": _timings(finished[0]),
        }  # fmt: skip
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def chunks() -> AsyncIterator[str]:
        base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "system_fingerprint": "llmrun"}  # fmt: skip
        for index in range(body.n):
            first = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}  # fmt: skip
            yield _sse({**base, "choices": [first]})
        finished: list[Finished] = []
        async for event in stream:
            if isinstance(event, TextDelta):
                choice: dict[str, Any] = {"index": event.index, "delta": {"content": event.text}, "finish_reason": None}
                choice["logprobs"] = _chat_logprobs(event.logprobs) if logprobs is not None else None
                yield _sse({**base, "choices": [choice]})
            elif isinstance(event, ReasoningDelta):
                yield _sse({**base, "choices": [{"index": event.index, "delta": {"reasoning_content": event.text},
                                                 "logprobs": None, "finish_reason": None}]})  # fmt: skip
            elif isinstance(event, ToolCallDelta):
                call: dict[str, Any] = {"index": event.call_index, "function": {"arguments": event.arguments}}
                if event.id is not None:
                    call.update(id=event.id, type="function")
                    call["function"]["name"] = event.name
                yield _sse({**base, "choices": [{"index": event.index, "delta": {"tool_calls": [call]},
                                                 "logprobs": None, "finish_reason": None}]})  # fmt: skip
            elif isinstance(event, Finished):
                if event.error is not None:
                    raise event.error
                finished.append(event)
                reason = FINISH_REASONS.get(event.finish_reason, "stop")
                yield _sse({**base, "choices": [{"index": event.index, "delta": {}, "logprobs": None,
                                                 "finish_reason": reason}], "timings": _timings(event)})  # fmt: skip
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(finished)})

    return EventStream(_sse_stream(stream, chunks()), media_type="text/event-stream", headers=SSE_HEADERS)


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Any:
    pool = request.app.state.pool
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts:
        raise UsageError("prompt is an empty list", "give a prompt")
    if len(prompts) > 1 and body.stream:
        raise UsageError("streaming takes one prompt", "send one prompt per streamed request")
    streams = []
    try:
        for prompt in prompts:
            inference = InferenceRequest(
                model=body.model, prompt=prompt, sampling=_sampling(body), max_tokens=body.max_tokens or 16,
                stop=_stops(body.stop), n=body.n, logprobs=body.logprobs, ignore_eos=body.ignore_eos,
                route="/v1/completions", log=_logs_here(request),
            )  # fmt: skip
            streams.append(await start(pool, inference))
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    completion_id = f"cmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    model_name = streams[0].model_name
    base = {"id": completion_id, "object": "text_completion", "created": created, "model": model_name,
            "system_fingerprint": "llmrun"}  # fmt: skip
    if not body.stream:

        async def gather_all() -> tuple[list[Finished], dict[int, list[Any]]]:
            finished: list[Finished] = []
            gathered: dict[int, list[Any]] = {}
            try:
                for prompt_index, stream in enumerate(streams):
                    events, logprobs = await _gather(stream)
                    finished.extend(events)
                    for index, entries in logprobs.items():
                        gathered[prompt_index * body.n + index] = entries
            finally:
                for stream in streams:
                    stream.close()
            return finished, gathered

        finished, gathered = await unless_disconnected(request, gather_all())
        choices = []
        for number, event in enumerate(finished):
            choices.append({
                "index": number, "text": (prompts[number // body.n] if body.echo else "") + event.text,
                "logprobs": _completion_logprobs(gathered.get(number, [])) if body.logprobs is not None else None,
                "finish_reason": FINISH_REASONS.get(event.finish_reason, "stop"),
            })  # fmt: skip
        usage = {
            "prompt_tokens": sum(event.usage.prompt_tokens for event in finished[:: body.n]),
            "completion_tokens": sum(event.usage.completion_tokens for event in finished),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {**base, "choices": choices, "usage": usage, "timings": _timings(finished[0])}
    stream = streams[0]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def chunks() -> AsyncIterator[str]:
        finished: list[Finished] = []
        if body.echo:
            yield _sse({**base, "choices": [{"index": 0, "text": prompts[0], "logprobs": None,
                                             "finish_reason": None}]})  # fmt: skip
        async for event in stream:
            if isinstance(event, TextDelta):
                lp = _completion_logprobs(event.logprobs) if body.logprobs is not None else None
                yield _sse({**base, "choices": [{"index": event.index, "text": event.text, "logprobs": lp,
                                                 "finish_reason": None}]})  # fmt: skip
            elif isinstance(event, Finished):
                if event.error is not None:
                    raise event.error
                finished.append(event)
                reason = FINISH_REASONS.get(event.finish_reason, "stop")
                yield _sse({**base, "choices": [{"index": event.index, "text": "", "logprobs": None,
                                                 "finish_reason": reason}], "timings": _timings(event)})  # fmt: skip
        if include_usage:
            usage = _usage(finished)
            usage.pop("prompt_tokens_details")
            yield _sse({**base, "choices": [], "usage": usage})

    return EventStream(_sse_stream(stream, chunks()), media_type="text/event-stream", headers=SSE_HEADERS)


def _completion_logprobs(entries: list[Any]) -> dict[str, Any]:
    return {
        "tokens": [entry.token for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [{text: logprob for text, _, logprob in entry.top} for entry in entries],
        "text_offset": [],
    }


@router.post("/embeddings", response_model=None)
async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
    inputs: list[Any]
    if isinstance(body.input, str):
        inputs = [body.input]
    elif body.input and all(isinstance(item, int) for item in body.input):
        inputs = [list(body.input)]
    else:
        inputs = list(body.input)
    if not inputs:
        raise UsageError("input is empty", "give a string or a list of strings")
    vectors, n_tokens = await embed(request.app.state.pool, body.model, inputs)
    data = []
    for index, vector in enumerate(vectors):
        if body.dimensions is not None:
            vector = vector[: body.dimensions]
        encoded: Any = vector
        if body.encoding_format == "base64":
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    model = request.app.state.pool.find_loaded(body.model)
    return {
        "object": "list", "data": data, "model": model.name if model else body.model,
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }  # fmt: skip


@router.get("/models", response_model=None)
async def list_models(request: Request) -> Any:
    pool = request.app.state.pool
    data = []
    seen = set()
    for model in pool.models.values():
        seen.add(model.name)
        data.append(_model(model.name, int(model.loaded_at), request))
    for name, upstream in pool.upstreams.models() if pool.upstreams is not None else []:
        if name not in seen:
            seen.add(name)
            data.append(_model(name, int(time.time()), request, owner=upstream.name))
    for entry in pool.store.entries():
        if entry.name not in seen and not entry.damage:  # a manifest that cannot be read names no usable model
            data.append(_model(entry.name, _timestamp(entry.added_at), request))
    if _anthropic(request):
        ids = [model["id"] for model in data]
        first, last = (ids[0], ids[-1]) if ids else (None, None)
        return JSONResponse({"data": data, "has_more": False, "first_id": first, "last_id": last})
    return JSONResponse({"object": "list", "data": data})


@router.get("/models/{model_id:path}", response_model=None)
async def get_model(model_id: str, request: Request) -> Any:
    pool = request.app.state.pool
    if (upstream := pool.upstream_for(model_id)) is not None:
        return _model(model_id, int(time.time()), request, owner=upstream.name)
    name, _, entry = pool.resolve(model_id)
    created = _timestamp(entry.added_at) if entry is not None else int(time.time())
    return _model(name, created, request)


def _anthropic(request: Request) -> bool:
    """The Anthropic SDK asks for models under the same path, and says so with its version header."""
    return "anthropic-version" in request.headers


def _model(name: str, created: int, request: Request, owner: str = "llmrun") -> dict[str, Any]:
    if _anthropic(request):
        from datetime import datetime, timezone

        when = datetime.fromtimestamp(created, timezone.utc).isoformat().replace("+00:00", "Z")
        return {"type": "model", "id": name, "display_name": name, "created_at": when}
    return {"id": name, "object": "model", "created": created, "owned_by": owner}


def _timestamp(iso: str) -> int:
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0
