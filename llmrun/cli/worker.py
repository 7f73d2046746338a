"""``llmrun worker``: this machine's devices as a llama.cpp RPC worker, for ``--rpc`` on another machine."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from llmrun.cli.options import Threads
from llmrun.cli.output import notice
from llmrun.settings import LOOPBACK_HOSTS, get_settings


def worker_command(
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface, on a trusted network).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535, help="Port.")] = 50052,
    threads: Threads = None,
    cache: Annotated[
        bool,
        typer.Option("--cache", help="Keep the tensors it is sent in a cache on disk, so a model loads faster again."),
    ] = False,
) -> None:
    """Serve this machine's GPUs (or its CPU) to `--rpc` on other machines, until Ctrl-C."""
    from llmrun.engine.native import init_native
    from llmrun.engine.rpc import serve_worker
    from llmrun.machine import physical_cores

    settings = get_settings()
    init_native(settings.debug)
    cache_dir: Path | None = None
    if cache:
        cache_dir = settings.home / "rpc-cache"
        cache_dir.mkdir(parents=True, exist_ok=True)
    devices = serve_worker(host, port, threads or settings.threads or physical_cores(), cache_dir)
    if host not in LOOPBACK_HOSTS:
        notice(f"warning: the RPC protocol has no authentication: anyone who can reach {host}:{port} can use "
               "this machine's devices; keep it on a trusted network")  # fmt: skip
    notice(f"llmrun worker on {host}:{port} serving {', '.join(devices)}; use it with --rpc {host}:{port}; "
           "Ctrl-C to stop")  # fmt: skip
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    with contextlib.suppress(KeyboardInterrupt):
        stopped.wait()
    notice("worker stopped")
