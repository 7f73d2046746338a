"""``llmrun run``: one answer, streamed to stdout; stdin joins the prompt in a pipe."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

from llmrun.cli import options
from llmrun.cli.output import notice, print_json, stdin_is_tty
from llmrun.errors import ExitCode, UsageError
from llmrun.reasoning import CONTENT, REASONING, ReasoningFormat
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
    from llmrun.client import Ask, ServerClient
    from llmrun.generation import GenerationResult, SamplingParams


def read_prompt(words: list[str]) -> str:
    """The prompt words, after piped stdin when there is any (``git diff | llmrun run m "Summarise"``)."""
    prompt = " ".join(words).strip()
    piped = "" if stdin_is_tty() else sys.stdin.read().strip()
    text = "\n\n".join(part for part in (piped, prompt) if part)
    if not text:
        raise UsageError("no prompt given", 'pass it as an argument (llmrun run MODEL "question") or pipe it on stdin')
    return text


def read_schema(value: str) -> dict[str, Any]:
    """``--schema``: a JSON schema in a file, or written inline."""
    import json
    from pathlib import Path

    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise UsageError(f"--schema {value!r} is neither a file nor a JSON object", "give a schema file or JSON")
        text = path.read_text(encoding="utf-8", errors="replace")
    try:
        schema = json.loads(text)
    except ValueError as error:
        raise UsageError(f"--schema is not valid JSON: {error}", "check the schema's syntax") from None
    if not isinstance(schema, dict):
        raise UsageError("--schema must be a JSON object", 'give a schema such as {"type": "object"}')
    return schema


class _Answer:
    """Splits a reasoning model's thinking from its answer: the answer to stdout, the thinking to stderr
    (dimmed on a terminal) with --think, or nowhere."""

    def __init__(self, fmt: ReasoningFormat | None, inside: bool, show_thinking: bool) -> None:
        self.splitter = fmt.splitter(inside) if fmt is not None else None
        self.show_thinking = show_thinking
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self._dim = show_thinking and sys.stderr.isatty() and not os.environ.get("NO_COLOR")
        self._thought = False

    def feed(self, piece: str, write: bool, kind: str | None = None) -> None:
        """A piece of output; ``kind`` when it is known already (a server splits thinking itself)."""
        if kind is not None:
            self._emit(kind, piece, write)
            return
        pieces = [(CONTENT, piece)] if self.splitter is None else self.splitter.feed(piece)
        for part_kind, text in pieces:
            self._emit(part_kind, text, write)

    def finish(self, write: bool) -> None:
        if self.splitter is not None:
            for kind, text in self.splitter.finish():
                self._emit(kind, text, write)
        if self._thought:
            sys.stderr.write("\n")
            self._thought = False

    def _emit(self, kind: str, text: str, write: bool) -> None:
        if kind == REASONING:
            self.reasoning.append(text)
            if write and self.show_thinking:
                sys.stderr.write(f"\x1b[2m{text}\x1b[0m" if self._dim else text)
                sys.stderr.flush()
                self._thought = True
            return
        if self._thought:  # the thinking ends its line before the answer begins
            sys.stderr.write("\n")
            self._thought = False
        self.text.append(text)
        if write:
            sys.stdout.write(text)
            sys.stdout.flush()


@dataclass(frozen=True)
class _Source:
    """What produced an answer, for its report: the model's name, its context, how it speculated."""

    model_name: str
    context_size: int | None
    speculation: str | None = None  # lookup, draft, or server (guesses a server reports); None: off
    on_server: bool = False


def _report(result: GenerationResult, answer: _Answer, source: _Source, verbose: bool, json_output: bool) -> None:
    if json_output:
        reasoning = {"reasoning": "".join(answer.reasoning)} if answer.reasoning else {}
        print_json(
            {
                "model": source.model_name,
                "text": "".join(answer.text),
                **reasoning,
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "context_size": source.context_size,
                **_speculation_record(source, result),
                "timings": {
                    "time_to_first_token_s": round(result.time_to_first_token_s, 6),
                    "prompt_tokens_per_s": round(result.prompt_tokens_per_s, 3),
                    "generation_s": round(result.generation_s, 6),
                    "generation_tokens_per_s": round(result.generation_tokens_per_s, 3),
                    "total_s": round(result.total_s, 6),
                },
            }
        )
    if result.context_full:
        size = f" of {source.context_size} tokens" if source.context_size else ""
        option = "the server's --ctx" if source.on_server else "--ctx"
        notice(f"stopped: the context{size} is full (raise it with {option})")
    if verbose:
        notice(
            f"prompt {result.prompt_tokens} tokens in {result.time_to_first_token_s:.3f} s "
            f"({result.prompt_tokens_per_s:.1f} tokens/s); generation {result.completion_tokens} tokens in "
            f"{result.generation_s:.3f} s ({result.generation_tokens_per_s:.1f} tokens/s); "
            f"finish: {result.finish_reason}"
            + (f"; {_speculation_summary(source, result)}" if source.speculation else "")
        )


