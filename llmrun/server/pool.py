"""The loaded models of a server: load on first use, keep for the keep-alive, evict the least recently used.

Each loaded model is an Engine with ``parallel`` slots driven by its own EngineWorker
thread. Loading and unloading run on worker threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmrun.errors import DraftMismatch, LlmrunError, ModelNotFound, UsageError
from llmrun.settings import DEFAULT_STREAM_INTERVAL_MS

if TYPE_CHECKING:
    from llmrun.engine import Engine
    from llmrun.engine.speculation import SpeculationOptions
    from llmrun.engine.worker import EngineWorker
    from llmrun.logs import Exchange, LogStore
    from llmrun.server.inference import Finished, InferenceRequest
    from llmrun.server.metrics import Metrics
    from llmrun.server.upstream import Upstream, Upstreams
    from llmrun.store.store import ModelEntry, Store

DEFAULT_KEEP_ALIVE_S = 300.0
DEFAULT_PARALLEL = 4
DEFAULT_MAX_LOADED = 3  # as Ollama on a CPU
DEFAULT_CACHE_RAM_MB = 1024


class ServerBusy(LlmrunError):
    """Every slot and queue place is taken: try again shortly."""

    http_status = 503

    def __init__(self, message: str, hint: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, hint)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class PoolOptions:
    """How the server loads models (``llmrun serve`` options)."""

    parallel: int = DEFAULT_PARALLEL
    ctx: int | None = None  # the longest context one request may use
    threads: int | None = None
    gpu_layers: str = "auto"
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S  # negative: forever
    max_loaded: int = DEFAULT_MAX_LOADED
    queue: int | None = None  # requests waiting for a slot, per model; None: 4 x parallel
    deterministic: bool = False  # batch-invariant: flash attention off (see _load_engine)
    cache_ram_mb: int = DEFAULT_CACHE_RAM_MB  # per model: prompts' KV caches kept in host memory
    stream_interval_ms: int = DEFAULT_STREAM_INTERVAL_MS  # streamed text is sent this often (0: each token)
    cache_type_k: str = "f16"  # the KV cache's types (ggml type names)
    cache_type_v: str = "f16"
    # Speculative decoding; a draft model serves the models that share its vocabulary. None: off.
    speculation: SpeculationOptions | None = None
    model_speculation: dict[str, SpeculationOptions] = field(default_factory=dict)  # serve --config [models.NAME]
    rpc: tuple[str, ...] = ()  # llama.cpp RPC workers that take the models' layers
    debug: bool = False

    @property
    def queue_limit(self) -> int:
        return self.queue if self.queue is not None else 4 * self.parallel


@dataclass(eq=False)
class LoadedModel:
    name: str
    path: Path
    entry: ModelEntry | None
    engine: Engine
    worker: EngineWorker
    keep_alive_s: float
    loaded_at: float = field(default_factory=time.time)
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float | None = None  # wall-clock time it will be unloaded if still idle; None: never / busy
    _expiry: asyncio.TimerHandle | None = None

    @property
    def size_bytes(self) -> int:
        return self.engine.model.size_bytes


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive: seconds, or a duration such as ``5m``, ``1h30m``, ``10s``; negative = forever."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise UsageError(f"keep_alive {value!r} is not a duration", "give seconds or a duration like 5m")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total, number, sign = 0.0, "", 1.0
    if text.startswith("-"):
        sign, text = -1.0, text[1:]
    index = 0
    while index < len(text):
        char = text[index]
        if char.isdigit() or char == ".":
            number += char
            index += 1
            continue
        unit = "ms" if text.startswith("ms", index) else char
        if unit not in units or not number:
            raise UsageError(f"keep_alive {value!r} is not a duration", "give seconds or a duration like 5m, 1h")
        total += float(number) * units[unit]
        number = ""
        index += len(unit)
    if number:
        raise UsageError(f"keep_alive {value!r} lacks a unit", "write e.g. 5m, 30s or 1h")
    return sign * total


class ModelPool:
    """The models a server has loaded, by name."""

    def __init__(
        self, options: PoolOptions, store: Store, metrics: Metrics | None = None, log_store: LogStore | None = None
    ) -> None:
        self.options = options
        self.store = store
        self.metrics = metrics
        self.log_store = log_store
        # One writer, so exchanges reach the log in the order they finished and never contend with each other.
        self._log_writer = ThreadPoolExecutor(1, thread_name_prefix="llmrun-log") if log_store is not None else None
        self.log_id = log_store.log_id() if log_store is not None else None
        self.models: dict[str, LoadedModel] = {}
        self.upstreams: Upstreams | None = None  # model names served by upstream engines (serve --config)
        self._locks: dict[str, asyncio.Lock] = {}
        self.prefix_hit_tokens_unloaded = 0

    def resolve(self, name: str) -> tuple[str, Path, ModelEntry | None]:
        """A request's model name to the store's name and file; ``:latest`` is ignored, as Ollama's clients add it."""
        from llmrun.store.models import resolve_model

        text = name.strip()
        if not text:
            raise UsageError("no model named in the request", "give a model name from `llmrun list`")
        if text in self.models:
            model = self.models[text]
            return model.name, model.path, model.entry
        if text.endswith(":latest"):
            text = text[: -len(":latest")]
        try:
            resolved = resolve_model(self.store, text)
        except ModelNotFound:
            raise ModelNotFound(
                f"model {name!r} is not in the local store", f"pull it first: `llmrun pull {text}`"
            ) from None
        return resolved.name, resolved.path, resolved.entry

    async def acquire(self, name: str, extra: int = 0) -> LoadedModel:
        """The loaded model for ``name`` (loading it if need be), counted as in use until ``release``."""
        canonical, path, entry = await asyncio.to_thread(self.resolve, name)
        lock = self._locks.setdefault(canonical, asyncio.Lock())
        async with lock:
            model = self.models.get(canonical)
            if model is None:
                model = await self._load(canonical, path, entry)
        weight = 1 + extra
        if model.in_flight + weight > self.options.parallel + self.options.queue_limit:
            raise ServerBusy(
                f"{canonical} has {model.in_flight} requests running or queued, the most it takes",
                "retry shortly, or start the server with a larger --queue or --parallel",
            )
        model.in_flight += weight
        model.last_used = time.monotonic()
        model.expires_at = None
        if model._expiry is not None:
            model._expiry.cancel()
            model._expiry = None
        return model

    def release(self, model: LoadedModel, keep_alive_s: float | None, weight: int = 1) -> None:
        """A request is done with ``model``; an idle model is unloaded after its keep-alive."""
        model.in_flight = max(0, model.in_flight - weight)
        model.last_used = time.monotonic()
        if keep_alive_s is not None:
            model.keep_alive_s = keep_alive_s
        if model.in_flight == 0:
            self._schedule_expiry(model)

    def _schedule_expiry(self, model: LoadedModel) -> None:
        if model._expiry is not None:
            model._expiry.cancel()
            model._expiry = None
        keep_alive = model.keep_alive_s
        if keep_alive < 0:
            model.expires_at = None
            return
        model.expires_at = time.time() + keep_alive
        loop = asyncio.get_running_loop()
        model._expiry = loop.call_later(keep_alive, lambda: asyncio.ensure_future(self._expire(model)))

    async def _expire(self, model: LoadedModel) -> None:
        if model.in_flight == 0 and self.models.get(model.name) is model:
            await self.unload(model.name)

    async def _load(self, name: str, path: Path, entry: ModelEntry | None) -> LoadedModel:
        await self._make_room()
        options = self.options
        loaded = await asyncio.to_thread(_load_engine, name, path, options)
        engine, worker = loaded
        model = LoadedModel(name, path, entry, engine, worker, options.keep_alive_s)
        self.models[name] = model
        return model

    async def _make_room(self) -> None:
        while len(self.models) >= self.options.max_loaded:
            idle = [model for model in self.models.values() if model.in_flight == 0]
            if not idle:
                raise ServerBusy(
                    f"{len(self.models)} models are loaded and all are busy (--max-loaded {self.options.max_loaded})",
                    "retry shortly, or start the server with a larger --max-loaded",
                    retry_after_s=5,
                )
            await self.unload(min(idle, key=lambda model: model.last_used).name)

    async def unload(self, name: str) -> bool:
        """Unload a model now (requests still running on it are cancelled); False if it was not loaded."""
        model = self.models.pop(name, None)
        if model is None:
            return False
        if model._expiry is not None:
            model._expiry.cancel()
        self.prefix_hit_tokens_unloaded += model.engine.scheduler.prefix_hit_tokens
        await asyncio.to_thread(model.worker.stop)
        return True

    def finished(self, request: InferenceRequest, model_name: str, event: Finished) -> None:
        """Count a finished answer in the metrics, and log it (off the event loop)."""
        if self.metrics is not None:
            self.metrics.observe_generation(model_name, event.usage, event.time_to_first_token_s, event.generation_s)
        if self.log_store is not None and self._log_writer is not None and event.error is None and request.log:
            try:
                self._log_writer.submit(_log_exchange, self.log_store, request, model_name, event)
            except RuntimeError:  # the server has closed its log: an answer finished after the grace period
                sys.stderr.write("warning: exchange not logged: the server is stopping\n")

    def upstream_for(self, name: str) -> Upstream | None:
        """The upstream engine serving ``name``, if one does (upstreams come before the store: they were declared)."""
        return self.upstreams.route(name) if self.upstreams is not None else None

    def logs_here(self, log_header: str | None) -> bool:
        """False when a client says it logs the exchange itself, in this very log (``client.LOG_HEADER``)."""
        return not (log_header and self.log_id and log_header == self.log_id)

    def find_loaded(self, name: str) -> LoadedModel | None:
        text = name.strip()
        model = self.models.get(text) or self.models.get(text.removesuffix(":latest"))
        return model

    async def close(self) -> None:
        for name in list(self.models):
            await self.unload(name)
        if self.upstreams is not None:
            await self.upstreams.close()
        if self._log_writer is not None:
            await asyncio.to_thread(self._log_writer.shutdown, wait=True)  # every finished exchange is in the log


