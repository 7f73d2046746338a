"""Loading llama.cpp: the one import of llama_cpp, and where its log lines go."""

from __future__ import annotations

import ctypes
import os
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import llama_cpp

__all__ = [
    "NATIVE_LOG",
    "amx_notice_silenced",
    "extra_buffers_allowed",
    "init_native",
    "llama_cpp",
    "supports_gpu_offload",
]

# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous line).
_LOG_ERROR = 4
_LOG_CONT = 5


class NativeLog:
    """Receives llama.cpp's log lines: echoed to stderr with --debug, else only the last errors are kept."""

    def __init__(self) -> None:
        self.echo = False
        self.recent_errors: deque[str] = deque(maxlen=8)
        self._last_level = 0

    def write(self, level: int, text: bytes) -> None:
        message = text.decode("utf-8", errors="replace")
        if level == _LOG_CONT:
            level = self._last_level
        self._last_level = level
        if level == _LOG_ERROR and message.strip():
            self.recent_errors.append(message.strip())
        if self.echo:
            sys.stderr.write(message)
            sys.stderr.flush()

    def clear_errors(self) -> None:
        self.recent_errors.clear()

    def first_error(self) -> str | None:
        """The first error since ``clear_errors``, without llama.cpp's ``function_name:`` prefixes."""
        if not self.recent_errors:
            return None
        message = self.recent_errors[0]
        while (prefix := message.split(": ", 1))[0].isidentifier() and len(prefix) == 2:
            message = prefix[1]
        return message


NATIVE_LOG = NativeLog()


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    NATIVE_LOG.write(level, text)


@dataclass(frozen=True)
class _Backend:
    """What initialising llama.cpp decided for this process (see ``machine.refuse_amx``)."""

    amx_refused: bool  # the CPU has AMX and llama.cpp was kept off it
    extra_buffers: bool  # models may use llama.cpp's extra buffer types (repacked weights)


@lru_cache(maxsize=1)
def _init_backend() -> _Backend:
    from llmrun.machine import has_amx, refuse_amx
    from llmrun.settings import get_settings

    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    if not has_amx() or get_settings().amx:
        return _Backend(amx_refused=False, extra_buffers=True)
    refused = refuse_amx()
    # Where AMX cannot be turned off alone: no extra buffer types at all (as llama.cpp's --no-repack).
    return _Backend(amx_refused=refused, extra_buffers=refused)


@contextmanager
def amx_notice_silenced() -> Iterator[None]:
    """While a model loads: ggml prints "AMX is not ready to be used!" to stderr each time it finds AMX refused,
    which is llmrun's doing, not news. Not with --debug, which shows all."""
    if not _init_backend().amx_refused or NATIVE_LOG.echo:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def extra_buffers_allowed() -> bool:
    """Whether models may use llama.cpp's extra buffer types (repacked weights)."""
    return _init_backend().extra_buffers


def init_native(debug: bool = False) -> Any:
    """Initialise llama.cpp once per process and return the ``llama_cpp`` module."""
    NATIVE_LOG.echo = debug
    _init_backend()
    return llama_cpp


def supports_gpu_offload() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())