def _speculation_record(source: _Source, result: GenerationResult) -> dict[str, Any]:
    if not source.speculation:
        return {}
    acceptance = result.accepted_tokens / result.drafted_tokens if result.drafted_tokens else 0.0
    return {
        "speculation": {
            "method": source.speculation,
            "drafted_tokens": result.drafted_tokens,
            "accepted_tokens": result.accepted_tokens,
            "acceptance_rate": round(acceptance, 4),
        }
    }


def _speculation_summary(source: _Source, result: GenerationResult) -> str:
    method = source.speculation
    if not result.drafted_tokens:
        return f"{method}: no guess was worth checking"
    return (
        f"{method}: {result.accepted_tokens} of {result.drafted_tokens} guessed tokens right "
        f"({100 * result.accepted_tokens / result.drafted_tokens:.0f}%)"
    )


def run_command(
    model: Annotated[
        str,
        typer.Argument(
            help="A model name from `llmrun list`, or a path to a .gguf file.", show_default=False, metavar="MODEL"
        ),
    ],
    prompt: Annotated[
        list[str] | None,
        typer.Argument(help="The prompt; piped stdin is put before it.", show_default=False, metavar="[PROMPT]..."),
    ] = None,
    system: options.System = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Send the text as a plain completion, without the chat template.")
    ] = False,
    temperature: options.Temperature = DEFAULT_TEMPERATURE,
    top_p: options.TopP = DEFAULT_TOP_P,
    top_k: options.TopK = DEFAULT_TOP_K,
    min_p: options.MinP = DEFAULT_MIN_P,
    repeat_penalty: options.RepeatPenalty = DEFAULT_REPEAT_PENALTY,
    seed: options.Seed = None,
    max_tokens: options.MaxTokens = None,
    stop: options.Stop = None,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Keep generating past the end-of-text token (for benchmarks).")
    ] = False,
    ctx: options.Ctx = None,
    threads: options.Threads = None,
    gpu_layers: options.GpuLayers = None,
    lookup: options.Lookup = False,
    draft: options.Draft = None,
    draft_max: options.DraftMax = DEFAULT_DRAFT_MAX,
    draft_min: options.DraftMin = 0,
    cache_type_k: options.CacheTypeK = "f16",
    cache_type_v: options.CacheTypeV = "f16",
    rpc: options.Rpc = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object: text, token counts, timings.")
    ] = False,
    schema: Annotated[
        str | None,
        typer.Option(
            "--schema",
            help="Answer in JSON matching this JSON schema (a file, or the JSON itself).",
            show_default=False,
            metavar="FILE|JSON",
        ),
    ] = None,
    output_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="json: answer with a JSON object (as Ollama's --format json).",
            show_default=False,
            metavar="json",
        ),
    ] = None,
    think: Annotated[
        bool | None,
        typer.Option(
            "--think/--no-think",
            help="A reasoning model's thinking: show it (on stderr), or ask the "
            "model not to think. By default it thinks and only the answer is printed.",
            show_default=False,
        ),
    ] = None,
    server: options.Server = None,
    no_pull: options.NoPull = False,
    no_log: Annotated[bool, typer.Option("--no-log", help="Do not log this exchange.")] = False,
    verbose: options.Verbose = False,
) -> None:
    """Answer one prompt, streaming the answer to stdout."""
    if output_format is not None and output_format != "json":
        raise UsageError(f"--format {output_format!r} is not known", "use --format json, or --schema for a shape")
    json_schema = read_schema(schema) if schema is not None else None
    logging = not (no_log or get_settings().no_log)
    cache_types = (cache_type_k, cache_type_v)
    workers = options.rpc_endpoints(rpc)
    local_only = options.local_only_options(ctx, threads, gpu_layers, lookup, draft, cache_types, rpc)
    client = options.server_client(server, model, local_only, verbose, logging)
    if client is not None:
        from llmrun.client import Ask

        sampling = options.sampling_params(temperature, top_p, top_k, min_p, repeat_penalty, seed)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": read_prompt(prompt or [])}
        ]
        ask = Ask(model, messages, sampling, max_tokens, tuple(stop or ()), ignore_eos, raw, json_schema,
                  output_format == "json", think)  # fmt: skip
        _run_on_server(client, ask, bool(think), no_pull, logging, verbose, json_output)
        return
    resolved = options.resolve(model, no_pull)
    text = read_prompt(prompt or [])

    from dataclasses import replace

    from llmrun.engine import GenerationRequest
    from llmrun.engine.sampling import check_grammar, json_schema_grammar
    from llmrun.reasoning import reasoning_format

    speculation = options.speculation_options(lookup, draft, draft_max, draft_min, no_pull)
    with options.open_engine(resolved, ctx, threads, gpu_layers, verbose, speculation, cache_types, workers) as engine:
        if verbose and not raw and not engine.model.chat_template:
            notice("the model has no chat template: sending the prompt as plain text")
        sampling = options.sampling_params(temperature, top_p, top_k, min_p, repeat_penalty, seed)
        constrained = json_schema is not None or output_format == "json"
        if constrained:
            sampling = replace(sampling, grammar=json_schema_grammar(json_schema))
            check_grammar(engine.model.vocab, sampling.grammar or "")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        fmt, inside = None, False
        if raw:
            prompt_tokens = engine.raw_prompt("\n\n".join(m["content"] for m in messages))
        else:
            # A JSON answer from the first token leaves no room to think.
            fmt = reasoning_format(engine.model.chat_template)
            wanted = False if constrained and fmt is not None else think
            chat = engine.chat_text(messages, None, **(fmt.template_options(wanted) if fmt is not None else {}))
            prompt_tokens = engine.chat_tokens(chat)
            if fmt is not None and constrained:
                fmt = None  # a JSON answer from the first token: nothing to split
            elif fmt is not None:
                inside = fmt.opened_in_prompt(chat.text)
        request = GenerationRequest(
            prompt_tokens=tuple(prompt_tokens),
            sampling=sampling,
            max_tokens=max_tokens,
            stop=tuple(stop or ()),
            ignore_eos=ignore_eos,
        )
        answer = _Answer(fmt, inside, show_thinking=bool(think))
        generation = engine.generate(request)
        interruption = _stream(((None, piece) for piece in generation), answer, json_output)
        source = _Source(resolved.name, engine.seq_capacity, engine.speculation.method if engine.speculation.enabled
                         else None)  # fmt: skip
        _report(generation.result, answer, source, verbose, json_output)
        if logging:  # an interrupted answer is logged as far as it got
            _log(resolved.name, text, system, request.sampling, max_tokens, replace(generation.result,
                 text="".join(answer.text)))  # fmt: skip
    if interruption is not None:
        raise typer.Exit(ExitCode.INTERRUPTED)  # 143 / 129 after SIGTERM / SIGHUP: main knows which