def _log_exchange(log_store: LogStore, request: InferenceRequest, model_name: str, event: Finished) -> None:
    try:
        log_store.log(log_store.new_conversation(model_name), _exchange(request, model_name, event))
    except Exception as error:  # noqa: BLE001 - a log that cannot be written must not fail the answer, nor go unnoticed
        sys.stderr.write(f"warning: exchange not logged: {error}\n")


def _exchange(request: InferenceRequest, model_name: str, event: Finished) -> Exchange:
    from llmrun.logs import Exchange

    system = None
    if request.messages is not None:
        prompt = next((_text(m.get("content")) for m in reversed(request.messages) if m.get("role") == "user"), "")
        system = next((_text(m.get("content")) for m in request.messages if m.get("role") == "system"), None)
    else:
        prompt = request.prompt or ""
    options: dict[str, Any] = {"route": request.route}
    if request.sampling is not None:
        options.update(request.sampling.logged())
    if request.max_tokens:
        options["max_tokens"] = request.max_tokens
    response = event.text
    if event.tool_calls:  # the calls, as the JSON a client got them in, after any text
        calls = [{"name": call.name, "arguments": json.loads(call.arguments)} for call in event.tool_calls]
        response = "\n".join(part for part in (event.text, json.dumps({"tool_calls": calls})) if part)
    exchange = Exchange(
        model=model_name, prompt=prompt, system=system, options=options, response=response,
        finish_reason=event.finish_reason, prompt_tokens=event.usage.prompt_tokens,
        completion_tokens=event.usage.completion_tokens, time_to_first_token_s=event.time_to_first_token_s,
        generation_tokens_per_s=event.generation_tokens_per_s,
    )  # fmt: skip
    return exchange


