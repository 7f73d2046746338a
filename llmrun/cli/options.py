"""Options shared by `run` and `chat`, and the one way both of them open a model."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import typer

from llmrun.cli.output import notice
from llmrun.errors import UsageError
from llmrun.generation import SamplingParams
from llmrun.settings import KV_CACHE_TYPES, env_flag, get_settings

if TYPE_CHECKING:
    from llmrun.client import ServerClient
    from llmrun.engine import Engine
    from llmrun.engine.speculation import SpeculationOptions
    from llmrun.store.models import ResolvedModel

System = Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")]
Temperature = Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0 is greedy.")]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)]
TopK = Annotated[int, typer.Option("--top-k", min=0, help="0 disables.")]
MinP = Annotated[float, typer.Option("--min-p", min=0.0, max=1.0)]
RepeatPenalty = Annotated[float, typer.Option("--repeat-penalty", min=0.0, help="1.0 disables.")]
Seed = Annotated[
    int | None, typer.Option("--seed", min=0, max=2**32 - 2, help="For repeatable sampling [default: random].")
]
MaxTokens = Annotated[
    int | None, typer.Option("--max-tokens", "-n", min=1, help="Stop after this many tokens [default: no limit].")
]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop at this text (repeatable); it is not printed.")]
Ctx = Annotated[
    int | None,
    typer.Option("--ctx", "-c", min=16, help="Context size in tokens [default: the model's, capped to fit memory]."),
]
Threads = Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads [default: physical cores].")]
GpuLayers = Annotated[
    str | None, typer.Option("--gpu-layers", "-ngl", help="Layers on the GPU: a number, or auto [default: auto].")
]
NoPull = Annotated[
    bool, typer.Option("--no-pull", help="Fail instead of pulling a catalog or Hub model that is not here yet.")
]
Lookup = Annotated[
    bool,
    typer.Option(
        "--lookup",
        help="Speculate by prompt lookup: guess the next tokens from the text so far and check them all in one "
        "pass. Faster when the answer quotes its input (code edits, extraction); the same answer either way.",
    ),
]
Draft = Annotated[
    str | None,
    typer.Option(
        "--draft",
        help="Speculate with this draft model: a small model with the same tokenizer guesses the next tokens, "
        "and they are checked all in one pass; the same answer either way.",
        show_default=False,
        metavar="MODEL",
    ),
]
DraftMax = Annotated[int, typer.Option("--draft-max", min=1, max=47, help="Most tokens guessed at once.")]
DraftMin = Annotated[
    int,
    typer.Option(
        "--draft-min", min=0, max=47, help="Check at least this many guessed tokens, even where it does not pay."
    ),
]


def _cache_type(name: str) -> str:
    if name.lower() not in KV_CACHE_TYPES:
        raise UsageError(f"unknown KV cache type {name!r}", f"use one of {', '.join(KV_CACHE_TYPES)}")
    return name.lower()


CacheTypeK = Annotated[
    str,
    typer.Option(
        "--cache-type-k",
        "-ctk",
        help="KV cache type for keys: f16, q8_0, q4_0...",
        metavar="TYPE",
        callback=_cache_type,
    ),
]
CacheTypeV = Annotated[
    str, typer.Option("--cache-type-v", "-ctv", help="KV cache type for values.", metavar="TYPE", callback=_cache_type)
]
Rpc = Annotated[
    str | None,
    typer.Option(
        "--rpc",
        help="Put the model's layers on these llama.cpp RPC workers (`llmrun worker` on each machine), "
        "comma-separated host:port; needs llama.cpp built with GGML_RPC=ON.",
        show_default=False,
        metavar="HOST:PORT,...",
    ),
]
Server = Annotated[
    str | None,
    typer.Option(
        "--server",
        help="Send the request to this server (a running `llmrun serve`, or any with the OpenAI API) instead of "
        "loading the model here; auto: the local `llmrun serve` when one is running [default: LLMRUN_SERVER].",
        show_default=False,
        metavar="URL|auto",
    ),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Say what was loaded and how fast it ran, on stderr.")]


def sampling_params(
    temperature: float, top_p: float, top_k: int, min_p: float, repeat_penalty: float, seed: int | None
) -> SamplingParams:
    return SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed
    )


def resolve(model: str, no_pull: bool) -> ResolvedModel:
    """A model reference to a loadable file, pulling it first unless --no-pull or HF_HUB_OFFLINE."""
    from llmrun.cli.models import pull_options
    from llmrun.store.models import resolve_or_pull
    from llmrun.store.store import Store

    offline = env_flag(os.environ.get("HF_HUB_OFFLINE"))
    return resolve_or_pull(Store(get_settings().home), model, None if no_pull or offline else pull_options())


def speculation_options(
    lookup: bool, draft: str | None, draft_max: int, draft_min: int, no_pull: bool
) -> SpeculationOptions:
    """--lookup or --draft MODEL (pulled like any model), and how many tokens to guess."""
    from llmrun.engine.speculation import SpeculationOptions

    if lookup and draft is not None:
        raise UsageError("--lookup and --draft are two ways to guess tokens", "choose one of them")
    if draft_min > draft_max:
        raise UsageError(f"--draft-min {draft_min} is more than --draft-max {draft_max}", "lower --draft-min")
    draft_path = resolve(draft, no_pull).path if draft is not None else None
    return SpeculationOptions(lookup=lookup, draft=draft_path, draft_max=draft_max, draft_min=draft_min)


def rpc_endpoints(rpc: str | None) -> tuple[str, ...]:
    """``--rpc host:port,...`` as endpoints (a malformed one is a usage error)."""
    if not rpc:
        return ()
    from llmrun.engine.rpc import parse_endpoints

    return parse_endpoints(rpc)


def open_engine(
    resolved: ResolvedModel,
    ctx: int | None,
    threads: int | None,
    gpu_layers: str | None,
    verbose: bool,
    speculation: SpeculationOptions | None = None,
    cache_types: tuple[str, str] = ("f16", "f16"),
    rpc: tuple[str, ...] = (),
) -> Engine:
    """Load the model with the user's resource options (environment defaults otherwise)."""
    from llmrun.engine import Engine, LoadOptions
    from llmrun.engine.speculation import SpeculationOptions

    settings = get_settings()
    options = LoadOptions(
        n_ctx=ctx,
        n_threads=threads or settings.threads,
        gpu_layers=gpu_layers or settings.gpu_layers,
        cache_type_k=cache_types[0],
        cache_type_v=cache_types[1],
        speculation=speculation or SpeculationOptions(),
        rpc=rpc,
        debug=settings.debug,
    )
    engine = Engine(resolved.path, options)
    if verbose:
        notice(
            f"loaded {resolved.name} ({engine.model.description}) from {resolved.path}; "
            f"{engine.context_choice.reason}; {engine.n_threads} threads; {engine.model.n_gpu_layers} GPU layers"
            + (f"; draft model {engine.drafter.model.path.name}" if engine.drafter is not None else "")
            + (f"; layers on RPC workers {', '.join(rpc)}" if rpc else "")
        )
    return engine