def _run_on_server(
    client: ServerClient, ask: Ask, show_thinking: bool, no_pull: bool, logging: bool, verbose: bool,
    json_output: bool,
) -> None:  # fmt: skip
    """``run --server``: the same answer on stdout, record, log and exit codes as in-process; a model the server
    lacks is pulled there first (unless --no-pull), as `run` pulls one here."""
    from dataclasses import replace

    from llmrun.errors import ModelNotFound

    try:
        generation = client.ask(ask)
    except ModelNotFound:
        if no_pull or not client.pull(ask.model, lambda status: notice(f"{client.root}: {status}")):
            raise
        generation = client.ask(ask)
    answer = _Answer(None, False, show_thinking)
    interruption = _stream(generation, answer, json_output)
    result = replace(generation.result, text="".join(answer.text))
    source = _Source(
        generation.model_name,
        client.context_length(generation.model_name) if json_output or result.context_full else None,
        "server" if result.drafted_tokens else None,
        on_server=True,
    )
    _report(result, answer, source, verbose, json_output)
    if logging:
        user = ask.messages[-1]["content"]
        system = ask.messages[0]["content"] if len(ask.messages) > 1 else None
        _log(generation.model_name, user, system, ask.sampling, ask.max_tokens, result)
    if interruption is not None:
        raise typer.Exit(ExitCode.INTERRUPTED)


def _log(
    model_name: str, prompt: str, system: str | None, sampling: SamplingParams, max_tokens: int | None,
    result: GenerationResult,
) -> None:  # fmt: skip
    """Every `run` is a one-exchange conversation in the log."""
    from llmrun.logs import Exchange, LogStore

    store = LogStore(get_settings().logs_path)
    exchange = Exchange.of(model_name, prompt, system, sampling, max_tokens, result)
    store.log(store.new_conversation(model_name), exchange)


def _stream(pieces: Iterable[tuple[str | None, str]], answer: _Answer, json_output: bool) -> KeyboardInterrupt | None:
    """Stream the answer; Ctrl-C, SIGTERM or SIGHUP stops it, keeping what was generated (the interruption is
    returned, for the caller to report and log before it exits)."""
    interruption: KeyboardInterrupt | None = None
    try:
        for kind, piece in pieces:
            answer.feed(piece, write=not json_output, kind=kind)
        answer.finish(write=not json_output)
    except KeyboardInterrupt as error:
        interruption = error
    except BrokenPipeError:
        # The reader went away (`llmrun run ... | head -1`): it has all it wanted, so stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(ExitCode.OK) from None
    text = "".join(answer.text)
    if not text and answer.reasoning and not answer.show_thinking and not json_output:
        notice("the model only thought, and gave no answer: see its thinking with --think, or allow more --max-tokens")
    if not json_output and text and not text.endswith("\n"):
        sys.stdout.write("\n")
        sys.stdout.flush()
    return interruption