def _text(content: Any) -> str:
    return content if isinstance(content, str) else str(content or "")


def _load_engine(name: str, path: Path, options: PoolOptions) -> tuple[Engine, EngineWorker]:
    from llmrun.engine import Engine, LoadOptions
    from llmrun.engine.speculation import SpeculationOptions
    from llmrun.engine.worker import EngineWorker

    load = LoadOptions(
        n_ctx=options.ctx,
        n_threads=options.threads,
        gpu_layers=options.gpu_layers,
        n_slots=options.parallel,
        # Flash attention (llama.cpp turns it on where it is faster, as in llama-server) rounds
        # differently with the number of queries in a chunk and of sequences in a batch, both of
        # which depend on what else is running. --deterministic turns it off, and with the
        # scheduler's fixed batch shapes (see Scheduler.step) a greedy answer is then the same
        # alone or among others.
        flash_attn=False if options.deterministic else None,
        host_cache_mb=options.cache_ram_mb,
        cache_type_k=options.cache_type_k,
        cache_type_v=options.cache_type_v,
        speculation=options.model_speculation.get(name) or options.speculation or SpeculationOptions(),
        rpc=options.rpc,
        debug=options.debug,
    )
    try:
        engine = Engine(path, load)
    except DraftMismatch as error:
        # One --draft for a server of several models: those of another family are served without it.
        sys.stderr.write(f"warning: {error.message}; serving {name} without speculation\n")
        engine = Engine(path, replace(load, speculation=SpeculationOptions()))
    with contextlib.suppress(LlmrunError):  # compile the chat template now, not in the first request
        engine.chat_prompt([{"role": "user", "content": "Hi"}])
    return engine, EngineWorker(engine, name, stream_interval_s=options.stream_interval_ms / 1000)
