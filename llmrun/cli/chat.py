"""``llmrun chat``: the interactive REPL (and, with stdin piped, one message per line)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llmrun.cli import options
from llmrun.cli.output import format_count, notice
from llmrun.errors import LlmrunError, Terminated
from llmrun.reasoning import REASONING
from llmrun.settings import (
    DEFAULT_DRAFT_MAX,
    DEFAULT_MIN_P,
    DEFAULT_REPEAT_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    get_settings,
)

if TYPE_CHECKING:
    from llmrun.chat import ChatModel, ChatSession, PendingReply

    Reopen = Callable[[str], ChatModel]

PROMPT = ">>> "
CONTINUATION = "... "
FENCE = '"""'
RENDER_INTERVAL_S = 0.08
HELP = """\
/help              this list
/bye               leave (also Ctrl-D)
/clear             forget the conversation (the log keeps it)
/system [TEXT]     show or set the system prompt
/set [KEY VALUE]   show settings, or set one: temperature, top_p, top_k, min_p, repeat_penalty, seed, max_tokens
/show              the model and the current settings
/stats             tokens in the context, the last answer's speed and time to first token
/context           how full the context is
/save NAME         name this conversation in the log
/load NAME         continue a saved conversation (a name or an id from `llmrun logs`)
/model NAME        switch to another model, keeping the conversation
/regen             answer the last message again
/think             a reasoning model's thinking before its last answer
/undo              drop the last exchange
/read FILE         add a file's text to the next message
\"\"\"               start and end a message of several lines"""


class Renderer:
    """Shows an answer as it streams: Markdown with rich on a terminal (redrawn in place), raw text otherwise."""

    def __init__(self, plain: bool) -> None:
        self.plain = plain or not sys.stdout.isatty()

    def stream(self, reply: PendingReply) -> bool:
        """Show the answer; returns False if Ctrl-C stopped it.

        A reasoning model's thinking shows dimmed while it thinks, and folds into one line when
        the answer begins (``/think`` shows it again).
        """
        if self.plain:
            return self._stream_plain(reply)
        from rich.console import Console, Group
        from rich.live import Live
        from rich.markdown import Markdown
        from rich.text import Text

        began = time.monotonic()
        thought_s: float | None = None
        thinking = text = ""

        def view() -> Group:
            parts: list[Text | Markdown] = []
            if thinking and thought_s is None:
                parts.append(Text(thinking, style="dim"))
            elif thinking:
                parts.append(Text(f"thought for {thought_s:.1f} s (/think to read it)", style="dim italic"))
            parts.append(Markdown(text))
            return Group(*parts)

        last_draw = 0.0
        with Live(view(), console=Console(), auto_refresh=False, vertical_overflow="visible") as live:
            try:
                for kind, piece in reply.pieces():
                    if kind == REASONING:
                        thinking += piece
                    else:
                        if thinking and thought_s is None:
                            thought_s = time.monotonic() - began
                        text += piece
                    if time.monotonic() - last_draw >= RENDER_INTERVAL_S:
                        live.update(view(), refresh=True)
                        last_draw = time.monotonic()
            except KeyboardInterrupt as error:
                live.update(view(), refresh=True)
                if isinstance(error, Terminated):
                    raise
                return False
            if thinking and thought_s is None:
                thought_s = time.monotonic() - began
            live.update(view(), refresh=True)
        return True

    @staticmethod
    def _stream_plain(reply: PendingReply) -> bool:
        """The answer as raw text; a reasoning model's thinking is left out (``/think`` shows it)."""
        text = ""
        try:
            for kind, piece in reply.pieces():
                if kind == REASONING:
                    continue
                text += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt as error:
            if isinstance(error, Terminated):
                raise
            return False
        finally:
            if not text.endswith("\n"):
                sys.stdout.write("\n")
            sys.stdout.flush()
        return True


class LineReader:
    """Reads messages: readline editing and history on a terminal, ``\"\"\"`` blocks, pasted lines as one message."""

    def __init__(self, interactive: bool, history: Path | None) -> None:
        self.interactive = interactive
        self.history = history
        if interactive:
            try:
                import readline
            except ImportError:  # pragma: no cover - Windows without pyreadline
                return
            if history is not None:
                history.parent.mkdir(parents=True, exist_ok=True)
                if history.exists():
                    readline.read_history_file(history)
                readline.set_history_length(1000)

    def _line(self, prompt: str) -> str:
        if self.interactive:
            return input(prompt)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def _more_pending(self) -> bool:
        """Lines already waiting (a paste): they belong to the same message."""
        import select

        try:
            return bool(select.select([sys.stdin], [], [], 0.02)[0])
        except (OSError, ValueError):
            return False

    def read(self) -> str:
        """One message; raises EOFError at the end of input."""
        line = self._line(PROMPT)
        stripped = line.strip()
        if stripped.startswith(FENCE):
            body = stripped[len(FENCE) :]
            if body.endswith(FENCE):  # """a message on one line"""
                message = body[: -len(FENCE)]
            else:
                lines = [body] if body else []
                while not (next_line := self._line(CONTINUATION)).rstrip().endswith(FENCE):
                    lines.append(next_line)
                lines.append(next_line.rstrip()[: -len(FENCE)])
                message = "\n".join(lines).strip("\n")
        else:
            message = line
            while self.interactive and self._more_pending():
                message += "\n" + self._line("")
        self._remember()
        return message

    def _remember(self) -> None:
        if self.interactive and self.history is not None:
            try:
                import readline

                readline.write_history_file(self.history)
            except (ImportError, OSError):
                pass


