"""llama.cpp's RPC backend: one model's layers on ggml RPC workers (``llmrun worker``) on other machines.

A worker serves its machine's devices (its GPUs, else its CPU) over TCP; a process given
``--rpc host:port,...`` registers each worker's devices with ggml, and llama.cpp offloads the
model's layers to them as to GPUs, split by the memory each reports. The protocol has no
authentication: workers belong on a trusted network. It needs llama.cpp built with GGML_RPC=ON;
the default build of llama-cpp-python has it off.

ggml has no error path for a worker that goes away mid-answer: it aborts the process. llmrun turns
that abort into one line on stderr and exit code 5, with what was generated kept on stdout.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import sys
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from llmrun.engine.native import llama_cpp
from llmrun.errors import ExitCode, LlmrunError, ServerUnreachable, UsageError

DEFAULT_PORT = 50052  # llama.cpp's rpc-server's
CONNECT_TIMEOUT_S = 3.0
REBUILD = 'rebuild llama-cpp-python with it: CMAKE_ARGS="-DGGML_RPC=ON" pip install --force-reinstall --no-cache-dir ' \
          "llama-cpp-python"  # fmt: skip
_DEVICE_CPU, _DEVICE_GPU, _DEVICE_IGPU = 0, 1, 2  # enum ggml_backend_dev_type
_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


class RpcUnavailable(LlmrunError):
    """This llama.cpp was built without its RPC backend."""


def parse_endpoints(text: str) -> tuple[str, ...]:
    """``--rpc host:port,host:port`` to endpoints; a malformed one is a usage error."""
    endpoints = []
    for part in text.split(","):
        endpoint = part.strip()
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--rpc {endpoint!r} is not host:port", f"e.g. --rpc 192.168.1.20:{DEFAULT_PORT}")
        endpoints.append(endpoint)
    return tuple(endpoints)


def _require_rpc() -> None:
    if not llama_cpp.llama_supports_rpc():
        raise RpcUnavailable("this llama.cpp was built without RPC (GGML_RPC is off)", REBUILD)


@lru_cache(maxsize=1)
def _ggml() -> Any:
    """ggml's functions (its backend registry's and its base's) as libllama sees them.

    Looked up through llama_cpp's own handle of libllama, whose dependencies are libggml.so.0 and
    libggml-base.so.0: a wheel carries libggml.so beside them as a copy, not a link, and opening that
    would load a second ggml with a registry of its own, which llama.cpp never reads.
    """
    from llama_cpp import llama_cpp as bindings

    handle = bindings._lib
    ggml = ctypes.CDLL(handle._name, handle=handle._handle)
    ggml.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_register.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ggml.ggml_set_abort_callback.restype = ctypes.c_void_p
    ggml.ggml_set_abort_callback.argtypes = [_ABORT_CALLBACK]
    return ggml


def _rpc_function(name: str, signature: Any) -> Any:
    ggml = _ggml()
    registry = ggml.ggml_backend_reg_by_name(b"RPC")
    address = ggml.ggml_backend_reg_get_proc_address(registry, name.encode()) if registry else None
    if not address:
        raise RpcUnavailable(f"this llama.cpp's RPC backend has no {name}", REBUILD)
    return signature(address)


@_ABORT_CALLBACK  # type: ignore[untyped-decorator]
def _worker_lost(message: bytes | None) -> None:
    """ggml is aborting (a worker crashed, or went away): what was generated is on stdout; one line, exit 5."""
    detail = (message or b"").decode("utf-8", errors="replace").rsplit(": ", 1)[-1].strip()
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    try:
        sys.stderr.write(f"error: an RPC worker stopped answering ({detail}); check the workers (llmrun worker) "
                         f"and run again\n")  # fmt: skip
        sys.stderr.flush()
    finally:
        os._exit(ExitCode.SERVER_UNREACHABLE)


def _check_reachable(endpoint: str) -> None:
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as error:
        reason = "connection refused" if isinstance(error, ConnectionRefusedError) else str(error)
        raise ServerUnreachable(
            f"no RPC worker answers at {endpoint} ({reason})", "start one there with `llmrun worker --host ...`"
        ) from None


@cache
def add_workers(endpoints: tuple[str, ...]) -> None:
    """Register the workers' devices with ggml (once per process), so models load onto them."""
    _require_rpc()
    add_server = _rpc_function("ggml_backend_rpc_add_server", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p))
    ggml = _ggml()
    ggml.ggml_set_abort_callback(_worker_lost)
    for endpoint in endpoints:
        _check_reachable(endpoint)
        registry = add_server(endpoint.encode())
        if not registry:
            raise ServerUnreachable(f"the RPC worker at {endpoint} offers no device", "check its log")
        ggml.ggml_backend_register(registry)


def serve_worker(host: str, port: int, threads: int, cache_dir: Path | None) -> list[str]:
    """Start ggml's RPC server for this machine's devices (GPUs, else the CPU) on a thread; the devices' names.

    The server runs until the process ends."""
    import threading

    _require_rpc()
    ggml = _ggml()
    all_devices = [ggml.ggml_backend_dev_get(index) for index in range(ggml.ggml_backend_dev_count())]
    accelerators = [dev for dev in all_devices if ggml.ggml_backend_dev_type(dev) in (_DEVICE_GPU, _DEVICE_IGPU)]
    chosen = accelerators or [dev for dev in all_devices if ggml.ggml_backend_dev_type(dev) == _DEVICE_CPU]
    start = _rpc_function(
        "ggml_backend_rpc_start_server",
        ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                         ctypes.POINTER(ctypes.c_void_p)),
    )  # fmt: skip
    array = (ctypes.c_void_p * len(chosen))(*chosen)
    endpoint = f"{host}:{port}".encode()
    cache = str(cache_dir).encode() if cache_dir is not None else None
    _check_port_free(host, port)
    thread = threading.Thread(
        target=start, args=(endpoint, cache, threads, len(chosen), array), name="llmrun-rpc", daemon=True
    )
    thread.start()
    return [ggml.ggml_backend_dev_name(dev).decode() for dev in chosen]


def _check_port_free(host: str, port: int) -> None:
    """ggml's server prints its own failure and returns; say it in one line first."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UsageError(f"cannot listen on {host}:{port}: {error.strerror}", "pick another --port") from None
