"""Upstream engines: model names a server routes to other OpenAI-compatible servers (vLLM, TGI, SGLang,
llama-server, another llmrun), declared in ``serve --config FILE``.

An upstream request is the same ``InferenceRequest`` as a local one, sent as an OpenAI chat (or completion)
request, and its answer comes back as the same ``Event`` stream: every API llmrun speaks reaches upstream models,
and nothing above ``inference.start`` knows where a model runs. Replicas of one upstream share its models; each
request goes to the healthy one with the fewest requests in flight. A replica that refuses a connection, answers
5xx, sends garbage or says nothing before the first token is taken out and the request tried on the next, which is
safe because nothing has reached the client yet; a background check every ``health_interval_s`` takes it back in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from llmrun.client import choice_delta, error_detail, refusal_kind, response_format, stream_error
from llmrun.errors import LlmrunError, ModelNotFound, PromptTooLong, UpstreamError, UpstreamTimeout, UsageError
from llmrun.generation import TokenLogprob
from llmrun.server.config import UpstreamConfig
from llmrun.server.inference import (
    Event,
    Finished,
    InferenceRequest,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from llmrun.tools import ToolCall

if TYPE_CHECKING:
    from llmrun.server.pool import ModelPool

T = TypeVar("T")

HEALTH_TIMEOUT_S = 5.0
KEEP_ALIVE_S = 2.0
STALE_RETRIES = 1  # a request sent again to the same replica when its pooled connection turned out closed
# Sampling fields sent on, named as in SamplingParams, the OpenAI API and llama.cpp's and vLLM's servers alike.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
                   "frequency_penalty", "seed")  # fmt: skip


@dataclass(eq=False)
class Replica:
    """One URL of an upstream, and what llmrun knows of it."""

    url: str
    healthy: bool = True
    in_flight: int = 0
    last_error: str = ""
    requests: int = 0
    failures: int = 0


@dataclass(eq=False)
class Upstream:
    """One upstream: its replicas, its models, and the requests sent to it."""

    config: UpstreamConfig
    replicas: list[Replica]
    http: httpx.AsyncClient  # shared by all upstreams: pooled connections
    discovered: tuple[str, ...] = ()  # model names its replicas list, when the config names none
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def models(self) -> tuple[str, ...]:
        return self.config.models or self.discovered

    def pick(self, tried: set[Replica]) -> Replica | None:
        """The healthy replica with the fewest requests in flight (an unhealthy one only when none is healthy)."""
        candidates = [replica for replica in self.replicas if replica not in tried]
        healthy = [replica for replica in candidates if replica.healthy]
        pool = healthy or candidates
        return min(pool, key=lambda replica: replica.in_flight) if pool else None

    async def embed(self, model: str, inputs: list[Any]) -> tuple[list[list[float]], int]:
        """Embeddings from the upstream's /v1/embeddings (tried on each replica until one answers)."""
        body = {"model": model, "input": inputs, "encoding_format": "float"}

        async def attempt(replica: Replica) -> httpx.Response:
            replica.in_flight += 1
            try:
                return await self._send(replica, "/v1/embeddings", body, stream=False)
            finally:
                replica.in_flight -= 1

        response = await self._on_replicas(attempt)
        try:
            data = response.json()
            vectors = [entry["embedding"] for entry in sorted(data["data"], key=lambda entry: entry["index"])]
            tokens = int((data.get("usage") or {}).get("prompt_tokens") or 0)
        except (ValueError, KeyError, TypeError):
            raise UpstreamError(f"upstream {self.name} sent embeddings that do not parse", "see its log") from None
        return vectors, tokens

    async def start_stream(self, pool: ModelPool, request: InferenceRequest) -> UpstreamStream:
        """Send ``request`` and wait for its first event, on another replica if one fails before that."""
        path, body = request_body(request)

        async def attempt(replica: Replica) -> UpstreamStream:
            replica.in_flight += 1  # until the stream closes
            replica.requests += 1
            began = time.perf_counter()
            response: httpx.Response | None = None
            try:
                response = await self._send(replica, path, body, stream=True)
                events = _events(response, self, request.n, began)
                first = await _first(events)
            except BaseException:  # a failure to retry, a refusal (4xx), or the client left
                replica.in_flight -= 1
                if response is not None:
                    await response.aclose()
                raise
            return UpstreamStream(request, pool, replica, response, events, first, began)

        return await self._on_replicas(attempt)

    async def _on_replicas(self, attempt: Callable[[Replica], Awaitable[T]]) -> T:
        """``attempt`` on the healthy replica with the fewest requests in flight, then on the next while one fails
        before anything reached the client (``_Retry``: it is taken out until a health check takes it back), and
        once more on the same one when the connection it was sent on had been closed by the replica meanwhile."""
        tried: set[Replica] = set()
        last: LlmrunError | None = None
        stale = STALE_RETRIES
        while (replica := self.pick(tried)) is not None:
            tried.add(replica)
            try:
                return await attempt(replica)
            except _Retry as retry:
                if retry.stale and stale:  # a pooled connection the replica had closed: not the replica's fault
                    stale -= 1
                    tried.discard(replica)
                    continue
                replica.failures += 1
                replica.healthy, replica.last_error = False, retry.error.message
                last = retry.error
        raise last or UpstreamError(f"upstream {self.name} has no replica", "add urls to its config")

    async def _send(self, replica: Replica, path: str, body: dict[str, Any], stream: bool) -> httpx.Response:
        """The response's status line; a failure that another replica may not have raises ``_Retry``."""
        config = self.config
        timeout = httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s)
        request = self.http.build_request("POST", replica.url + path, json=body, headers=self.headers,
                                          timeout=timeout)  # fmt: skip
        where = f"upstream {self.name} ({replica.url})"
        try:
            response = await self.http.send(request, stream=stream)
        except httpx.TimeoutException:
            raise _Retry(UpstreamTimeout(f"{where} did not answer within its timeout", "see its log")) from None
        except httpx.TransportError as error:
            failure = UpstreamError(f"{where} cannot be reached: {error or type(error).__name__}", "is it running?")
            raise _Retry(failure, stale=isinstance(error, httpx.RemoteProtocolError)) from None
        if response.status_code < 400:
            return response
        try:
            await response.aread()
        except httpx.HTTPError:
            pass
        finally:
            await response.aclose()
        refusal = _refusal(response, where, str(body.get("model", "")))
        if response.status_code >= 500 or response.status_code == 429:
            raise _Retry(refusal)
        raise refusal


