"""``serve``, and ``ps`` and ``stop`` for a running server."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer

from llmrun.cli.options import (
    CacheTypeK,
    CacheTypeV,
    DraftMax,
    DraftMin,
    GpuLayers,
    Lookup,
    NoPull,
    Rpc,
    Threads,
    resolve,
    rpc_endpoints,
    speculation_options,
)
from llmrun.cli.output import notice, print_json, print_rows
from llmrun.errors import LlmrunError, UsageError
from llmrun.settings import DEFAULT_DRAFT_MAX, DEFAULT_STREAM_INTERVAL_MS, LOOPBACK_HOSTS, get_settings

ServerOption = Annotated[
    str | None,
    typer.Option("--server", help="The server's URL [default: http://LLMRUN_HOST, i.e. http://127.0.0.1:11435]."),
]


def serve_command(
    models: Annotated[
        list[str] | None,
        typer.Argument(
            help="Models to load at start (others load on first request).", show_default=False, metavar="[MODEL]..."
        ),  # fmt: skip
    ] = None,
    host: Annotated[
        str | None, typer.Option("--host", help="Address to bind [default: 127.0.0.1; 0.0.0.0 for every interface].")
    ] = None,
    port: Annotated[int | None, typer.Option("--port", "-p", min=0, max=65535, help="Port [default: 11435].")] = None,
    parallel: Annotated[
        int, typer.Option("--parallel", "-np", min=1, max=64, help="Requests generated at once, per model.")
    ] = 4,
    ctx: Annotated[
        int | None,
        typer.Option(
            "--ctx", "-c", min=16, help="Longest context of one request [default: the model's, capped to fit memory]."
        ),
    ] = None,
    threads: Threads = None,
    gpu_layers: GpuLayers = None,
    keep_alive: Annotated[
        str, typer.Option("--keep-alive", help="How long an idle model stays loaded: 5m, 1h, 0, or -1 for ever.")
    ] = "5m",
    max_loaded: Annotated[
        int, typer.Option("--max-loaded", min=1, help="Models loaded at once; the least recently used goes first.")
    ] = 3,
    queue: Annotated[
        int | None,
        typer.Option(
            "--queue", min=0, help="Requests waiting for a slot, per model, before 503 [default: 4 x parallel]."
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Require this key (Bearer or x-api-key) [default: LLMRUN_API_KEY].")
    ] = None,
    cors: Annotated[
        list[str] | None,
        typer.Option("--cors", help="Allow browser requests from this origin (repeatable; * for any)."),
    ] = None,
    cache_ram: Annotated[
        int,
        typer.Option(
            "--cache-ram",
            min=0,
            help="MiB of host memory per model for prompts whose slot another request took (0: off).",
        ),
    ] = 1024,
    stream_interval: Annotated[
        int,
        typer.Option(
            "--stream-interval",
            min=0,
            max=1000,
            help="Milliseconds a streamed answer's new text is gathered before it is sent; the first text and the "
            "end go at once (0: every token as it comes, which costs CPU-bound decoding ~8%).",
        ),
    ] = DEFAULT_STREAM_INTERVAL_MS,
    cache_type_k: CacheTypeK = "f16",
    cache_type_v: CacheTypeV = "f16",
    lookup: Lookup = False,
    draft: Annotated[
        str | None,
        typer.Option(
            "--draft",
            help="Speculate with this draft model, for every model that shares its tokenizer.",
            show_default=False,
            metavar="MODEL",
        ),
    ] = None,
    draft_max: DraftMax = DEFAULT_DRAFT_MAX,
    draft_min: DraftMin = 0,
    no_log: Annotated[bool, typer.Option("--no-log", help="Do not log exchanges (also LLMRUN_NO_LOG=1).")] = False,
    deterministic: Annotated[
        bool,
        typer.Option(
            "--deterministic",
            help="A greedy answer is the same whatever else runs beside it (no flash attention: ~10% slower on CPU).",
        ),
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A TOML file of upstream engines: model names this server sends on to other OpenAI-compatible "
            "servers ([upstreams.NAME] urls, models, api_key_env).",
            show_default=False,
            metavar="FILE",
        ),
    ] = None,
    rpc: Rpc = None,
    no_pull: NoPull = False,
) -> None:
    """Serve the OpenAI and Ollama APIs on 127.0.0.1:11435 until Ctrl-C."""
    from llmrun.server.app import ServeOptions, serve
    from llmrun.server.config import ServeConfig, load_config
    from llmrun.server.pool import PoolOptions, parse_keep_alive

    settings = get_settings()
    bind_host, bind_port = settings.host
    serve_config = load_config(config) if config is not None else ServeConfig()
    # [models.NAME] speculation, keyed by the store's name of the model (the name the pool loads it under)
    per_model = {
        _store_name(name): speculation_options(model.lookup, model.draft, model.draft_max, model.draft_min, no_pull)
        for name, model in serve_config.models.items()
    }
    keep_alive_s = parse_keep_alive(keep_alive)
    resolved = [resolve(model, no_pull).name for model in models or []]
    speculation = speculation_options(lookup, draft, draft_max, draft_min, no_pull)
    options = ServeOptions(
        host=host or bind_host,
        port=bind_port if port is None else port,
        models=tuple(resolved),
        pool=PoolOptions(
            parallel=parallel,
            ctx=ctx,
            threads=threads or settings.threads,
            gpu_layers=gpu_layers or settings.gpu_layers,
            deterministic=deterministic,
            cache_ram_mb=cache_ram,
            stream_interval_ms=stream_interval,
            cache_type_k=cache_type_k,
            cache_type_v=cache_type_v,
            speculation=speculation,
            model_speculation=per_model,
            rpc=rpc_endpoints(rpc),
            keep_alive_s=300.0 if keep_alive_s is None else keep_alive_s,
            max_loaded=max_loaded,
            queue=queue,
            debug=settings.debug,
        ),  # fmt: skip
        api_key=api_key or settings.api_key,
        cors_origins=tuple(cors or ()),
        log_exchanges=not (no_log or settings.no_log),
        upstreams=serve_config.upstreams,
    )
    url = f"http://{_url_host(options.host)}:{options.port}"
    if options.host not in LOOPBACK_HOSTS and not options.api_key:
        notice(f"warning: serving on {options.host} without --api-key: anyone who can reach this machine can use it")

    def ready() -> None:
        notice(f"llmrun serving on {url}  (OpenAI: {url}/v1, Ollama: {url})  Ctrl-C to stop")

    serve(options, ready)


def _store_name(name: str) -> str:
    """A model's name in the store (``NAME:latest`` and aliases resolved), or the name as given if it is not there."""
    from llmrun.errors import ModelNotFound
    from llmrun.store.models import resolve_model
    from llmrun.store.store import Store

    try:
        return resolve_model(Store(get_settings().home), name.removesuffix(":latest")).name
    except (ModelNotFound, UsageError):
        return name


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _server_url(server: str | None) -> str:
    if server:
        if not server.startswith(("http://", "https://")):
            raise UsageError(f"{server!r} is not an http(s) URL", "e.g. --server http://127.0.0.1:11435")
        return server.rstrip("/")
    host, port = get_settings().host
    return f"http://{_url_host(host)}:{port}"


