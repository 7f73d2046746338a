"""Prompt-processing and generation speed, measured the way llama-bench measures it.

For each test: a context of ``n_prompt + n_gen`` tokens; one warm-up (the whole prompt,
one generated token); then ``repetitions`` runs, each from an empty KV cache: ``n_prompt``
random tokens in batches of ``n_batch`` and/or ``n_gen`` single-token decodes, timed from
the first decode to the end of the last. Rows carry llama-bench's own field names, so a
result diffs directly against ``llama-bench -o json``.

With speculative decoding (``--lookup``, ``--draft``), each generation length also gets two
tests that random tokens cannot show: greedy generation of ``n_gen`` tokens that copy a
fixed block of code (an answer that quotes its input, where guessing pays), plainly
(``tg128 copy``) and speculating (``tg128 copy+lookup``), timed from the first generated
token to the last.
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmrun import __version__

if TYPE_CHECKING:
    from llmrun.engine.speculation import SpeculationOptions


@dataclass(frozen=True)
class BenchTest:
    """One measurement: a prompt of ``n_prompt`` tokens, ``n_gen`` generated, or both (``-pg``)."""

    n_prompt: int
    n_gen: int
    n_threads: int
    n_gpu_layers: int
    n_batch: int
    n_ubatch: int
    type_k: str
    type_v: str
    flash_attn: bool | None
    # "": llama-bench's test. "plain", "lookup", "draft": generate copying COPY_TEXT, speculating or not.
    speculation: str = ""

    @property
    def name(self) -> str:
        if self.speculation:
            return f"tg{self.n_gen} copy" + ("" if self.speculation == "plain" else f"+{self.speculation}")
        if self.n_prompt and self.n_gen:
            return f"pp{self.n_prompt}+tg{self.n_gen}"
        return f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"


def _binding_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def _cpu_info() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _random_tokens(engine: Any, count: int, first: bool) -> list[int]:
    model = engine.model
    tokens = [random.randrange(model.n_vocab) for _ in range(count)]
    if first and tokens and model.add_bos:
        tokens[0] = model.bos_token
    return tokens


def _prompt(engine: Any, n_prompt: int, n_batch: int) -> None:
    done = 0
    while done < n_prompt:
        count = min(n_batch, n_prompt - done)
        engine.decode(_random_tokens(engine, count, first=done == 0))
        done += count
    engine.synchronize()


def _generate(engine: Any, n_gen: int) -> None:
    model = engine.model
    token = model.bos_token if model.add_bos else random.randrange(model.n_vocab)
    for _ in range(n_gen):
        engine.decode([token])
        engine.synchronize()
        token = random.randrange(model.n_vocab)


COPY_TEXT = '''def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge overlapping closed intervals; the result is sorted by start."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            previous_start, previous_end = merged[-1]
            merged[-1] = (previous_start, max(previous_end, end))
        else:
            merged.append((start, end))
    return merged


def total_covered(intervals: list[tuple[int, int]]) -> int:
    """How many integer points the intervals cover together."""
    return sum(end - start + 1 for start, end in merge_intervals(intervals))'''


def _copy_prompt(engine: Any) -> list[int]:
    messages = [{"role": "system", "content": "You copy text exactly."}, {"role": "user", "content": COPY_TEXT}]
    return list(engine.chat_prompt(messages))


def run_copy_test(engine: Any, test: BenchTest, repetitions: int) -> tuple[list[int], dict[str, Any]]:
    """Nanoseconds of each repetition's ``n_gen`` tokens copying COPY_TEXT (greedy, past its end if need be),
    and what was guessed."""
    from llmrun.engine import GenerationRequest, SamplingParams

    prompt = tuple(_copy_prompt(engine))
    request = GenerationRequest(prompt, SamplingParams(temperature=0, repeat_penalty=1.0), test.n_gen, ignore_eos=True)
    samples, drafted, accepted = [], 0, 0
    for repetition in range(repetitions + 1):  # the first warms up
        engine.clear_memory()
        generation = engine.generate(request)
        for _ in generation:
            pass
        result = generation.result
        if repetition:
            # The first token comes with the prompt: the rest took generation_s. Scaled to n_gen tokens.
            samples.append(int(result.generation_s * 1e9 * test.n_gen / max(result.completion_tokens - 1, 1)))
            drafted += result.drafted_tokens
            accepted += result.accepted_tokens
    return samples, {"method": test.speculation, "drafted_tokens": drafted, "accepted_tokens": accepted}


def run_test(engine: Any, test: BenchTest, repetitions: int, warmup: bool = True) -> list[int]:
    """Nanoseconds of each repetition."""
    if warmup:
        engine.clear_memory()
        if test.n_prompt:
            _prompt(engine, test.n_prompt, test.n_batch)
        if test.n_gen:
            _generate(engine, 1)
    samples = []
    for _ in range(repetitions):
        engine.clear_memory()
        start = time.perf_counter_ns()
        if test.n_prompt:
            _prompt(engine, test.n_prompt, test.n_batch)
        if test.n_gen:
            _generate(engine, test.n_gen)
        samples.append(time.perf_counter_ns() - start)
    return samples


def row(model_path: Path, info: dict[str, Any], test: BenchTest, samples_ns: list[int], backend: str) -> dict[str, Any]:
    """A result with llama-bench's field names (and its units: model_size in bytes, times in ns)."""
    tokens = test.n_prompt + test.n_gen
    samples_ts = [tokens * 1e9 / ns for ns in samples_ns]
    return {
        # llama-bench records llama.cpp's git commit; the Python binding pins it through its own version.
        "build_commit": f"llama-cpp-python {_binding_version()}",
        "build_number": 0,
        "llmrun_version": __version__,
        "cpu_info": _cpu_info(),
        "gpu_info": "",
        "backends": backend,
        "model_filename": str(model_path),
        "model_type": info["model_type"],
        "model_size": info["model_size"],
        "model_n_params": info["model_n_params"],
        "n_batch": test.n_batch,
        "n_ubatch": test.n_ubatch,
        "n_threads": test.n_threads,
        "type_k": test.type_k,
        "type_v": test.type_v,
        "n_gpu_layers": test.n_gpu_layers,
        "flash_attn": {None: -1, False: 0, True: 1}[test.flash_attn],
        "n_prompt": test.n_prompt,
        "n_gen": test.n_gen,
        "n_depth": 0,
        "test_time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "avg_ns": int(statistics.mean(samples_ns)),
        "stddev_ns": int(statistics.stdev(samples_ns)) if len(samples_ns) > 1 else 0,
        "avg_ts": statistics.mean(samples_ts),
        "stddev_ts": statistics.stdev(samples_ts) if len(samples_ts) > 1 else 0.0,
        "samples_ns": samples_ns,
        "samples_ts": samples_ts,
        "test": test.name,
    }


