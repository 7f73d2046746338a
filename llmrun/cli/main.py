"""The ``llmrun`` command: the Typer app, and the one place errors become output and exit codes."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import FrameType
from typing import Annotated

import typer

from llmrun import __version__
from llmrun.errors import ExitCode, LlmrunError, Terminated
from llmrun.settings import env_flag, get_settings

app = typer.Typer(
    name="llmrun",
    help="Run quantized GGUF models locally on llama.cpp: pull, run, chat, serve, bench.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version_callback(value: bool) -> None:
    if value:
        sys.stdout.write(f"llmrun {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", "-V", help="Show the version and exit.", callback=_version_callback, is_eager=True),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and llama.cpp's own log lines.")] = False,
) -> None:
    if debug:
        # Settings read the environment once; --debug is the same switch as LLMRUN_DEBUG=1.
        os.environ["LLMRUN_DEBUG"] = "1"
        get_settings.cache_clear()


# Command name -> (module, function). Only the command being run is built: typer builds every
# option of every registered command at start-up, and `llmrun list` must stay fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "pull": ("llmrun.cli.models", "pull_command"),
    "import": ("llmrun.cli.models", "import_command"),
    "list": ("llmrun.cli.models", "list_command"),
    "show": ("llmrun.cli.models", "show_command"),
    "rm": ("llmrun.cli.models", "rm_command"),
    "cp": ("llmrun.cli.models", "cp_command"),
    "catalog": ("llmrun.cli.models", "catalog_command"),
    "prune": ("llmrun.cli.models", "prune_command"),
    "verify": ("llmrun.cli.models", "verify_command"),
    "run": ("llmrun.cli.run", "run_command"),
    "chat": ("llmrun.cli.chat", "chat_command"),
    "logs": ("llmrun.cli.logs", "logs_command"),
    "bench": ("llmrun.cli.bench", "bench_command"),
    "serve": ("llmrun.cli.serve", "serve_command"),
    "ps": ("llmrun.cli.serve", "ps_command"),
    "stop": ("llmrun.cli.serve", "stop_command"),
    "worker": ("llmrun.cli.worker", "worker_command"),
}
ALIASES = {"ls": "list"}


def _register_commands(args: list[str]) -> None:
    """Register the command named in ``args``, or all of them (for --help and for a mistyped name)."""
    import importlib

    requested = next((arg for arg in args if not arg.startswith("-")), None)
    wanted = ALIASES.get(requested or "", requested)
    names = [wanted] if wanted in COMMANDS else list(COMMANDS)
    registered = {info.name for info in app.registered_commands}  # run_cli may be called again in one process
    for name in names:
        if name in registered:
            continue
        module, function = COMMANDS[name]
        command = getattr(importlib.import_module(module), function)
        app.command(name)(command)
        for alias, target in ALIASES.items():
            if target == name:
                app.command(alias, hidden=True)(command)


def _debug_enabled() -> bool:
    # Not get_settings(): this runs while handling errors, and settings can be the error.
    return env_flag(os.environ.get("LLMRUN_DEBUG"))


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    return code


def _is_click_error(error: Exception) -> bool:
    # typer < 0.26 raises click's exceptions, later versions those of its vendored copy: match by shape.
    return hasattr(error, "format_message") and hasattr(error, "exit_code")


def _click_error_message(error: Exception) -> str:
    message = str(error.format_message()).rstrip(".")  # type: ignore[attr-defined]
    ctx = getattr(error, "ctx", None)
    if ctx is not None and int(getattr(error, "exit_code", 0)) == ExitCode.USAGE_ERROR:
        message += f"; see `{ctx.command_path} --help`"
    return message


ENDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def _signals_end_like_ctrl_c() -> Iterator[list[int]]:
    """While a command runs, SIGTERM and SIGHUP raise ``Terminated`` (a KeyboardInterrupt) where the program is;
    the list yielded holds the signal received, whatever the command or click made of the exception.
    (`serve` sets its own handlers.)"""
    import threading

    received: list[int] = []

    def end(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        for number in ENDING_SIGNALS:  # once: a second signal must not cut the flushing and logging short
            signal.signal(number, signal.SIG_IGN)
        raise Terminated(signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield received
        return
    previous = {number: signal.signal(number, end) for number in ENDING_SIGNALS}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def run_cli(args: list[str] | None = None) -> int:
    """Run the CLI and return the exit code; every user-caused error ends here as one line."""
    with _signals_end_like_ctrl_c() as received:
        code = _run(args)
    if received:
        with suppress(OSError):  # after SIGHUP the terminal may be gone
            sys.stderr.write(f"stopped by {signal.Signals(received[0]).name}\n")
        return 128 + received[0]
    return code


def _run(args: list[str] | None) -> int:
    _register_commands(sys.argv[1:] if args is None else args)
    command = typer.main.get_command(app)
    try:
        result = command.main(args=args, prog_name="llmrun", standalone_mode=False)
        return result if isinstance(result, int) else ExitCode.OK
    except LlmrunError as error:
        if _debug_enabled():
            traceback.print_exc()
        return _fail(str(error), error.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("\ninterrupted\n")
        return ExitCode.INTERRUPTED
    except Exception as error:  # noqa: BLE001 - last resort: one line, not a traceback
        if _is_click_error(error):
            return _fail(_click_error_message(error), int(getattr(error, "exit_code", ExitCode.USAGE_ERROR)))
        if _debug_enabled():
            traceback.print_exc()
            return ExitCode.RUNTIME_ERROR
        return _fail(
            f"unexpected {type(error).__name__}: {error} (run with --debug for the traceback)", ExitCode.RUNTIME_ERROR
        )


def main() -> None:
    sys.exit(run_cli())