class Upstreams:
    """The upstream engines of a server: routing by model name, health checks, one pooled HTTP client."""

    def __init__(self, configs: tuple[UpstreamConfig, ...]) -> None:
        self.http = httpx.AsyncClient(
            # Idle connections are dropped well before servers close theirs (llama-server and uvicorn: 5 s), so a
            # request is never sent on one the upstream is closing.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=KEEP_ALIVE_S),
            trust_env=False,
        )
        self.upstreams: list[Upstream] = []
        for config in configs:
            headers = {}
            if config.api_key_env:
                key = os.environ.get(config.api_key_env, "")
                if not key:
                    raise UsageError(
                        f"upstream {config.name}: the environment variable {config.api_key_env} is not set",
                        f"export {config.api_key_env}=KEY before `llmrun serve`",
                    )
                headers["Authorization"] = f"Bearer {key}"
            self.upstreams.append(Upstream(config, [Replica(url) for url in config.urls], self.http, headers=headers))
        self._checks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Check every replica once (and learn the models of upstreams that name none), then keep checking."""
        await asyncio.gather(*(self._check(upstream, replica) for upstream in self.upstreams
                               for replica in upstream.replicas))  # fmt: skip
        for upstream in self.upstreams:
            self._checks.append(asyncio.ensure_future(self._keep_checking(upstream)))

    async def close(self) -> None:
        for task in self._checks:
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)
        await self.http.aclose()

    def route(self, model: str) -> Upstream | None:
        """The upstream serving ``model`` (``:latest`` ignored, as Ollama's clients add it), if any."""
        name = model.strip()
        for candidate in (name, name.removesuffix(":latest")):
            for upstream in self.upstreams:
                if candidate in upstream.models:
                    return upstream
        return None

    def models(self) -> list[tuple[str, Upstream]]:
        return [(model, upstream) for upstream in self.upstreams for model in upstream.models]

    async def _keep_checking(self, upstream: Upstream) -> None:
        while True:
            await asyncio.sleep(upstream.config.health_interval_s)
            await asyncio.gather(*(self._check(upstream, replica) for replica in upstream.replicas))

    async def _check(self, upstream: Upstream, replica: Replica) -> None:
        """A replica is healthy when its /v1/models answers 200 with JSON."""
        timeout = min(HEALTH_TIMEOUT_S, upstream.config.health_interval_s)
        try:
            response = await self.http.get(f"{replica.url}/v1/models", headers=upstream.headers, timeout=timeout)
            listed = response.json().get("data", []) if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError) as error:
            replica.healthy, replica.last_error = False, str(error) or type(error).__name__
            return
        if listed is None:
            replica.healthy, replica.last_error = False, f"/v1/models answered {response.status_code}"
            return
        replica.healthy, replica.last_error = True, ""
        if not upstream.config.models and isinstance(listed, list):
            names = [str(entry["id"]) for entry in listed if isinstance(entry, dict) and entry.get("id")]
            upstream.discovered = tuple(dict.fromkeys([*upstream.discovered, *names]))


