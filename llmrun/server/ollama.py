"""The Ollama API under ``/api``: chat, generate, embed, tags, show, ps, pull, delete, copy, version.

Only translation, as in ``openai.py``: NDJSON streams (Ollama streams unless told
``"stream": false``), durations in nanoseconds, ``options`` for sampling.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from pydantic import Field

from llmrun import __version__
from llmrun.errors import LlmrunError, ModelNotFound, UsageError
from llmrun.server.inference import Finished, InferenceRequest, ReasoningDelta, Stream, TextDelta, embed, start
from llmrun.server.pool import LoadedModel, parse_keep_alive
from llmrun.server.sampling import sampling_from
from llmrun.server.transport import EventStream, Lenient, unless_disconnected
from llmrun.tools import NO_PARAMETERS, Tool, ToolCall

if TYPE_CHECKING:
    from llmrun.server.pool import ModelPool
    from llmrun.server.upstream import Upstream
    from llmrun.store.store import ModelEntry, Store

router = APIRouter(prefix="/api")
NDJSON = "application/x-ndjson"


class Options(Lenient):
    temperature: float | None = Field(default=None, ge=0)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0, le=1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, ge=0)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    num_predict: int | None = None
    stop: list[str] | str | None = None
    num_ctx: int | None = Field(default=None, ge=1)
    ignore_eos: bool = False  # llmrun's (and llama-server's): generate num_predict tokens, for load tests


class FunctionDefinition(Lenient):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDefinition(Lenient):
    type: str = "function"
    function: FunctionDefinition


class ToolCallFunction(Lenient):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)


class MessageToolCall(Lenient):
    id: str | None = None
    function: ToolCallFunction


class ChatMessage(Lenient):
    role: str
    content: str | None = ""
    images: list[str] | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_name: str | None = None  # a tool result's tool
    thinking: str | None = None  # an assistant turn's thinking


class _Generation(Lenient):
    model: str
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    keep_alive: str | float | int | None = None


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(default_factory=list)
    tools: list[ToolDefinition] | None = None
    think: bool | str | None = None  # a reasoning model thinks first ("low"/"medium"/"high" count as true)


class GenerateRequest(_Generation):
    prompt: str = ""
    think: bool | str | None = None
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None
    suffix: str | None = None


class EmbedRequest(Lenient):
    model: str
    input: str | list[str] = ""
    keep_alive: str | float | int | None = None
    truncate: bool = True


class LegacyEmbeddingsRequest(Lenient):
    model: str
    prompt: str = ""


class ModelRequest(Lenient):
    model: str | None = None
    name: str | None = None  # older clients send ``name``

    @property
    def model_name(self) -> str:
        name = self.model or self.name
        if not name:
            raise UsageError("no model named in the request", 'send {"model": NAME}')
        return name


class PullRequest(ModelRequest):
    stream: bool = True
    insecure: bool = False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat().replace("+00:00", "Z")


def _format(value: str | dict[str, Any] | None) -> tuple[dict[str, Any] | None, bool]:
    if value is None or value == "":
        return None, False
    if value == "json":
        return None, True
    if isinstance(value, dict):
        return value, False
    raise UsageError(f"format {value!r} is not supported", 'give "json" or a JSON schema object')


def _think(value: bool | str | None) -> bool | None:
    return value if isinstance(value, bool) or value is None else value.lower() not in ("false", "none", "")


def _effort(value: bool | str | None) -> str | None:
    """``think: "high"`` (gpt-oss's way) also says how hard to think."""
    return value.lower() if isinstance(value, str) else None


def _request(body: _Generation, route: str, **fields: Any) -> InferenceRequest:
    options = body.options or Options()
    stop = options.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    max_tokens = options.num_predict if options.num_predict is not None and options.num_predict > 0 else None
    schema, json_any = _format(body.format)
    sampling = sampling_from(
        temperature=options.temperature, top_k=options.top_k, top_p=options.top_p, min_p=options.min_p,
        repeat_penalty=options.repeat_penalty, presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty, seed=options.seed,
        repeat_last_n=options.repeat_last_n if options.repeat_last_n != -1 else None,
    )  # fmt: skip
    return InferenceRequest(
        model=body.model, sampling=sampling, max_tokens=max_tokens, stop=stops, json_schema=schema,
        json_any=json_any, ignore_eos=options.ignore_eos, keep_alive_s=parse_keep_alive(body.keep_alive), route=route,
        **fields,
    )  # fmt: skip


def _durations(stream: Stream, event: Finished) -> dict[str, Any]:
    return {
        "total_duration": int((event.total_s + stream.load_s) * 1e9),
        "load_duration": int(stream.load_s * 1e9),
        "prompt_eval_count": event.usage.evaluated_prompt_tokens,
        "prompt_eval_duration": int(event.time_to_first_token_s * 1e9),
        "eval_count": event.usage.completion_tokens,
        "eval_duration": int(event.generation_s * 1e9),
    }


def _done_reason(event: Finished) -> str:
    return "length" if event.finish_reason == "length" else "stop"


def _ndjson(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"


async def _ndjson_stream(stream: Stream, records: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    try:
        async for record in records:
            yield _ndjson(record)
    except Exception as error:  # noqa: BLE001 - the status line is sent: report in the stream, as Ollama does
        yield _ndjson({"error": str(error)})
    finally:
        stream.close()


async def _respond(
    request: Request,
    stream: Stream,
    streaming: bool,
    piece: Callable[[str], dict[str, Any]],
    final: Callable[[str], dict[str, Any]],
    thinking: Callable[[str], dict[str, Any]] | None = None,
) -> Any:
    """Ollama's two shapes of one answer: a line per piece and a last line with the counts, or one object."""
    model_name = stream.model_name

    async def records() -> AsyncIterator[dict[str, Any]]:
        async for event in stream:
            if isinstance(event, TextDelta):
                yield {"model": model_name, "created_at": _now(), **piece(event.text), "done": False}
            elif isinstance(event, ReasoningDelta) and thinking is not None:
                yield {"model": model_name, "created_at": _now(), **thinking(event.text), "done": False}
            elif isinstance(event, Finished):
                if event.error is not None:
                    raise event.error
                if event.tool_calls:  # whole calls, as Ollama sends them, just before the last line
                    message = {"role": "assistant", "content": "", "tool_calls": _tool_calls(event.tool_calls)}
                    yield {"model": model_name, "created_at": _now(), "message": message, "done": False}
                yield {"model": model_name, "created_at": _now(), **final(""), "done": True,
                       "done_reason": _done_reason(event), **_durations(stream, event)}  # fmt: skip

    if streaming:
        return EventStream(_ndjson_stream(stream, records()), media_type=NDJSON)

    async def gather() -> dict[str, Any]:
        text: list[str] = []
        thought: list[str] = []
        calls: list[dict[str, Any]] = []
        last: dict[str, Any] = {}
        try:
            async for record in records():
                where = record.get("message", record)
                if record["done"]:
                    last = record
                elif "tool_calls" in where:
                    calls += where["tool_calls"]
                elif "thinking" in where:
                    thought.append(where["thinking"])
                else:
                    text.append(next(iter(piece_text(record))))
        finally:
            stream.close()
        whole = {**last, **final("".join(text))}
        if thought:  # beside the answer: in the message (chat) or the record (generate)
            if "message" in whole:
                whole["message"] = {**whole["message"], "thinking": "".join(thought)}
            else:
                whole["thinking"] = "".join(thought)
        if calls:
            whole["message"] = {**whole["message"], "tool_calls": calls}
        return whole

    return await unless_disconnected(request, gather())


def piece_text(record: dict[str, Any]) -> list[str]:
    if "message" in record:
        return [record["message"]["content"]]
    return [record["response"]]


async def _load_or_unload(request: Request, body: _Generation, shape: dict[str, Any]) -> dict[str, Any]:
    """An empty chat or prompt: load the model (or unload it with keep_alive 0), as Ollama does."""
    pool = request.app.state.pool
    keep_alive = parse_keep_alive(body.keep_alive)
    if pool.upstream_for(body.model) is not None:  # an upstream keeps its models loaded itself
        return {"model": body.model, "created_at": _now(), **shape, "done": True, "done_reason": "load"}
    if keep_alive == 0:
        name, _, _ = await asyncio.to_thread(pool.resolve, body.model)
        await pool.unload(name)
        reason = "unload"
    else:
        model = await pool.acquire(body.model)
        pool.release(model, keep_alive)
        name, reason = model.name, "load"
    return {"model": name, "created_at": _now(), **shape, "done": True, "done_reason": reason}


def _messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Ollama's messages in the internal (OpenAI-like) shape; calls get ids so results can name them."""
    converted = []
    for number, message in enumerate(messages):
        entry: dict[str, Any] = {"role": message.role, "content": message.content or ""}
        if message.tool_calls:
            entry["tool_calls"] = [
                {"id": call.id or f"call_{number}_{index}", "type": "function",
                 "function": {"name": call.function.name, "arguments": call.function.arguments}}
                for index, call in enumerate(message.tool_calls)
            ]  # fmt: skip
        if message.role == "tool" and message.tool_name:
            entry["name"] = message.tool_name
        if message.role == "assistant" and message.thinking:
            entry["reasoning_content"] = message.thinking
        converted.append(entry)
    return converted


def _tool_calls(calls: tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    """Calls in Ollama's shape: arguments as an object."""
    return [{"id": call.id, "function": {"index": index, "name": call.name, "arguments": json.loads(call.arguments)}}
            for index, call in enumerate(calls)]  # fmt: skip


@router.post("/chat", response_model=None)
async def chat(body: ChatRequest, request: Request) -> Any:
    if not body.messages:
        return await _load_or_unload(request, body, {"message": {"role": "assistant", "content": ""}})
    if any(message.images for message in body.messages):
        raise UsageError("images are not supported: llmrun serves text-only models", "send text messages only")
    tools = tuple(
        Tool(tool.function.name, tool.function.description or "", tool.function.parameters or dict(NO_PARAMETERS))
        for tool in body.tools or []
    )
    fields = {"messages": _messages(body.messages), "tools": tools, "think": _think(body.think),
              "effort": _effort(body.think)}  # fmt: skip
    stream = await start(request.app.state.pool, _request(body, "/api/chat", **fields))
    return await _respond(
        request,
        stream,
        body.stream,
        lambda text: {"message": {"role": "assistant", "content": text}},
        lambda text: {"message": {"role": "assistant", "content": text}},
        None if body.think is False else lambda text: {"message": {"role": "assistant", "content": "",
                                                                     "thinking": text}},
    )  # fmt: skip


@router.post("/generate", response_model=None)
async def generate(body: GenerateRequest, request: Request) -> Any:
    if body.images:
        raise UsageError("images are not supported: llmrun serves text-only models", "send a text prompt only")
    if not body.prompt:
        return await _load_or_unload(request, body, {"response": ""})
    if body.raw:
        fields: dict[str, Any] = {"prompt": body.prompt}
    else:
        messages = [{"role": "system", "content": body.system}] if body.system else []
        fields = {"messages": [*messages, {"role": "user", "content": body.prompt}], "think": _think(body.think),
                  "effort": _effort(body.think)}  # fmt: skip
    stream = await start(request.app.state.pool, _request(body, "/api/generate", **fields))
    return await _respond(
        request, stream, body.stream, lambda text: {"response": text}, lambda text: {"response": text, "context": []},
        None if body.think is False else lambda text: {"response": "", "thinking": text},
    )  # fmt: skip


@router.post("/embed", response_model=None)
async def embed_route(body: EmbedRequest, request: Request) -> Any:
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    if not inputs or any(not text for text in inputs):
        raise UsageError("input is empty", "give a string or a list of strings")
    began = time.perf_counter()
    vectors, n_tokens = await embed(request.app.state.pool, body.model, inputs)
    model = request.app.state.pool.find_loaded(body.model)
    return {
        "model": model.name if model else body.model, "embeddings": vectors,
        "total_duration": int((time.perf_counter() - began) * 1e9), "load_duration": 0, "prompt_eval_count": n_tokens,
    }  # fmt: skip


@router.post("/embeddings", response_model=None)
async def legacy_embeddings(body: LegacyEmbeddingsRequest, request: Request) -> Any:
    if not body.prompt:
        raise UsageError("prompt is empty", "give the text to embed")
    vectors, _ = await embed(request.app.state.pool, body.model, [body.prompt])
    return {"embedding": vectors[0]}


def _details(info: dict[str, Any]) -> dict[str, Any]:
    family = info.get("architecture") or ""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": _parameter_size(info.get("parameter_count")),
        "quantization_level": info.get("quantization") or "",
    }


def _parameter_size(count: Any) -> str:
    if not isinstance(count, int) or count <= 0:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}".replace(".0", "")
    return str(count)


def _digest(entry: Any) -> str:
    return entry.files[0].sha256 if entry is not None and entry.files else ""


@router.get("/tags", response_model=None)
async def tags(request: Request) -> Any:
    pool = request.app.state.pool
    entries = await asyncio.to_thread(pool.store.entries)
    upstream_models = pool.upstreams.models() if pool.upstreams is not None else []
    routed = {name for name, _ in upstream_models}
    listed = [
        {"name": name, "model": name, "modified_at": _now(), "size": 0, "digest": "", "details": _details({}),
         "upstream": upstream.name}
        for name, upstream in upstream_models
    ]  # fmt: skip
    return {
        "models": listed
        + [
            {
                "name": entry.name,
                "model": entry.name,
                "modified_at": entry.added_at,
                "size": entry.size_bytes,
                "digest": _digest(entry),
                "details": _details(entry.info),
            }  # fmt: skip
            for entry in entries
            if not entry.damage and entry.name not in routed  # an unreadable manifest names no usable model
        ]
    }


@router.post("/show", response_model=None)
async def show(body: ModelRequest, request: Request) -> Any:
    pool = request.app.state.pool
    if (upstream := pool.upstream_for(body.model_name)) is not None:
        return {
            "license": "", "modelfile": f"# served by upstream {upstream.name}\n", "parameters": "", "template": "",
            "details": _details({}), "model_info": {}, "capabilities": ["completion"], "modified_at": _now(),
        }  # fmt: skip
    name, path, entry = await asyncio.to_thread(pool.resolve, body.model_name)
    from llmrun.store.gguf_file import read_model_files, summarize

    summary = await asyncio.to_thread(lambda: summarize(read_model_files(path)))
    info = summary.to_dict()
    architecture = info.get("architecture") or ""
    model_info = {"general.architecture": architecture, "general.parameter_count": info.get("parameter_count")}
    for key in ("context_length", "block_count", "embedding_length", "head_count", "head_count_kv"):
        if info.get(key) is not None:
            model_info[f"{architecture}.{key}"] = info[key]
    return {
        "license": info.get("license") or "",
        "modelfile": f"# llmrun model {name}\nFROM {path}\n",
        "parameters": "",
        "template": summary.chat_template or "",
        "details": _details(info),
        "model_info": model_info,
        "capabilities": ["completion", "embedding"],
        "modified_at": entry.added_at if entry is not None else _now(),
    }


def _ps_record(model: LoadedModel) -> dict[str, Any]:
    info = model.entry.info if model.entry is not None else {}
    return {
        "name": model.name,
        "model": model.name,
        "size": model.size_bytes,
        "digest": _digest(model.entry),
        "details": _details(info),
        "expires_at": _iso(model.expires_at) if model.expires_at is not None else None,
        "size_vram": 0,
        "context_length": model.engine.seq_capacity,
        # llmrun's own, for `llmrun ps`
        "slots": model.engine.scheduler.n_slots,
        "busy_slots": model.worker.busy_slots,
        "in_flight": model.in_flight,
        "keep_alive_s": model.keep_alive_s,
    }


def _upstream_record(name: str, upstream: Upstream) -> dict[str, Any]:
    replicas = [{"url": replica.url, "healthy": replica.healthy, "in_flight": replica.in_flight,
                 "requests": replica.requests, "failures": replica.failures, "last_error": replica.last_error}
                for replica in upstream.replicas]  # fmt: skip
    return {
        "name": name, "model": name, "size": 0, "digest": "", "details": _details({}), "expires_at": None,
        "size_vram": 0, "context_length": 0,
        # llmrun's own, for `llmrun ps`
        "upstream": upstream.name, "replicas": replicas,
        "in_flight": sum(replica.in_flight for replica in upstream.replicas),
    }  # fmt: skip


@router.get("/ps", response_model=None)
async def ps(request: Request) -> Any:
    pool = request.app.state.pool
    local = [_ps_record(model) for model in pool.models.values()]
    upstream = [_upstream_record(name, upstream) for name, upstream in pool.upstreams.models()] if pool.upstreams \
        else []  # fmt: skip
    return {"models": local + upstream}


@router.post("/pull", response_model=None)
async def pull(body: PullRequest, request: Request) -> Any:
    from llmrun.settings import get_settings
    from llmrun.store.models import PullOptions, pull_model

    pool = request.app.state.pool
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def put(record: dict[str, Any] | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, record)

    class Progress:
        """The tqdm-like slice the download uses, reported as Ollama's progress records."""

        def __init__(self, *args: Any, total: int | None = None, initial: int = 0, desc: str | None = None,
                     **_: Any) -> None:  # fmt: skip
            self.total, self.n, self.name = total or 0, initial, (desc or "").rsplit("/", 1)[-1]
            self._last = 0.0
            put({"status": f"pulling {self.name}", "digest": self.name, "total": self.total, "completed": self.n})

        def __enter__(self) -> Progress:
            return self

        def __exit__(self, *exc_info: object) -> None:
            self.close()

        def update(self, n: int | float | None = 1) -> None:
            self.n += int(n or 0)
            now = time.monotonic()
            if now - self._last >= 0.25:
                self._last = now
                put({"status": f"pulling {self.name}", "digest": self.name, "total": self.total,
                     "completed": self.n})  # fmt: skip

        def close(self) -> None:
            put({"status": f"pulling {self.name}", "digest": self.name, "total": self.total, "completed": self.n})

    _not_upstream(pool, body.model_name)
    settings = get_settings()
    options = PullOptions(
        hub_cache=settings.hub_cache, shared_cache=settings.hf_cache is not None, progress=Progress,
        on_status=lambda message: put({"status": message}),
    )  # fmt: skip
    name = body.model_name

    def run() -> None:
        try:
            result = pull_model(pool.store, name, options)
            put({"status": "verifying sha256 digest"})
            put({"status": "writing manifest"})
            put({"status": "success", "model": result.entry.name})
        except LlmrunError as error:
            put({"error": str(error), "_status": error.http_status})
        except Exception as error:  # noqa: BLE001 - reported to the client, the server goes on
            put({"error": f"pull failed: {error}", "_status": 500})
        finally:
            put(None)

    put({"status": "pulling manifest"})
    task = loop.run_in_executor(None, run)

    async def records() -> AsyncIterator[dict[str, Any]]:
        while (record := await queue.get()) is not None:
            record.pop("_status", None)
            yield record
        await task

    if body.stream:

        async def lines() -> AsyncIterator[str]:
            async for record in records():
                yield _ndjson(record)

        return EventStream(lines(), media_type=NDJSON)
    last: dict[str, Any] = {}
    while (record := await queue.get()) is not None:
        last = record
    await task
    if "error" in last:
        from fastapi.responses import JSONResponse

        return JSONResponse({"error": last["error"]}, status_code=last.get("_status", 500))
    return {"status": "success"}


def _not_upstream(pool: ModelPool, name: str) -> None:
    if (upstream := pool.upstream_for(name)) is not None:
        raise UsageError(f"{name} is served by upstream {upstream.name}, not from this store", "manage it there")


def _stored(store: Store, name: str) -> ModelEntry:
    """A model in the store by the name an Ollama client sends (``NAME:latest`` for a store's ``NAME``)."""
    entry = store.find(name) or store.find(name.removesuffix(":latest"))
    if entry is None:
        raise ModelNotFound(f"model {name!r} not found", "see /api/tags for the models there are")
    return entry


@router.delete("/delete", response_model=None)
async def delete(body: ModelRequest, request: Request) -> Any:
    pool = request.app.state.pool
    _not_upstream(pool, body.model_name)
    entry = _stored(pool.store, body.model_name)
    await pool.unload(entry.name)
    await asyncio.to_thread(pool.store.remove, entry.name)
    return Response(status_code=200)


class CopyRequest(Lenient):
    source: str
    destination: str


@router.post("/copy", response_model=None)
async def copy(body: CopyRequest, request: Request) -> Any:
    """Another name for a model (as `ollama cp`); the files are not copied. An existing destination is replaced."""
    store = request.app.state.pool.store
    _not_upstream(request.app.state.pool, body.source)
    await asyncio.to_thread(store.copy, _stored(store, body.source).name, body.destination, replace=True)
    return Response(status_code=200)


@router.get("/version", response_model=None)
async def version() -> Any:
    return {"version": __version__}
