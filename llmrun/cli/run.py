"""``llmrun run``: one answer, streamed to stdout; stdin joins the prompt in a pipe."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from llmrun.cli import options
from llmrun.cli.output import notice, print_json, stdin_is_tty
from llmrun.errors import ExitCode, UsageError
from llmrun.settings import (
    DEFAULT_MIN_P,
    DEFAULT_REPEAT_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    get_settings,
)

if TYPE_CHECKING:
    from llmrun.engine import Engine, Generation, GenerationRequest, GenerationResult


def read_prompt(words: list[str]) -> str:
    """The prompt words, after piped stdin when there is any (``git diff | llmrun run m "Summarise"``)."""
    prompt = " ".join(words).strip()
    piped = "" if stdin_is_tty() else sys.stdin.read().strip()
    text = "\n\n".join(part for part in (piped, prompt) if part)
    if not text:
        raise UsageError("no prompt given", 'pass it as an argument (llmrun run MODEL "question") or pipe it on stdin')
    return text


def _stream(generation: Generation) -> None:
    """Write text to stdout as it comes."""
    for piece in generation:
        sys.stdout.write(piece)
        sys.stdout.flush()


def _report(engine: Engine, generation: Generation, model_name: str, verbose: bool, json_output: bool) -> None:
    result = generation.result
    if json_output:
        print_json(
            {
                "model": model_name,
                "text": result.text,
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "context_size": engine.seq_capacity,
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
        notice(f"stopped: the context of {engine.seq_capacity} tokens is full (raise it with --ctx)")
    if verbose:
        notice(
            f"prompt {result.prompt_tokens} tokens in {result.time_to_first_token_s:.3f} s "
            f"({result.prompt_tokens_per_s:.1f} tokens/s); generation {result.completion_tokens} tokens in "
            f"{result.generation_s:.3f} s ({result.generation_tokens_per_s:.1f} tokens/s); "
            f"finish: {result.finish_reason}"
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
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object: text, token counts, timings.")
    ] = False,
    no_pull: options.NoPull = False,
    no_log: Annotated[bool, typer.Option("--no-log", help="Do not log this exchange.")] = False,
    verbose: options.Verbose = False,
) -> None:
    """Answer one prompt, streaming the answer to stdout."""
    resolved = options.resolve(model, no_pull)
    text = read_prompt(prompt or [])

    from llmrun.engine import GenerationRequest

    with options.open_engine(resolved, ctx, threads, gpu_layers, verbose) as engine:
        if verbose and not raw and not engine.model.chat_template:
            notice("the model has no chat template: sending the prompt as plain text")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        prompt_tokens = (
            engine.raw_prompt("\n\n".join(m["content"] for m in messages)) if raw else engine.chat_prompt(messages)
        )
        request = GenerationRequest(
            prompt_tokens=tuple(prompt_tokens),
            sampling=options.sampling_params(temperature, top_p, top_k, min_p, repeat_penalty, seed),
            max_tokens=max_tokens,
            stop=tuple(stop or ()),
            ignore_eos=ignore_eos,
        )
        result = _generate(engine, request, resolved.name, verbose=verbose, json_output=json_output)
        if not (no_log or get_settings().no_log):
            _log(resolved.name, text, system, request, result)


def _log(
    model_name: str, prompt: str, system: str | None, request: GenerationRequest, result: GenerationResult
) -> None:
    """Every `run` is a one-exchange conversation in the log."""
    from llmrun.logs import Exchange, LogStore

    store = LogStore(get_settings().logs_path)
    exchange = Exchange.of(model_name, prompt, system, request.sampling, request.max_tokens, result)
    store.log(store.new_conversation(model_name), exchange)


def _generate(
    engine: Engine, request: GenerationRequest, model_name: str, *, verbose: bool, json_output: bool
) -> GenerationResult:
    generation = engine.generate(request)
    interrupted = False
    try:
        if json_output:
            for _ in generation:
                pass
        else:
            _stream(generation)
    except KeyboardInterrupt:
        interrupted = True
    except BrokenPipeError:
        # The reader went away (`llmrun run ... | head -1`): it has all it wanted, so stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(ExitCode.OK) from None
    text = generation.result.text
    if not json_output and text and not text.endswith("\n"):
        sys.stdout.write("\n")
        sys.stdout.flush()
    _report(engine, generation, model_name, verbose, json_output)
    if interrupted:
        raise typer.Exit(ExitCode.INTERRUPTED)
    return generation.result