class _Retry(Exception):
    """A replica failed before anything reached the client: try the next one (or, for a connection the replica
    closed between two requests, ``stale``, the same one again)."""

    def __init__(self, error: LlmrunError, stale: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.stale = stale


class UpstreamRefused(LlmrunError):
    """An upstream refused the request (4xx): the client gets the same status and the upstream's reason."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.http_status = status


def _refusal(response: httpx.Response, where: str, model: str) -> LlmrunError:
    message, code = error_detail(response.content, response.reason_phrase)
    text = f"{where}: {message}"
    status = response.status_code
    if status >= 500:
        return UpstreamError(f"{where} answered {status}: {message}", "see its log")
    if status in (401, 403):  # the upstream refused llmrun's key, not the client's: a server-side problem (502)
        return UpstreamError(f"{where} refused llmrun's key ({status}: {message})", "set api_key_env in the config")
    kind = refusal_kind(status, message, code)
    if kind is ModelNotFound:
        return ModelNotFound(text, f"check the models of upstream {where.split()[1]} in the config")
    if kind is PromptTooLong:
        return PromptTooLong(text)
    return UpstreamRefused(text, status)


def request_body(request: InferenceRequest) -> tuple[str, dict[str, Any]]:
    """An ``InferenceRequest`` as an OpenAI request: its path and body (always streamed, with usage)."""
    body: dict[str, Any] = {"model": request.model, "stream": True, "stream_options": {"include_usage": True}}
    sampling = request.sampling
    if sampling is not None:  # only what the client set: the rest is the upstream's own default
        for name in SAMPLING_FIELDS:
            if name in sampling.explicit:
                body[name] = getattr(sampling, name)
        if "logit_bias" in sampling.explicit and sampling.logit_bias:
            body["logit_bias"] = {str(token): bias for token, bias in sampling.logit_bias}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.stop:
        body["stop"] = list(request.stop)
    if request.n > 1:
        body["n"] = request.n
    if request.ignore_eos:
        body["ignore_eos"] = True
    if request.messages is None:
        body["prompt"] = request.prompt or ""
        if request.logprobs is not None:
            body["logprobs"] = request.logprobs
        return "/v1/completions", body
    messages = [_message(message) for message in request.messages]
    if request.prefill:
        messages.append({"role": "assistant", "content": request.prefill})
    body["messages"] = messages
    if request.logprobs is not None:
        body["logprobs"] = True
        body["top_logprobs"] = request.logprobs
    if (wanted := response_format(request.json_schema, request.json_any)) is not None:
        body["response_format"] = wanted
    if request.tools:
        body["tools"] = [
            {"type": "function",
             "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters}}
            for tool in request.tools
        ]  # fmt: skip
        choice = request.tool_choice
        named = {"type": "function", "function": {"name": choice.name}}
        body["tool_choice"] = named if choice.mode == "function" else choice.mode
        body["parallel_tool_calls"] = request.parallel_tool_calls
    if request.think is not None:
        body["chat_template_kwargs"] = {"enable_thinking": request.think}
    if request.effort is not None:
        body["reasoning_effort"] = request.effort
    return "/v1/chat/completions", body


def _message(message: dict[str, Any]) -> dict[str, Any]:
    """An internal message in OpenAI's shape: tool call arguments as JSON text (Ollama sends objects)."""
    converted = dict(message)
    if calls := converted.get("tool_calls"):
        converted["tool_calls"] = []
        for call in calls:
            arguments = call["function"].get("arguments", "{}")
            text = arguments if isinstance(arguments, str) else json.dumps(arguments)
            converted["tool_calls"].append({**call, "function": {**call["function"], "arguments": text}})
    return converted


async def _first(events: AsyncIterator[Event]) -> list[Event]:
    """The first event (an upstream that hangs is cut off by the HTTP client's read timeout, as ``_Retry``)."""
    async for event in events:
        return [event]
    return []


async def _sse_data(response: httpx.Response) -> AsyncIterator[bytes]:
    """The ``data:`` fields of a server-sent event stream, as bytes (read raw: one decode less per token)."""
    pending = b""
    async for received in response.aiter_bytes():
        pending += received
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()
    if pending.startswith(b"data:"):
        yield pending[5:].strip()


async def _events(response: httpx.Response, upstream: Upstream, n: int, began: float) -> AsyncIterator[Event]:
    """An upstream's SSE stream as llmrun's events; before the first event a failure is ``_Retry``, after it an
    ``UpstreamError`` (the caller ends the answer with it)."""
    state = [_Answer() for _ in range(max(1, n))]
    usage: dict[str, Any] = {}
    sent = False
    where = f"upstream {upstream.name}"
    try:
        async for data in _sse_data(response):
            if data == b"[DONE]":
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                raise UpstreamError(f"{where} sent something that is not JSON: {data[:60]!r}", "see its log") from None
            if not isinstance(chunk, dict):
                raise UpstreamError(f"{where} sent a chunk that is not an object", "see its log")
            if (failure := stream_error(chunk)) is not None:
                raise UpstreamError(f"{where}: {failure}")
            if isinstance(chunk.get("usage"), dict):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                if not isinstance(choice, dict):
                    continue
                index = int(choice.get("index") or 0)
                if not 0 <= index < len(state):
                    continue
                for event in state[index].feed(index, choice):
                    sent = True
                    yield event
    except httpx.TimeoutException:
        timeout = UpstreamTimeout(f"{where} sent nothing within its read timeout", "see its log")
        if not sent:
            raise _Retry(timeout) from None
        raise timeout from None
    except httpx.TransportError as failure:
        dropped = UpstreamError(f"{where} closed the connection mid-answer ({failure})", "try again")
        if not sent:
            raise _Retry(dropped) from None
        raise dropped from None
    except UpstreamError as failure:
        if not sent:
            raise _Retry(failure) from None
        raise
    finally:
        await response.aclose()
    if not any(answer.finish_reason for answer in state) and not sent:
        raise _Retry(UpstreamError(f"{where} ended its answer without a token", "see its log"))
    total = time.perf_counter() - began
    for index, answer in enumerate(state):
        yield answer.finished(index, usage, n, began, total)


@dataclass
class _Answer:
    """One choice as it streams from an upstream."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: dict[int, list[str]] = field(default_factory=dict)  # index: [id, name, arguments...]
    finish_reason: str = ""
    tokens: int = 0
    first: float | None = None
    last: float | None = None

    def feed(self, index: int, choice: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        delta, thinking, content = choice_delta(choice)
        if thinking:
            self.reasoning.append(thinking)
            events.append(ReasoningDelta(index, thinking))
        logprobs = _logprobs(choice.get("logprobs"))
        if content or logprobs:
            self.text.append(content)
            events.append(TextDelta(index, content, logprobs))
        for call in delta.get("tool_calls") or []:
            if not isinstance(call, dict):
                continue
            call_index = int(call.get("index") or 0)
            given = call.get("function")
            function: dict[str, Any] = given if isinstance(given, dict) else {}
            parts = self.calls.get(call_index)
            if parts is None:
                parts = self.calls[call_index] = [str(call.get("id") or f"call_{call_index}"),
                                                  str(function.get("name") or ""), ""]  # fmt: skip
                events.append(ToolCallDelta(index, call_index, parts[0], parts[1], ""))
            arguments = function.get("arguments")
            if isinstance(arguments, str) and arguments:
                parts[2] += arguments
                events.append(ToolCallDelta(index, call_index, None, None, arguments))
        if events:
            now = time.perf_counter()
            self.first = self.first or now
            self.last = now
            self.tokens += 1
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])
        return events

    def finished(self, index: int, usage: dict[str, Any], n: int, began: float, total_s: float) -> Finished:
        calls = []
        for call_index in sorted(self.calls):
            call_id, name, arguments = self.calls[call_index]
            try:
                json.loads(arguments or "{}")
            except ValueError:
                raise UpstreamError(f"the upstream's call of {name} has arguments that are not JSON", "see its log") \
                    from None  # fmt: skip
            calls.append(ToolCall(call_id, name, arguments or "{}"))
        completion = int(usage.get("completion_tokens") or 0)
        prompt = int(usage.get("prompt_tokens") or 0)
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        counted = completion if n == 1 and completion else self.tokens
        reason = self.finish_reason or "stop"
        if reason == "tool_calls" and not calls:
            reason = "stop"
        first = self.first or (began + total_s)
        return Finished(
            index=index, finish_reason=reason, text="".join(self.text), usage=Usage(prompt, counted, cached),
            time_to_first_token_s=first - began, generation_s=(self.last or first) - first, total_s=total_s,
            tool_calls=tuple(calls), reasoning="".join(self.reasoning),
        )  # fmt: skip


def _logprobs(value: Any) -> list[TokenLogprob]:
    """OpenAI chat logprobs (``content`` entries) or completion logprobs, as llmrun's."""
    if not isinstance(value, dict):
        return []
    entries = []
    if isinstance(value.get("content"), list):
        for entry in value["content"]:
            if not isinstance(entry, dict):
                continue
            top = tuple((str(alt.get("token", "")), bytes(alt.get("bytes") or []), float(alt.get("logprob", 0.0)))
                        for alt in entry.get("top_logprobs") or [] if isinstance(alt, dict))  # fmt: skip
            entries.append(TokenLogprob(str(entry.get("token", "")), bytes(entry.get("bytes") or []),
                                        float(entry.get("logprob", 0.0)), top))  # fmt: skip
    elif isinstance(value.get("tokens"), list):
        tops = value.get("top_logprobs") or []
        logprobs = value.get("token_logprobs") or []
        for number, token in enumerate(value["tokens"]):
            logprob = logprobs[number] if number < len(logprobs) else 0.0
            alternatives = tops[number] if number < len(tops) and isinstance(tops[number], dict) else {}
            top = tuple((str(text), str(text).encode(), float(lp)) for text, lp in alternatives.items())
            entries.append(TokenLogprob(str(token), str(token).encode(), float(logprob or 0.0), top))
    return entries


class UpstreamStream:
    """A started upstream request, with ``Stream``'s interface: iterate for events; ``close()`` stops it."""

    def __init__(
        self, request: InferenceRequest, pool: ModelPool, replica: Replica, response: httpx.Response,
        events: AsyncIterator[Event], first: list[Event], began: float,
    ) -> None:  # fmt: skip
        self.request = request
        self.model_name = request.model  # sent on unchanged
        self.replica = replica
        self.load_s = 0.0
        self.prompt_tokens = 0  # an upstream says only at the end
        self.created = time.time()
        self._pool = pool
        self._response = response
        self._events = events
        self._first = first
        self._began = began
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[Event]:
        finished: set[int] = set()
        try:
            async for event in self._all_events():
                if isinstance(event, Finished):
                    finished.add(event.index)
                    self._pool.finished(self.request, self.model_name, event)
                yield event
        except (LlmrunError, _Retry) as failure:  # after the first token: the answer ends with the error
            error = failure.error if isinstance(failure, _Retry) else failure
            self.replica.failures += 1
            total = time.perf_counter() - self._began
            for index in sorted(set(range(self.request.n)) - finished):
                yield Finished(index, "error", "", Usage(0, 0), 0.0, 0.0, total, error=error)
        finally:
            await self.aclose()

    async def _all_events(self) -> AsyncIterator[Event]:
        for event in self._first:  # read before the request was known to be answered
            yield event
        async for event in self._events:
            yield event

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.replica.in_flight -= 1
        closer = getattr(self._events, "aclose", None)
        if closer is not None:
            with contextlib.suppress(Exception):
                await closer()
        await self._response.aclose()

    def close(self) -> None:
        """Stop the upstream request (from sync code: the connection closes on the event loop)."""
        if not self._closed:
            asyncio.ensure_future(self.aclose())