def _call(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    settings = get_settings()
    headers = {"Content-Type": "application/json"}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        try:
            message = json.load(error).get("error")
        except ValueError:
            message = error.reason
        raise LlmrunError(f"{url} answered {error.code}: {message}") from None
    except OSError as error:
        raise LlmrunError(f"no llmrun server at {url}: {error}", "start one with `llmrun serve`") from None


def ps_command(server: ServerOption = None, json_output: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the models a running server has loaded: slots, memory, when each is unloaded."""
    url = _server_url(server)
    models = _call(url, "/api/ps").get("models", [])
    if json_output:
        print_json(models)
        return
    from llmrun.cli.output import format_size

    rows = []
    for m in models:
        if "upstream" in m:  # a model an upstream engine serves: its replicas instead of slots and memory
            replicas = m.get("replicas", [])
            up = sum(1 for replica in replicas if replica.get("healthy"))
            rows.append([m["name"], f"{m.get('in_flight', 0)}/-", "-", "-",
                         f"upstream {m['upstream']} ({up}/{len(replicas)} up)"])  # fmt: skip
            continue
        rows.append([m["name"], f"{m.get('busy_slots', 0)}/{m.get('slots', '?')}", format_size(m.get("size", 0)),
                     str(m.get("context_length", "")),
                     m.get("expires_at") or ("busy" if m.get("in_flight") else "never")])  # fmt: skip
    print_rows(["NAME", "BUSY/SLOTS", "SIZE", "CONTEXT", "UNTIL"], rows)


def stop_command(
    model: Annotated[str, typer.Argument(help="A model the server has loaded.", show_default=False, metavar="MODEL")],
    server: ServerOption = None,
) -> None:
    """Unload a model from a running server now."""
    url = _server_url(server)
    records = {m["name"]: m for m in _call(url, "/api/ps").get("models", [])}
    record = records.get(model) or records.get(model.removesuffix(":latest"))
    if record is None:
        raise LlmrunError(f"{url} has no model {model!r} loaded", "see `llmrun ps`")
    if "upstream" in record:
        raise LlmrunError(f"{model} is served by upstream {record['upstream']}", "unload it there")
    _call(url, "/api/generate", {"model": model, "keep_alive": 0})
    notice(f"stopped {model}")
