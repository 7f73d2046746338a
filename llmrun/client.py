"""A client of a running server, for ``run --server`` and ``chat --server``: a ``llmrun serve``, or any server with
the OpenAI API (llama-server, vLLM, Ollama, ...).

It sends OpenAI chat (or completion) requests, streamed, and gives back what the engine gives in-process: the text
as it comes, thinking apart from the answer, then a ``GenerationResult``. The server's errors become llmrun's
(``ModelNotFound``, ``PromptTooLong``, ``ServerUnreachable``, ...), so the exit codes are the same either way. No
llama.cpp here: a command sent to a server never loads it; and the standard library's ``http.client`` rather than
httpx, whose import alone took 60 ms of a 200 ms ``run --server``.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from llmrun.errors import LlmrunError, ModelNotFound, PromptTooLong, ServerUnreachable, UsageError
from llmrun.generation import GenerationResult, SamplingParams
from llmrun.reasoning import CONTENT, REASONING

# The client's log database: a llmrun server that writes to the same one leaves the exchange to the client, which
# logs it in its conversation (a chat's turns, /undo), so it is logged once.
LOG_HEADER = "X-Llmrun-Log"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 600.0  # between two chunks: a long prompt on a slow CPU, or a queue ahead of it
PROBE_TIMEOUT_S = 0.5  # --server auto: a local server answers /health at once, or is not there


def server_root(url: str) -> str:
    """``http://host:port``, ``…/v1`` or ``…/v1/`` to ``http://host:port`` (the OpenAI API is under ``/v1``)."""
    text = url.strip().rstrip("/")
    if not text.startswith(("http://", "https://")):
        raise UsageError(f"{url!r} is not an http(s) URL", "e.g. --server http://127.0.0.1:11435, or --server auto")
    return text.removesuffix("/v1")


@dataclass(frozen=True)
class Ask:
    """One request to a server: a conversation (or, with ``raw``, a plain prompt) and how to generate."""

    model: str
    messages: list[dict[str, Any]]
    sampling: SamplingParams
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    raw: bool = False  # the messages' text as a plain completion, without the chat template
    json_schema: dict[str, Any] | None = None
    json_any: bool = False
    think: bool | None = None  # a reasoning model's enable_thinking; None: its default

    def body(self) -> dict[str, Any]:
        """The OpenAI request body, with the llama.cpp server fields llmrun, llama-server and vLLM take."""
        sampling = self.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "min_p": sampling.min_p,
            "repeat_penalty": sampling.repeat_penalty,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.stop:
            body["stop"] = list(self.stop)
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.raw:
            body["prompt"] = "\n\n".join(str(message["content"]) for message in self.messages)
            return body
        body["messages"] = self.messages
        if (wanted := response_format(self.json_schema, self.json_any)) is not None:
            body["response_format"] = wanted
        if self.think is not None:
            body["chat_template_kwargs"] = {"enable_thinking": self.think}
        return body


@dataclass
class _Response:
    """A response's status and (for an error) its body, read whole."""

    status: int
    reason: str
    body: bytes
    path: str

    def json(self) -> Any:
        return json.loads(self.body)


class ServerClient:
    """One server's address and key; ``ask`` starts a streamed answer."""

    def __init__(self, url: str, api_key: str | None = None, log_id: str | None = None) -> None:
        self.root = server_root(url)
        parts = urlsplit(self.root)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self.api_key = api_key
        self.log_id = log_id

    def open(
        self, method: str, path: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
        timeout_s: float = READ_TIMEOUT_S,
    ) -> http.client.HTTPResponse:  # fmt: skip
        """Send a request and return the response with its body unread; a server that cannot be reached raises
        ServerUnreachable. Each request has a connection of its own: a command sends a handful."""
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        connection = kind(self._host, self._port, timeout=CONNECT_TIMEOUT_S)
        sent = {"Accept": "application/json, text/event-stream", **(headers or {})}
        if self.api_key:
            sent["Authorization"] = f"Bearer {self.api_key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        try:
            connection.connect()
            if connection.sock is not None:
                connection.sock.settimeout(timeout_s)
            connection.request(method, self._prefix + path, body=data, headers=sent)
            return connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise _unreachable(self.root, error) from None

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout_s: float = READ_TIMEOUT_S
    ) -> _Response:
        """A request whose whole answer is read."""
        response = self.open(method, path, body, timeout_s=timeout_s)
        try:
            return _Response(response.status, response.reason, response.read(), path)
        except (OSError, http.client.HTTPException) as error:
            raise _unreachable(self.root, error) from None
        finally:
            response.close()

    def ask(self, ask: Ask) -> ServerGeneration:
        """Send the request; errors the server answers with (no such model, too long) are raised here."""
        path = "/v1/completions" if ask.raw else "/v1/chat/completions"
        headers = {LOG_HEADER: self.log_id} if self.log_id else {}
        return ServerGeneration(self, path, ask, headers)

    def pull(self, model: str, on_status: Callable[[str], None]) -> bool:
        """Ask the server to pull ``model`` (llmrun's and Ollama's ``/api/pull``); False if it has no such API."""
        response = self.open("POST", "/api/pull", {"model": model})
        try:
            if response.status in (404, 405):
                return False
            if response.status >= 400:
                raise _error(_whole(response, "/api/pull"), self.root, model)
            last = ""
            for line in response:
                record = _json_object(line.decode("utf-8", errors="replace"), self.root)
                if "error" in record:
                    raise LlmrunError(f"{self.root} could not pull {model}: {record['error']}")
                status = str(record.get("status", ""))
                if status and status != last and not status.startswith("pulling "):
                    on_status(status)
                last = status
        except (OSError, http.client.HTTPException) as error:
            raise _unreachable(self.root, error) from None
        finally:
            response.close()
        return True

    def ensure_model(self, model: str, no_pull: bool, on_status: Callable[[str], None]) -> None:
        """Pull ``model`` on the server if it says it has no such model (and ``no_pull`` is false)."""
        response = self.call("GET", f"/v1/models/{quote(model, safe='/:')}", timeout_s=CONNECT_TIMEOUT_S)
        if response.status != 404:
            return  # there, or a server that cannot say: the first message will tell
        missing = _error(response, self.root, model)
        if not isinstance(missing, ModelNotFound):
            return
        if no_pull or not self.pull(model, on_status):
            raise missing

    def context_length(self, model: str) -> int | None:
        """The context one request may use, where the server says (llmrun's ``/api/ps``); None when it does not."""
        try:
            response = self.call("GET", "/api/ps", timeout_s=CONNECT_TIMEOUT_S)
            models = response.json().get("models", []) if response.status == 200 else []
        except (LlmrunError, ValueError, AttributeError):
            return None
        for record in models:
            if isinstance(record, dict) and model in (record.get("name"), record.get("model")):
                length = record.get("context_length")
                return int(length) if isinstance(length, int) else None
        return None