ProgressCallback = Callable[[str], None]


def run_benchmarks(
    models: list[tuple[str, Path]],
    tests: list[BenchTest],
    repetitions: int,
    progress: ProgressCallback | None = None,
    speculation: SpeculationOptions | None = None,
    rpc: tuple[str, ...] = (),
) -> Iterator[dict[str, Any]]:
    """Every test on every model; an engine is loaded per model and resource setting. ``speculation`` is
    used by the tests that speculate."""
    from llmrun.engine import Engine, LoadOptions
    from llmrun.engine.native import supports_gpu_offload
    from llmrun.engine.speculation import SpeculationOptions

    backend = "RPC" if rpc else "GPU" if supports_gpu_offload() else "CPU"
    for name, path in models:
        for test in tests:
            if progress:
                progress(f"{name}: {test.name}, {test.n_threads} threads, {repetitions} runs")
            speculating = test.speculation not in ("", "plain")
            options = LoadOptions(
                # A copy test's prompt is the copied text: room for it (~300 tokens) and the answer.
                n_ctx=max(test.n_prompt + test.n_gen, 16) + (1024 if test.speculation else 0),
                n_threads=test.n_threads,
                gpu_layers=test.n_gpu_layers,
                n_batch=test.n_batch,
                n_ubatch=test.n_ubatch,
                cache_type_k=test.type_k,
                cache_type_v=test.type_v,
                flash_attn=test.flash_attn,
                speculation=(speculation or SpeculationOptions()) if speculating else SpeculationOptions(),
                rpc=rpc,
                debug=bool(os.environ.get("LLMRUN_DEBUG")),
            )
            with Engine(path, options) as engine:
                info = {
                    "model_type": engine.model.description,
                    "model_size": engine.model.size_bytes,
                    "model_n_params": engine.model.n_params,
                }
                if test.speculation:
                    samples, guessed = run_copy_test(engine, test, repetitions)
                    yield {**row(path, info, test, samples, backend), "speculation": guessed}
                else:
                    yield row(path, info, test, run_test(engine, test, repetitions), backend)
