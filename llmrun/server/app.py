"""The FastAPI app of ``llmrun serve``: the API routers, auth, CORS, health, metrics, and running it."""

from __future__ import annotations

import asyncio
import hmac
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmrun import __version__
from llmrun.server import errors
from llmrun.server.config import UpstreamConfig
from llmrun.server.metrics import Metrics
from llmrun.server.pool import ModelPool, PoolOptions

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11435  # beside Ollama's 11434, not on it
DEFAULT_GRACE_S = 10.0
KEEP_ALIVE_S = 75  # idle HTTP connections are kept this long
OPEN_PATHS = frozenset({"/health"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class ServeOptions:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    models: tuple[str, ...] = ()  # loaded at start
    pool: PoolOptions = field(default_factory=PoolOptions)
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    log_exchanges: bool = True
    grace_s: float = DEFAULT_GRACE_S
    upstreams: tuple[UpstreamConfig, ...] = ()  # serve --config: models routed to other servers


def create_app(options: ServeOptions, on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The app; models named in ``options.models`` load before it reports ready."""
    from llmrun.logs import LogStore
    from llmrun.settings import get_settings
    from llmrun.store.store import Store

    settings = get_settings()
    metrics = Metrics()
    log_store = LogStore(settings.logs_path) if options.log_exchanges else None
    pool = ModelPool(options.pool, Store(settings.home), metrics, log_store)
    if options.upstreams:
        from llmrun.server.upstream import Upstreams

        pool.upstreams = Upstreams(options.upstreams)
    metrics.watch(pool)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await _warm_up()
        if pool.upstreams is not None:
            await pool.upstreams.start()
            for upstream in pool.upstreams.upstreams:
                healthy = sum(replica.healthy for replica in upstream.replicas)
                models = ", ".join(upstream.models) or "no models yet"
                sys.stderr.write(f"upstream {upstream.name}: {healthy} of {len(upstream.replicas)} replicas up; "
                                 f"{models}\n")  # fmt: skip
        for name in options.models:
            model = await pool.acquire(name)
            pool.release(model, None)
            sys.stderr.write(f"loaded {model.name}: {model.engine.context_choice.reason}, {pool.options.parallel} "
                             f"slots, {model.engine.n_threads} threads\n")  # fmt: skip
        app.state.ready = True
        if on_ready is not None:
            on_ready()
        yield
        await pool.close()

    app = FastAPI(title="llmrun", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.pool = pool
    app.state.metrics = metrics
    app.state.ready = False
    errors.install(app)

    from llmrun.server import anthropic, ollama, openai, responses

    app.include_router(anthropic.router)
    app.include_router(responses.router)
    app.include_router(openai.router)
    app.include_router(ollama.router)

    app.add_middleware(_Gate, api_key=options.api_key, metrics=metrics)
    if options.cors_origins:  # outermost: answers preflights, and a browser can read even a 401
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(options.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )

    @app.get("/health", response_model=None)
    async def health() -> Any:
        if not app.state.ready:
            return Response('{"status":"loading"}', status_code=503, media_type="application/json")
        return {"status": "ok", "server": "llmrun", "version": __version__}  # `--server auto` looks for this

    @app.get("/metrics", response_model=None)
    async def metrics_route() -> Any:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/", methods=["GET", "HEAD"], response_model=None)
    async def root() -> Any:
        return PlainTextResponse("llmrun is running")

    return app


class _Gate:
    """Pure ASGI middleware: reads any POST body as JSON, checks the API key, counts requests by route and status.

    Not Starlette's BaseHTTPMiddleware, which pipes every streamed response through a
    task and a memory stream of its own: one more hop for each token of every stream.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Metrics) -> None:
        self.app = app
        self.api_key = api_key
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if scope["method"] in BODY_METHODS and "json" not in headers.get("content-type", ""):
            # `curl -d '{...}'` sends form encoding; like OpenAI, Ollama and llama-server, read the body as JSON
            # anyway (Ollama's own docs delete with `curl -X DELETE ... -d '{"model": ...}'`).
            kept = [(key, value) for key, value in scope["headers"] if key != b"content-type"]
            scope = {**scope, "headers": [*kept, (b"content-type", b"application/json")]}
        protected = self.api_key and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS"
        if protected and not _key_matches(headers, self.api_key or ""):
            error = errors.Unauthorized("missing or wrong API key", "send Authorization: Bearer KEY")
            denied = errors.error_response(Request(scope), error)
            self._count(scope, denied.status_code)
            await denied(scope, receive, send)
            return
        status = 500

        async def send_counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counting)
        finally:
            self._count(scope, status)

    def _count(self, scope: Scope, status: int) -> None:
        route = scope.get("route")  # set by the router on this same scope
        self.metrics.requests.labels(getattr(route, "path", "other"), str(status)).inc()


async def _warm_up() -> None:
    """Import now what the first request would (anyio's backend alone takes most of a second on a slow CPU)."""
    import anyio

    import llmrun.engine.sampling  # noqa: F401
    import llmrun.store.models  # noqa: F401

    async with anyio.create_task_group():
        pass


def _key_matches(headers: Headers, api_key: str) -> bool:
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    given = token.strip() if scheme.lower() == "bearer" else headers.get("x-api-key", "")
    return hmac.compare_digest(given.encode(), api_key.encode())


def serve(options: ServeOptions, on_ready: Callable[[], None] | None = None) -> None:
    """Run the server until Ctrl-C or SIGTERM; then finish running requests for the grace period, end the rest."""
    import uvicorn

    app = create_app(options, on_ready)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(options.grace_s) + 1,
        # Longer than clients keep idle connections (httpx and the SDKs built on it: 5 s), so a client never sends
        # a request on a connection the server is closing at that moment (a "server disconnected" error).
        timeout_keep_alive=KEEP_ALIVE_S,
        lifespan="on",
    )
    server = _Server(config, app, options.grace_s)
    server.run()


class _Server:
    """uvicorn's server, with a shutdown that ends open streams once the grace period is over."""

    def __init__(self, config: Any, app: FastAPI, grace_s: float) -> None:
        import uvicorn

        self.app = app
        self.grace_s = grace_s
        outer = self

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                if not self.should_exit:
                    sys.stderr.write("stopping: finishing running requests\n")
                    outer._schedule_cutoff()
                super().handle_exit(sig, frame)
                # uvicorn re-raises the signal after shutting down; a clean stop exits 0 instead.
                self._captured_signals.clear()

        self.server = Server(config)

    def _schedule_cutoff(self) -> None:
        loop = asyncio.get_event_loop()
        pool: ModelPool = self.app.state.pool

        def cut_off() -> None:
            for model in list(pool.models.values()):
                model.worker.cancel_all("the server is shutting down")

        loop.call_later(self.grace_s, cut_off)

    def run(self) -> None:
        previous = signal.getsignal(signal.SIGTERM)
        try:
            self.server.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