def find_local_server(host: tuple[str, int], api_key: str | None) -> str | None:
    """``--server auto``: the URL of the ``llmrun serve`` listening at ``LLMRUN_HOST``, if one is there and ready."""
    address, port = host
    if address in ("0.0.0.0", "::", ""):
        address = "127.0.0.1"
    url = f"http://{f'[{address}]' if ':' in address else address}:{port}"
    try:
        response = ServerClient(url, api_key).call("GET", "/health", timeout_s=PROBE_TIMEOUT_S)
        health = response.json() if response.status == 200 else {}
    except (LlmrunError, ValueError):
        return None
    return url if isinstance(health, dict) and health.get("server") == "llmrun" else None


class ServerGeneration:
    """A streamed answer from a server: iterate for ``(kind, text)`` pieces (kind ``content`` or ``reasoning``),
    then read ``result``. Leaving the loop early (Ctrl-C) closes the connection, and the server stops generating."""

    def __init__(self, client: ServerClient, path: str, ask: Ask, headers: dict[str, str]) -> None:
        self.ask = ask
        self.model_name = ask.model
        self._root = client.root
        self._began = time.perf_counter()
        self._first: float | None = None
        self._last: float | None = None
        self._ended: float | None = None
        self._text: list[str] = []
        self._chunks = 0
        self._finish_reason = "cancelled"
        self._usage: dict[str, Any] = {}
        self._timings: dict[str, Any] = {}
        self._response = client.open("POST", path, ask.body(), headers)
        if self._response.status >= 400:
            raise _error(_whole(self._response, path), client.root, ask.model)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        try:
            for raw in self._response:
                if not raw.startswith(b"data:"):
                    continue
                data = raw[len(b"data:") :].strip()
                if data == b"[DONE]":
                    break
                yield from self._pieces(_json_object(data.decode("utf-8", errors="replace"), self._root))
        except TimeoutError:
            raise ServerUnreachable(
                f"{self._root} sent nothing for {READ_TIMEOUT_S:.0f} s", "is the server overloaded? try again"
            ) from None
        except (OSError, http.client.HTTPException) as error:
            raise ServerUnreachable(f"{self._root} closed the connection mid-answer ({error})", "try again") from None
        finally:
            self._ended = time.perf_counter()
            self._response.close()

    def _pieces(self, chunk: dict[str, Any]) -> Iterator[tuple[str, str]]:
        if (failure := stream_error(chunk)) is not None:
            raise LlmrunError(f"{self._root}: {failure}")
        self.model_name = str(chunk.get("model") or self.model_name)
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            self._timings = chunk["timings"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            _, thinking, content = choice_delta(choice)
            if thinking:
                self._arrived()
                yield REASONING, thinking
            if content:
                self._arrived()
                self._text.append(content)
                yield CONTENT, content
            if choice.get("finish_reason"):
                self._finish_reason = str(choice["finish_reason"])

    def _arrived(self) -> None:
        now = time.perf_counter()
        if self._first is None:
            self._first = now
        self._last = now
        self._chunks += 1

    @property
    def result(self) -> GenerationResult:
        """Token counts as the server reports them (chunks counted where it does not); times as seen here."""
        ended = self._ended or time.perf_counter()
        first = self._first or ended
        usage = self._usage
        details = usage.get("completion_tokens_details") or {}
        accepted = int(details.get("accepted_prediction_tokens") or 0)
        rejected = int(details.get("rejected_prediction_tokens") or 0)
        completion = int(usage.get("completion_tokens") or self._timings.get("predicted_n") or self._chunks)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or self._timings.get("cache_n") or 0
        reason = self._finish_reason
        context_full = reason == "length" and (self.ask.max_tokens is None or completion < self.ask.max_tokens)
        return GenerationResult(
            text="".join(self._text),
            finish_reason=reason,
            prompt_tokens=int(usage.get("prompt_tokens") or self._timings.get("prompt_n") or 0),
            completion_tokens=completion,
            cached_tokens=int(cached),
            context_full=context_full,
            time_to_first_token_s=first - self._began,
            generation_s=(self._last or first) - first,
            total_s=ended - self._began,
            drafted_tokens=accepted + rejected,
            accepted_tokens=accepted,
        )


def stream_error(chunk: dict[str, Any]) -> str | None:
    """The message of an error a server reports inside its stream (its status line was sent already), if any."""
    if "error" not in chunk:
        return None
    error = chunk["error"]
    return str(error.get("message") if isinstance(error, dict) else error)


def choice_delta(choice: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
    """A streamed choice's delta (a completion's ``text`` as its content), with its thinking and its content text:
    ``reasoning_content`` as llmrun, llama-server and DeepSeek name thinking, or ``reasoning`` as vLLM does."""
    given = choice.get("delta") if "delta" in choice else {"content": choice.get("text")}
    delta: dict[str, Any] = given if isinstance(given, dict) else {}
    thinking = delta.get("reasoning_content") or delta.get("reasoning")
    content = delta.get("content")
    return delta, thinking if isinstance(thinking, str) else "", content if isinstance(content, str) else ""


def _whole(response: http.client.HTTPResponse, path: str) -> _Response:
    """An error answer read whole (what of it arrives) and closed."""
    try:
        body = response.read()
    except (OSError, http.client.HTTPException):
        body = b""
    finally:
        response.close()
    return _Response(response.status, response.reason, body, path)


def _json_object(text: str, root: str = "the server") -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise LlmrunError(f"{root} sent something that is not JSON: {text[:80]!r}", "is it an OpenAI API?") from None
    return value if isinstance(value, dict) else {}


def _unreachable(root: str, error: BaseException) -> ServerUnreachable:
    reason = str(error) or type(error).__name__
    if isinstance(error, ConnectionRefusedError):
        reason = "connection refused"
    elif isinstance(error, TimeoutError | socket.timeout):
        reason = "timed out"
    return ServerUnreachable(
        f"no server answers at {root} ({reason})", "start one with `llmrun serve`, or run without --server"
    )


def error_detail(body: bytes, reason: str) -> tuple[str, str]:
    """An error answer's message and code, in whichever shape a server sends it (OpenAI's ``{"error": {...}}``,
    Ollama's ``{"error": "..."}``, FastAPI's ``{"detail": ...}``, or plain text)."""
    message, code = reason or "error", ""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error", payload.get("detail", payload.get("message")))
        if isinstance(error, dict):
            message, code = str(error.get("message") or message), str(error.get("code") or error.get("type") or "")
        elif error:
            message = str(error)
    elif body.strip():
        message = body.decode("utf-8", errors="replace").strip().splitlines()[0][:200]
    return message, code


def refusal_kind(status: int, message: str, code: str) -> type[LlmrunError] | None:
    """ModelNotFound or PromptTooLong where a server's 4xx means one (by OpenAI's code, or its message's words)."""
    lowered = message.lower()
    if status == 404 and (code == "model_not_found" or "model" in lowered):
        return ModelNotFound
    if status == 400 and (code == "context_length_exceeded" or "context" in lowered):
        return PromptTooLong
    return None


def response_format(json_schema: dict[str, Any] | None, json_any: bool) -> dict[str, Any] | None:
    """OpenAI's ``response_format`` for an answer held to a JSON schema, or to any JSON object."""
    if json_schema is not None:
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": json_schema}}
    return {"type": "json_object"} if json_any else None


def _error(response: _Response, root: str, model: str) -> LlmrunError:
    """A server's error answer as llmrun's error of the same meaning (and exit code)."""
    status = response.status
    message, code = error_detail(response.body, response.reason)
    text = f"{root}: {message}"
    kind = refusal_kind(status, message, code)
    if kind is ModelNotFound:
        return ModelNotFound(text if model in message else f"{root} has no model {model!r}: {message}")
    if status == 404:
        return UsageError(f"{root} has no OpenAI API at {response.path} ({message})",
                          "give the server's base URL, e.g. http://127.0.0.1:8080")  # fmt: skip
    if kind is PromptTooLong:
        return PromptTooLong(text)
    if status in (401, 403):
        return UsageError(f"{root} refused the request ({status}: {message})", "set LLMRUN_API_KEY to its key")
    if 400 <= status < 500:
        return UsageError(text)
    return LlmrunError(f"{root} answered {status}: {message}", "see the server's log")
