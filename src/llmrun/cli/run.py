"""``llmrun run``: one answer, streamed to stdout; stdin joins the prompt in a pipe."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from llmrun.cli.output import notice, print_json, stdin_is_tty
from llmrun.errors import ExitCode, UsageError
from llmrun.settings import env_flag, get_settings

if TYPE_CHECKING:
    from llmrun.engine import Engine, Generation, GenerationRequest


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
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Send the text as a plain completion, without the chat template.")
    ] = False,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0 is greedy.")] = 0.8,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="0 disables.")] = 40,
    min_p: Annotated[float, typer.Option("--min-p", min=0.0, max=1.0)] = 0.05,
    repeat_penalty: Annotated[float, typer.Option("--repeat-penalty", min=0.0, help="1.0 disables.")] = 1.1,
    seed: Annotated[
        int | None, typer.Option("--seed", min=0, max=2**32 - 2, help="For repeatable sampling [default: random].")
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", "-n", min=1, help="Stop after this many tokens [default: no limit]."),
    ] = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop at this text (repeatable); it is not printed.")
    ] = None,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Keep generating past the end-of-text token (for benchmarks).")
    ] = False,
    ctx: Annotated[
        int | None,
        typer.Option(
            "--ctx", "-c", min=16, help="Context size in tokens [default: the model's, capped to fit memory]."
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="CPU threads [default: physical cores].")
    ] = None,
    gpu_layers: Annotated[
        str | None,
        typer.Option("--gpu-layers", "-ngl", help="Layers on the GPU: a number, or auto [default: auto]."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object: text, token counts, timings.")
    ] = False,
    no_pull: Annotated[
        bool, typer.Option("--no-pull", help="Fail instead of pulling a catalog or Hub model that is not here yet.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Say what was loaded and how fast it ran, on stderr.")
    ] = False,
) -> None:
    """Answer one prompt, streaming the answer to stdout."""
    from llmrun.cli.models import pull_options
    from llmrun.models import resolve_or_pull
    from llmrun.store import Store

    settings = get_settings()
    offline = env_flag(os.environ.get("HF_HUB_OFFLINE"))
    resolved = resolve_or_pull(Store(settings.home), model, None if no_pull or offline else pull_options())
    text = read_prompt(prompt or [])

    from llmrun.engine import Engine, GenerationRequest, LoadOptions, SamplingParams

    options = LoadOptions(
        n_ctx=ctx,
        n_threads=threads or settings.threads,
        gpu_layers=gpu_layers or settings.gpu_layers,
        debug=settings.debug,
    )
    with Engine(resolved.path, options) as engine:
        if verbose:
            notice(
                f"loaded {resolved.name} ({engine.model.description}) from {resolved.path}; "
                f"{engine.context_choice.reason}; {engine.n_threads} threads; {engine.model.n_gpu_layers} GPU layers"
            )
            if not raw and not engine.model.chat_template:
                notice("the model has no chat template: sending the prompt as plain text")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        prompt_tokens = (
            engine.raw_prompt("\n\n".join(m["content"] for m in messages)) if raw else engine.chat_prompt(messages)
        )
        request = GenerationRequest(
            prompt_tokens=tuple(prompt_tokens),
            sampling=SamplingParams(
                temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed
            ),
            max_tokens=max_tokens,
            stop=tuple(stop or ()),
            ignore_eos=ignore_eos,
        )
        _generate(engine, request, resolved.name, verbose=verbose, json_output=json_output)


def _generate(engine: Engine, request: GenerationRequest, model_name: str, *, verbose: bool, json_output: bool) -> None:
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


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