def _settings_text(session: ChatSession) -> str:
    sampling = session.sampling
    return (
        f"temperature {sampling.temperature}, top_p {sampling.top_p}, top_k {sampling.top_k}, min_p {sampling.min_p}, "
        f"repeat_penalty {sampling.repeat_penalty}, seed {sampling.seed if sampling.seed is not None else 'random'}, "
        f"max_tokens {session.max_tokens or 'no limit'}"
    )


def _context_text(session: ChatSession) -> str:
    used, capacity = session.context_tokens(), session.model.capacity
    exchanges = f"{len(session.turns)} exchange(s)"
    if used is None:
        return f"context: {exchanges} (the server counts its tokens)"
    if capacity is None:
        return f"context: {used} tokens, {exchanges}"
    return f"context: {used} of {capacity} tokens ({used * 100 // max(capacity, 1)}%), {exchanges}"


def _model_text(session: ChatSession) -> str:
    from llmrun.chat import EngineChat, ServerChat

    chat_model = session.model
    if isinstance(chat_model, EngineChat):
        engine, model = chat_model.engine, chat_model.engine.model
        return (
            f"model {session.model_name} ({model.description}, {format_count(model.n_ctx_train)} training context)\n"
            f"context {engine.seq_capacity} tokens, {engine.n_threads} threads, {model.n_gpu_layers} GPU layers"
        )
    capacity = chat_model.capacity
    where = f" on {chat_model.client.root}" if isinstance(chat_model, ServerChat) else ""
    return f"model {session.model_name}{where}\n" + (
        f"context {capacity} tokens" if capacity else "context: the server's"
    )


def handle_command(session: ChatSession, line: str, reopen: Reopen) -> PendingReply | bool | None:
    """Run a slash command. Returns a reply to stream (/regen), False to leave, None otherwise."""
    command, _, argument = line[1:].strip().partition(" ")
    argument = argument.strip()
    command = command.lower()
    if command in {"bye", "exit", "quit"}:
        return False
    if command in {"help", "?"}:
        notice(HELP)
    elif command == "clear":
        session.clear()
        notice("conversation cleared")
    elif command == "system":
        if argument:
            session.system = argument
            notice("system prompt set")
        else:
            notice(f"system prompt: {session.system or '(none)'}")
    elif command == "set":
        if argument:
            key, _, value = argument.partition(" ")
            session.set_option(key, value.strip())
        notice(_settings_text(session))
    elif command == "show":
        notice(f"{_model_text(session)}\n{_settings_text(session)}\nsystem prompt: {session.system or '(none)'}")
    elif command in {"stats", "context"}:
        notice(_context_text(session))
        last = session.last_result
        if command == "stats" and last is not None:
            notice(
                f"last answer: {last.completion_tokens} tokens at {last.generation_tokens_per_s:.1f} tokens/s, "
                f"first token after {last.time_to_first_token_s:.3f} s "
                f"({last.evaluated_prompt_tokens} new prompt tokens, {last.cached_tokens} reused from the cache)"
            )
    elif command == "save":
        if not argument:
            raise LlmrunError("/save needs a name", "e.g. /save trip-plans")
        session.save(argument)
        notice(f"saved as {argument}")
    elif command == "load":
        if not argument:
            raise LlmrunError("/load needs a name or an id", "see `llmrun logs`")
        notice(f"loaded {argument}: {session.load(argument)} exchange(s)")
    elif command == "model":
        if not argument:
            raise LlmrunError("/model needs a model name", "see `llmrun list`")
        session.switch_model(reopen(argument))
        notice(f"now chatting with {session.model_name}")
    elif command == "think":
        notice(session.last_thinking or "the last answer came without thinking")
    elif command == "regen":
        return session.regen()
    elif command == "undo":
        turn = session.undo()
        notice(f"dropped: {turn.user[:60]}")
    elif command == "read":
        if not argument:
            raise LlmrunError("/read needs a file", "e.g. /read notes.txt")
        length = session.read_file(Path(argument))
        notice(f"{argument} ({length} characters) will go with your next message")
    else:
        raise LlmrunError(f"unknown command /{command}", "/help lists them")
    return None


