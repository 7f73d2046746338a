"""The errors a user can cause, each with a one-line message, a hint and an exit code.

The CLI (``cli/main.py``) is the one place that turns them into output; the server
will map ``http_status`` the same way.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes; documented in the README."""

    OK = 0
    RUNTIME_ERROR = 1
    USAGE_ERROR = 2
    MODEL_NOT_FOUND = 3
    PROMPT_TOO_LONG = 4
    SERVER_UNREACHABLE = 5  # --server: no server answers there, or it went away mid-answer
    HANGUP = 129  # SIGHUP (the terminal closed): 128 + the signal's number, as a shell reports it
    INTERRUPTED = 130  # Ctrl-C (SIGINT)
    TERMINATED = 143  # SIGTERM (`timeout`, `kill`, a service manager)


class LlmrunError(Exception):
    """Base class: something went wrong that the user can understand and fix."""

    exit_code: ExitCode = ExitCode.RUNTIME_ERROR
    http_status: int = 500

    def __init__(self, message: str, hint: str | None = None, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.param = param  # the request field at fault, where a server names it (OpenAI's error.param)

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class UsageError(LlmrunError):
    """The command line or request asks for something that cannot work."""

    exit_code = ExitCode.USAGE_ERROR
    http_status = 400


class ModelNotFound(LlmrunError):
    """No model by that name in the store, the catalog or on disk."""

    exit_code = ExitCode.MODEL_NOT_FOUND
    http_status = 404


class PromptTooLong(LlmrunError):
    """The prompt does not fit in the context window."""

    exit_code = ExitCode.PROMPT_TOO_LONG
    http_status = 400


class InvalidModelFile(LlmrunError):
    """A file is not a complete, readable GGUF model."""

    http_status = 422


class ModelLoadError(LlmrunError):
    """llama.cpp refused to load a model or create a context for it."""


class DraftMismatch(UsageError):
    """A draft model's vocabulary is not the model's: its guesses would be other tokens."""


class DownloadError(LlmrunError):
    """A model could not be fetched or failed verification."""

    http_status = 502


class ServerUnreachable(LlmrunError):
    """A server (``run --server``, an upstream of ``serve``) cannot be reached, or went away mid-answer."""

    exit_code = ExitCode.SERVER_UNREACHABLE
    http_status = 502


class UpstreamError(LlmrunError):
    """An upstream engine answered with something that is not a valid answer."""

    http_status = 502


class UpstreamTimeout(UpstreamError):
    """An upstream engine took longer than its timeout."""

    http_status = 504


class StoreError(LlmrunError):
    """The local model store cannot do what was asked (name taken, disk full...)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so the command ends the way Ctrl-C ends it: what was
    generated is flushed and logged, partial files are kept or removed as on Ctrl-C, then the exit code is
    128 + the signal's number (``cli/main.py`` notes which signal came)."""
