"""``llmrun bench``: prompt and generation speed like llama-bench, as a table, JSON, JSONL, CSV or Markdown."""

from __future__ import annotations

import csv
import io
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from llmrun.cli import options
from llmrun.cli.output import format_count, notice, print_json
from llmrun.errors import UsageError
from llmrun.settings import DEFAULT_DRAFT_MAX, get_settings

FORMATS = ("table", "json", "jsonl", "csv", "md")
CSV_FIELDS = (
    "build_commit", "cpu_info", "backends", "model_filename", "model_type", "model_size", "model_n_params",
    "n_batch", "n_ubatch", "n_threads", "type_k", "type_v", "n_gpu_layers", "flash_attn", "n_prompt", "n_gen",
    "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts",
)  # fmt: skip


def _ints(flag: str, text: str, minimum: int = 1) -> list[int]:
    """A llama-bench list: ``128,512``; empty means none."""
    if not text.strip():
        return []
    values = []
    for part in text.split(","):
        try:
            value = int(part)
        except ValueError:
            raise UsageError(
                f"{flag} takes whole numbers separated by commas, not {text!r}", f"e.g. {flag} 128,512"
            ) from None
        if value < minimum:
            raise UsageError(f"{flag} {value} must be at least {minimum}", f'to skip these tests, give {flag} ""')
        values.append(value)
    return values


def _pairs(text: str) -> list[tuple[int, int]]:
    if not text.strip():
        return []
    values = _ints("-pg", text)
    if len(values) % 2:
        raise UsageError(f"-pg takes pairs of prompt and generation lengths, not {text!r}", "e.g. -pg 512,128")
    return list(zip(values[::2], values[1::2], strict=True))


def _flags(text: str) -> list[bool | None]:
    mapping: dict[str, bool | None] = {"auto": None, "-1": None, "on": True, "1": True, "off": False, "0": False}
    try:
        return [mapping[part.strip().lower()] for part in text.split(",")]
    except KeyError:
        raise UsageError(f"-fa takes on, off or auto (or 1, 0), not {text!r}") from None


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.2f} MiB"