OFF = ("", "off", "none", "local")


def server_client(
    server: str | None, model: str, local_only: list[str], verbose: bool, log: bool
) -> ServerClient | None:
    """The server ``--server`` (or LLMRUN_SERVER) names, or None to load the model here.

    ``auto`` uses the local ``llmrun serve`` when one answers, and loads here when none does, when the model is a
    file, or when an option only a model loaded here can honour is given (``local_only``: those options' names).
    """
    from pathlib import Path

    settings = get_settings()
    choice = (server if server is not None else settings.server or "").strip()
    if choice.lower() in OFF:
        return None
    is_file = model.lower().endswith(".gguf") or Path(model).expanduser().is_file()
    if choice.lower() == "auto":
        if is_file or local_only:
            return None
        from llmrun.client import find_local_server

        found = find_local_server(settings.host, settings.api_key)
        if found is None:
            return None
        choice = found
    elif local_only:
        where = "--server" if server is not None else f"LLMRUN_SERVER={choice}"
        raise UsageError(
            f"{', '.join(local_only)} {'applies' if len(local_only) == 1 else 'apply'} to a model loaded here, "
            f"not to one on a server ({where})",
            "drop it, or add --server off to load the model here",
        )
    elif is_file:
        raise UsageError(
            f"{model} is a file here: a server cannot load it", "import it on the server, or add --server off"
        )
    from llmrun.client import ServerClient
    from llmrun.logs import LogStore

    log_id = LogStore(settings.logs_path).log_id(create=log)
    client = ServerClient(choice, settings.api_key, log_id)
    if verbose:
        notice(f"sending the request to {client.root}")
    return client


def local_only_options(
    ctx: int | None, threads: int | None, gpu_layers: str | None, lookup: bool, draft: str | None,
    cache_types: tuple[str, str], rpc: str | None = None,
) -> list[str]:  # fmt: skip
    """The options given that only a model loaded here can honour."""
    given = {"--ctx": ctx is not None, "--threads": threads is not None, "--gpu-layers": gpu_layers is not None,
             "--lookup": lookup, "--draft": draft is not None, "--cache-type-k": cache_types[0] != "f16",
             "--cache-type-v": cache_types[1] != "f16", "--rpc": bool(rpc)}  # fmt: skip
    return [name for name, present in given.items() if present]