def chat_command(
    model: Annotated[
        str | None,
        typer.Argument(
            help="A model name, path or Hub reference [default: LLMRUN_DEFAULT_MODEL or smollm2].", metavar="[MODEL]"
        ),
    ] = None,
    system: options.System = None,
    temperature: options.Temperature = DEFAULT_TEMPERATURE,
    top_p: options.TopP = DEFAULT_TOP_P,
    top_k: options.TopK = DEFAULT_TOP_K,
    min_p: options.MinP = DEFAULT_MIN_P,
    repeat_penalty: options.RepeatPenalty = DEFAULT_REPEAT_PENALTY,
    seed: options.Seed = None,
    max_tokens: options.MaxTokens = None,
    stop: options.Stop = None,
    ctx: Annotated[
        int | None,
        typer.Option("--ctx", min=16, help="Context size in tokens [default: the model's, capped to fit memory]."),
    ] = None,
    threads: options.Threads = None,
    gpu_layers: options.GpuLayers = None,
    cache_type_k: options.CacheTypeK = "f16",
    cache_type_v: options.CacheTypeV = "f16",
    lookup: options.Lookup = False,
    draft: options.Draft = None,
    draft_max: options.DraftMax = DEFAULT_DRAFT_MAX,
    draft_min: options.DraftMin = 0,
    rpc: options.Rpc = None,
    server: options.Server = None,
    plain: Annotated[bool, typer.Option("--plain", help="Raw text instead of rendered Markdown.")] = False,
    continue_last: Annotated[
        bool, typer.Option("--continue", "-c", help="Continue the most recent conversation.")
    ] = False,
    cid: Annotated[str | None, typer.Option("--cid", help="Continue the conversation with this id or name.")] = None,
    no_log: Annotated[bool, typer.Option("--no-log", help="Do not log this conversation.")] = False,
    no_pull: options.NoPull = False,
    verbose: options.Verbose = False,
) -> None:
    """Chat with a model: streamed answers, slash commands (/help), history, and a searchable log."""
    from llmrun.chat import ChatSession, EngineChat, ServerChat
    from llmrun.logs import LogStore

    settings = get_settings()
    log = None if no_log or settings.no_log else LogStore(settings.logs_path)
    resume: str | None = None
    if continue_last or cid:
        if log is None:
            raise LlmrunError("the log is off, so there is no conversation to continue", "drop --no-log")
        resume = log.find_conversation(cid) if cid else log.latest_conversation()
        if resume is None:
            raise LlmrunError("there is no conversation to continue yet", "start one with `llmrun chat`")
        if model is None:
            logged = log.responses(conversation_id=resume, limit=1)
            model = logged[0].exchange.model if logged else None

    cache_types = (cache_type_k, cache_type_v)
    workers = options.rpc_endpoints(rpc)
    local_only = options.local_only_options(ctx, threads, gpu_layers, lookup, draft, cache_types, rpc)

    def reopen(reference: str) -> ChatModel:
        client = options.server_client(server, reference, local_only, verbose, log is not None)
        if client is not None:
            client.ensure_model(reference, no_pull, lambda status: notice(f"{client.root}: {status}"))
            return ServerChat(client, reference)
        resolved = options.resolve(reference, no_pull)
        speculation = options.speculation_options(lookup, draft, draft_max, draft_min, no_pull)
        engine = options.open_engine(resolved, ctx, threads, gpu_layers, verbose, speculation, cache_types, workers)
        return EngineChat(engine, resolved.name)

    session = ChatSession(
        model=reopen(model or settings.default_model),
        sampling=options.sampling_params(temperature, top_p, top_k, min_p, repeat_penalty, seed),
        max_tokens=max_tokens,
        stop=tuple(stop or ()),
        system=system,
        log=log,
    )
    try:
        if resume is not None:
            notice(f"continuing conversation {resume}: {session.load(resume)} exchange(s)")
            if system:
                session.system = system
        _repl(session, Renderer(plain), reopen)
    finally:
        session.model.close()


def _repl(session: ChatSession, renderer: Renderer, reopen: Reopen) -> None:
    interactive = sys.stdin.isatty()
    reader = LineReader(interactive, get_settings().history_path)
    if interactive:
        notice(f"chatting with {session.model_name}; /help for commands, /bye or Ctrl-D to leave")
    while True:
        try:
            line = reader.read()
        except EOFError:
            if interactive:
                sys.stderr.write("\n")
            return
        except Terminated:
            raise
        except KeyboardInterrupt:
            notice("\n(use /bye or Ctrl-D to leave)")
            continue
        if not line.strip():
            continue
        try:
            if line.lstrip().startswith("/") and not line.lstrip().startswith("//"):
                outcome = handle_command(session, line.strip(), reopen)
                if outcome is False:
                    return
                if outcome is None or outcome is True:
                    continue
                reply = outcome
            else:
                reply = session.start(line)
            if reply.dropped_turns:
                notice(f"(the context is full: dropped the {reply.dropped_turns} oldest exchange(s))")
            try:
                completed = renderer.stream(reply)
            except Terminated:
                session.finish(reply)  # SIGTERM / SIGHUP: keep and log what was generated, then end
                raise
            session.finish(reply)
            if not completed:
                notice("(stopped)")
            elif session.last_result is not None and session.last_result.context_full:
                notice("(the answer filled the context)")
        except LlmrunError as error:
            notice(f"error: {error}")