def _markdown(rows: list[dict[str, Any]], compare: dict[tuple[Any, ...], float] | None) -> str:
    """llama-bench's Markdown table: model, size, params, backend, threads, (what varies), test, t/s."""
    varying = [
        field
        for field in ("n_gpu_layers", "n_batch", "n_ubatch", "type_k", "type_v", "flash_attn")
        if len({row[field] for row in rows}) > 1
    ]
    headers = ["model", "size", "params", "backend", "threads", *varying, "test", "t/s"]
    if compare is not None:
        headers.append("vs before")
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---:" if h != "model" else "---" for h in headers) + " |",
    ]
    for row in rows:
        cells = [
            row["model_type"], _size(row["model_size"]), format_count(row["model_n_params"]), row["backends"],
            str(row["n_threads"]), *(str(row[field]) for field in varying), row["test"],
            f"{row['avg_ts']:.2f} ± {row['stddev_ts']:.2f}",
        ]  # fmt: skip
        if compare is not None:
            before = compare.get(_key(row))
            cells.append(f"{row['avg_ts'] / before:.3f}x" if before else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (Path(str(row["model_filename"])).name, row["n_prompt"], row["n_gen"], row["n_threads"])


def _load_compare(path: Path) -> dict[tuple[Any, ...], float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(
            f"cannot read {path} as a JSON bench result: {error}", "give a file written by -o json"
        ) from None
    rows = data if isinstance(data, list) else [data]
    return {_key(row): float(row["avg_ts"]) for row in rows if isinstance(row, dict) and "avg_ts" in row}


def _emit(rows: list[dict[str, Any]], output: str, compare: dict[tuple[Any, ...], float] | None) -> None:
    if compare is not None:
        for row in rows:
            before = compare.get(_key(row))
            row["compare_ratio"] = row["avg_ts"] / before if before else None
    if output == "csv":
        fields = [*CSV_FIELDS, *(["compare_ratio"] if compare else [])]
        rows = [{field: row.get(field) for field in fields} for row in rows]
    _write_rows(rows, output, _markdown(rows, compare) if output not in ("json", "jsonl", "csv") else "")


def _load_markdown(rows: list[dict[str, Any]]) -> str:
    headers = ["concurrency", "requests", "errors", "tok/s", "req/s", "TTFT p50/p95/p99 ms", "ITL p50/p95/p99 ms"]
    lines = ["| " + " | ".join(headers) + " |", "|" + " ---: |" * len(headers)]
    for row in rows:
        lines.append(
            f"| {row['concurrency']} | {row['requests']} | {row['errors']} | {row['tokens_per_s']:.2f} | "
            f"{row['requests_per_s']:.2f} | "
            f"{row['ttft_p50_ms']:.0f} / {row['ttft_p95_ms']:.0f} / {row['ttft_p99_ms']:.0f} | "
            f"{row['itl_p50_ms']:.1f} / {row['itl_p95_ms']:.1f} / {row['itl_p99_ms']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path, load: bool) -> None:
    """Tokens/s against concurrency (load) or threads (models), one line per series."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib", "pip install 'llmrun[plot]'") from None
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if load:
            series.setdefault(row["model"], []).append((row["concurrency"], row["tokens_per_s"]))
        else:
            series.setdefault(f"{row['model_type']} {row['test']}", []).append((row["n_threads"], row["avg_ts"]))
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        points.sort()
        axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    axes.set_xlabel("concurrent requests" if load else "threads")
    axes.set_ylabel("tokens/s")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    notice(f"plot written to {path}")


def _write_rows(rows: list[dict[str, Any]], output: str, markdown: str) -> None:
    if output == "json":
        print_json(rows)
    elif output == "jsonl":
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
    elif output == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        sys.stdout.write(buffer.getvalue())
    elif output == "md" or not sys.stdout.isatty():
        sys.stdout.write(markdown)
    else:
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown(markdown))


def _run_with_progress(work: Any) -> Any:
    """Run ``work(progress)``; on a terminal, ``progress`` rewrites one status line on stderr.

    No spinner thread: a thread waking up during a measurement takes the GIL between
    llama_decode calls and slows small models down many times over.
    """
    if not sys.stderr.isatty():
        return work(None)

    def show(text: str) -> None:
        sys.stderr.write(f"\r\x1b[2K{text}")
        sys.stderr.flush()

    try:
        return work(show)
    finally:
        sys.stderr.write("\r\x1b[2K")
        sys.stderr.flush()


def _bench_server(
    server: str, model: str | None, concurrency: str, requests: int | None, max_tokens: int, api_key: str | None,
    output: str, plot: Path | None,
) -> None:  # fmt: skip
    from llmrun.loadtest import api_base, first_model, run_load

    base = api_base(server)
    levels = _ints("-c", concurrency)
    model_id = model or first_model(base, api_key)
    rows = []
    for level in levels:
        if sys.stderr.isatty():
            notice(f"{level} concurrent request(s) against {base}")
        rows.append(run_load(base, model_id, level, requests or 4 * level, max_tokens, api_key=api_key).to_dict())
    _write_rows(rows, output, _load_markdown(rows))
    if plot is not None:
        _plot(rows, plot, load=True)


def bench_command(
    models: Annotated[
        list[str] | None,
        typer.Argument(help="Models to measure (names, paths or Hub references).", metavar="[MODEL]..."),
    ] = None,
    n_prompt: Annotated[str, typer.Option("-p", "--n-prompt", help="Prompt lengths, comma-separated.")] = "512",
    n_gen: Annotated[str, typer.Option("-n", "--n-gen", help="Generation lengths, comma-separated.")] = "128",
    prompt_gen: Annotated[str, typer.Option("-pg", help="Prompt and generation together: pp,tg pairs.")] = "",
    repetitions: Annotated[
        int, typer.Option("-r", "--repetitions", min=1, help="Runs of each test, after a warm-up.")
    ] = 5,
    threads: Annotated[str, typer.Option("-t", "--threads", help="Thread counts [default: physical cores].")] = "",
    gpu_layers: Annotated[
        str, typer.Option("-ngl", "--n-gpu-layers", help="GPU layer counts [default: all on GPU builds].")
    ] = "",
    batch: Annotated[str, typer.Option("-b", "--batch-size", help="Logical batch sizes.")] = "2048",
    ubatch: Annotated[str, typer.Option("-ub", "--ubatch-size", help="Physical batch sizes.")] = "512",
    cache_type_k: Annotated[
        str, typer.Option("--ctk", "--cache-type-k", help="KV cache key types (f16, q8_0, q4_0...).")
    ] = "f16",
    cache_type_v: Annotated[str, typer.Option("--ctv", "--cache-type-v", help="KV cache value types.")] = "f16",
    flash_attn: Annotated[str, typer.Option("-fa", "--flash-attn", help="Flash attention: on, off or auto.")] = "auto",
    output: Annotated[str, typer.Option("-o", "--output", help="table, json, jsonl, csv or md.")] = "table",
    compare: Annotated[
        Path | None, typer.Option("--compare", help="A JSON result to compare with (ratio column).")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Draw tokens/s against threads or concurrency into a PNG.")
    ] = None,
    server: Annotated[
        str | None, typer.Option("--server", help="Load-test this OpenAI-compatible server instead.")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="With --server: the model to ask for [default: its first].")
    ] = None,
    concurrency: Annotated[
        str, typer.Option("-c", "--concurrency", help="With --server: concurrent requests.")
    ] = "1,2,4",
    requests: Annotated[
        int | None,
        typer.Option("--requests", min=1, help="With --server: requests per level [default: 4 x concurrency]."),
    ] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", help="With --server: a bearer token.")] = None,
    lookup: Annotated[
        bool, typer.Option("--lookup", help="Also measure generation copying a block of code, plain and with --lookup.")
    ] = False,
    draft: Annotated[
        str | None,
        typer.Option(
            "--draft",
            help="Also measure generation copying a block of code, plain and with this draft model.",
            show_default=False,
            metavar="MODEL",
        ),
    ] = None,
    draft_max: options.DraftMax = DEFAULT_DRAFT_MAX,
    draft_min: options.DraftMin = 0,
    rpc: options.Rpc = None,
    no_pull: options.NoPull = False,
) -> None:
    """Measure prompt (pp) and generation (tg) speed like llama-bench, or load-test a server (--server)."""
    if output not in FORMATS:
        raise UsageError(f"unknown output format {output!r}", f"use one of {', '.join(FORMATS)}")
    if server is not None:
        if models:
            raise UsageError("give either models or --server, not both", "llmrun bench --server URL --model NAME")
        lengths = _ints("-n", n_gen)
        _bench_server(server, model, concurrency, requests, lengths[0] if lengths else 128, api_key, output, plot)
        return
    if not models:
        raise UsageError("no model to measure", "llmrun bench MODEL, or llmrun bench --server URL")
    from llmrun.bench import BenchTest, run_benchmarks
    from llmrun.machine import physical_cores

    shapes = [(p, 0) for p in _ints("-p", n_prompt)] + [(0, n) for n in _ints("-n", n_gen)] + _pairs(prompt_gen)
    if not shapes:
        raise UsageError("nothing to measure: -p, -n and -pg are all empty", "e.g. -p 512 -n 128")
    settings = get_settings()
    thread_counts = _ints("-t", threads) or [settings.threads or physical_cores()]
    layer_counts: list[int | str] = list(_ints("-ngl", gpu_layers, minimum=0)) or ["auto"]
    previous = _load_compare(compare) if compare is not None else None
    tests = [
        BenchTest(p, n, t, layers if isinstance(layers, int) else -1, b, ub, ctk, ctv, fa)
        for (p, n), t, layers, b, ub, ctk, ctv, fa in itertools.product(
            shapes, thread_counts, layer_counts, _ints("-b", batch), _ints("-ub", ubatch),
            cache_type_k.split(","), cache_type_v.split(","), _flags(flash_attn),
        )
    ]  # fmt: skip
    speculation = options.speculation_options(lookup, draft, draft_max, draft_min, no_pull)
    if speculation.enabled:
        copies = [replace(test, n_prompt=0, speculation=kind) for test in tests if test.n_gen and not test.n_prompt
                  for kind in ("plain", speculation.method)]  # fmt: skip
        if not copies:
            raise UsageError("--lookup and --draft measure generation, and no -n is given", "e.g. -n 128")
        tests += copies
    resolved = [options.resolve(model, no_pull) for model in models]
    rows = _run_with_progress(lambda progress: list(
        run_benchmarks([(r.name, r.path) for r in resolved], tests, repetitions, progress, speculation,
                       options.rpc_endpoints(rpc))
    ))  # fmt: skip
    _emit(rows, output, previous)
    if plot is not None:
        _plot(rows, plot, load=False)
