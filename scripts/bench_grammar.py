#!/usr/bin/env python3
"""Benchmark grammar-constrained generation (JSON schema structured output) in `llmrun serve`.

The same streaming chat request (a prompt asking for a JSON object describing a person:
name, age, email, address with street/city/zip, tags), temperature 0, `max_tokens` 128,
no `ignore_eos`, `repeat_penalty` 1.0 (llmrun's default is 1.1, llama-server's 1.0: the same
greedy sampler on both unless --repeat-penalty says otherwise), is sent in three modes:

  * unconstrained: no `response_format`;
  * json_schema: `response_format: {"type": "json_schema", "json_schema": {"name": "person",
    "schema": SCHEMA}}`, SCHEMA a nested schema (required fields, string maxLength, an integer
    range, an enum, an array of strings with maxItems, a nested object);
  * json_object: `response_format: {"type": "json_object"}` (any JSON);
  * tool_call: `tools` with one function whose parameters are SCHEMA, `tool_choice: "required"`
    (the tool-call grammar; the call's arguments are what is checked against SCHEMA);
  * tool_prompt: unconstrained, after a system message describing that tool as llmrun does for
    a model whose template knows no tools (SmolLM2's, the synthetic model's): tool_call's prompt,
    without its grammar. Generation slows as the context grows (attention reads every cached
    token), so tool_call's grammar is weighed against this, not against the shorter prompts.

Both servers are started once per model with the same model, threads, context per request
and prompts, as scripts/bench_serve.py starts them (and with its helpers):

  * llmrun: `llmrun serve MODEL --parallel 4 --ctx CTX --threads T --no-log`;
  * llama-server: `llama-server -m MODEL --parallel 4 -c 4*CTX -t T`, the native build of the
    llama.cpp vendored in the installed llama-cpp-python (scripts/build_native.sh makes it;
    this script does not build it and says so when it is missing).

Every cell (mode x server x concurrency C) runs REQUESTS requests (rounded up to a multiple
of C) from C concurrent clients; cells run one server after the other, round after round,
so drift in the machine's load hits both alike. Each request's generated tokens/s is its
`completion_tokens` (from the streamed `usage`) over the time from sending it to its last
token; answers held by a grammar may stop before 128 tokens, so tokens/s is compared, not
wall time. Reported per cell (medians over rounds): the median per-request tokens/s; the
median decode tokens/s (tokens after the first over the time after the first: without the
prompt's cost, which weighs more on a short answer than on a long one); the aggregate
tokens/s (all tokens / wall time); tokens per answer; time to first token p50 (the first text
of the answer or of a call's arguments: llmrun sends a call forced to one tool by its name
before it generates anything, its opening being evaluated with the prompt, see ToolPlan.lead);
seconds per request; and how many answers parse as JSON and how many validate against SCHEMA
(in every mode; with --json, the answers themselves). Targets: llmrun json_schema tokens/s >=
0.9x llmrun unconstrained, and >= 1.0x llama-server json_schema (the decode tokens/s ratios are
printed beside them); for tool_call the same targets on decode tokens/s, against tool_prompt
(the same prompt without the grammar): the grammar's cost per token, where tokens/s with the
prompt's time in it would count a short answer's share of its prompt against the grammar.

    python scripts/bench_grammar.py                                   # SmolLM2, C = 1 and 4, 2 rounds
    python scripts/bench_grammar.py --rounds 1 --requests 2 --concurrency 1   # a quick smoke run
    python scripts/bench_grammar.py --synthetic 1b:Q4_0 --rounds 1    # a synthetic ~1B Q4_0 llama
    python scripts/bench_grammar.py --skip llama-server --json grammar.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_serve  # noqa: E402
from bench_run import synthetic_model  # noqa: E402
from bench_serve import Server, _percentile, median_of, servers_for, started  # noqa: E402
from fetch_smollm2 import smollm2_path  # noqa: E402

from llmrun import tools  # noqa: E402

PARALLEL = 4
N_GEN = 128
MODES = ("unconstrained", "json_schema", "json_object", "tool_call", "tool_prompt")
SERVERS = ("llmrun", "llama-server")
RATES = ("tok_s", "decode_tok_s", "aggregate_tok_s")
TARGET_VS_UNCONSTRAINED = 0.9
TARGET_VS_NATIVE = 1.0
JOBS = ("a lighthouse keeper", "a software engineer", "a beekeeper", "a deep-sea diver", "a chess coach",
        "a clockmaker", "a nurse", "a pilot", "a baker", "a librarian", "a mountain guide", "a potter")  # fmt: skip

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 60},
        "status": {"type": "string", "enum": ["active", "inactive", "retired"]},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 60},
                "city": {"type": "string", "maxLength": 40},
                "zip": {"type": "string", "maxLength": 10},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 4},
    },
    "required": ["name", "age", "email", "status", "address", "tags"],
    "additionalProperties": False,
}
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
FUNCTION = {"name": "add_person", "description": "Record a person", "parameters": SCHEMA}
TOOL_SYSTEM_PROMPT = tools.system_prompt(
    tools.plan([tools.Tool(**FUNCTION)], tools.ToolChoice("required"), False, None, False), tools.ToolChoice("required")
)


def prompt(index: int, nonce: str) -> str:
    """The request's question; the nonce keeps one cell's prompts out of the prompt cache of an earlier cell."""
    return (f"Request {nonce}-{index}. Write a JSON object describing a fictional person who works as "
            f"{JOBS[index % len(JOBS)]}. Give the fields name, age, email, status (active, inactive or retired), "
            "address (an object with street, city and zip) and tags (a list of up to 4 short strings). "
            "Reply with the JSON object only.")  # fmt: skip


def response_format(mode: str) -> dict[str, Any] | None:
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    if mode == "json_object":
        return {"type": "json_object"}
    return None


@dataclass
class Outcome:
    tokens: int
    ttft_s: float
    total_s: float  # from sending the request to its last token
    parses: bool
    valid: bool
    finish_reason: str | None
    text: str

    @property
    def tok_s(self) -> float:
        return self.tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first over the time after the first: the generation rate without the prompt's cost."""
        decode_s = self.total_s - self.ttft_s
        return (self.tokens - 1) / decode_s if self.tokens > 1 and decode_s > 0 else 0.0


def check_json(text: str) -> tuple[bool, bool]:
    """Whether the answer parses as JSON, and whether it validates against SCHEMA."""
    try:
        value = json.loads(text)
    except ValueError:
        return False, False
    return True, VALIDATOR.is_valid(value)


async def stream_chat(client: httpx.AsyncClient, server: Server, mode: str, text: str, penalty: float) -> Outcome:
    body: dict[str, Any] = {"model": server.model, "messages": [{"role": "user", "content": text}],
                            "max_tokens": N_GEN, "temperature": 0, "repeat_penalty": penalty, "stream": True,
                            "stream_options": {"include_usage": True}}  # fmt: skip
    if (fmt := response_format(mode)) is not None:
        body["response_format"] = fmt
    if mode == "tool_call":
        body.update(tools=[{"type": "function", "function": FUNCTION}], tool_choice="required",
                    parallel_tool_calls=False)  # one call, whose arguments are checked against SCHEMA  # fmt: skip
    if mode == "tool_prompt":
        body["messages"].insert(0, {"role": "system", "content": TOOL_SYSTEM_PROMPT})
    started = time.perf_counter()
    first: float | None = None
    last: float | None = None
    parts: list[str] = []
    chunks = 0
    usage_tokens: int | None = None
    finish: str | None = None
    async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")[:500]
            raise RuntimeError(f"{server.name} {mode}: HTTP {response.status_code}: {detail}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage_tokens = data["usage"].get("completion_tokens")
            for choice in data.get("choices") or []:
                finish = choice.get("finish_reason") or finish
                delta = choice.get("delta") or {}
                content = delta.get("content") or "".join(
                    (call.get("function") or {}).get("arguments") or "" for call in delta.get("tool_calls") or []
                )
                if content:  # the answer's text or a call's arguments (not a name alone: llmrun sends a forced
                    parts.append(content)  # call's name before it generates anything, see ToolPlan.lead)
                    chunks += 1
                    last = time.perf_counter()
                    if first is None:
                        first = last
    end = last or time.perf_counter()
    text = "".join(parts)
    parses, valid = check_json(text.strip())
    return Outcome(usage_tokens or chunks, (first or end) - started, end - started, parses, valid, finish, text)


async def cell(server: Server, mode: str, concurrency: int, args: argparse.Namespace, nonce: str) -> dict[str, Any]:
    """``requests`` requests (rounded up to a multiple of C) from C clients, each taking the next one when done."""
    total = math.ceil(args.requests / concurrency) * concurrency
    queue = list(range(total))
    outcomes: list[Outcome] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            index = queue.pop(0)
            try:
                outcome = await stream_chat(client, server, mode, prompt(index, nonce), args.repeat_penalty)
            except httpx.RemoteProtocolError:  # a kept-alive connection the server had closed: ask again, once
                outcome = await stream_chat(client, server, mode, prompt(index, nonce), args.repeat_penalty)
            outcomes.append(outcome)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        wall = time.perf_counter() - started
    return {
        "tok_s": statistics.median(outcome.tok_s for outcome in outcomes),
        "decode_tok_s": statistics.median(outcome.decode_tok_s for outcome in outcomes),
        "aggregate_tok_s": sum(outcome.tokens for outcome in outcomes) / wall,
        "ttft_p50": _percentile(sorted(outcome.ttft_s for outcome in outcomes), 50),
        "request_s": statistics.median(outcome.total_s for outcome in outcomes),
        "tokens": sum(outcome.tokens for outcome in outcomes),
        "parses": sum(outcome.parses for outcome in outcomes),
        "valid": sum(outcome.valid for outcome in outcomes),
        "total": len(outcomes),
        "requests": [asdict(outcome) for outcome in outcomes],
    }


def native_bin_dir() -> Path | None:
    """scripts/build_native.sh's output folder for the installed llama-cpp-python, when it holds llama-server."""
    version = importlib.metadata.version("llama-cpp-python")
    bin_dir = ROOT / ".cache" / "native" / f"llama_cpp_python-{version}" / "build" / "bin"
    return bin_dir if (bin_dir / "llama-server").exists() else None


def summary(outcome: dict[str, Any]) -> str:
    total = outcome["total"]
    return (f"{outcome['tok_s']:6.1f} tok/s (decode {outcome['decode_tok_s']:6.1f}, aggregate "
            f"{outcome['aggregate_tok_s']:6.1f})  TTFT p50 {outcome['ttft_p50']:.3f}s"
            f"  {outcome['request_s']:.2f}s/request  JSON {outcome['parses']}/{total}"
            f"  schema {outcome['valid']}/{total}  ({outcome['tokens']} tokens)")  # fmt: skip


def bench_model(model: Path, args: argparse.Namespace, bin_dir: Path | None) -> dict[str, Any]:
    """Both servers up at once (an idle one uses no CPU); each cell runs on one server after the other."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    notes: list[str] = []
    skip = {*args.skip, "llama-cpp-python"}
    if bin_dir is None:
        skip.add("llama-server")
    bench_serve.PARALLEL = PARALLEL  # servers_for reads it: --parallel 4 for llmrun, --parallel 4 -c 4*ctx natively
    with tempfile.TemporaryDirectory() as home_dir:
        servers = servers_for(model, args.threads, args.ctx, bin_dir or Path("/nonexistent"), Path(home_dir), skip)
        with started(servers, notes) as running:
            for round_index in range(args.rounds):
                for concurrency in args.concurrency:
                    for mode in args.modes:
                        nonce = f"{round_index}{time.time_ns() % 1_000_000}"  # the same prompts on every server
                        for server in running:
                            key = f"{mode}/c{concurrency}"
                            try:
                                outcome = asyncio.run(cell(server, mode, concurrency, args, nonce))
                            except (RuntimeError, httpx.HTTPError) as error:
                                note = f"{server.name} {key}: {str(error).splitlines()[0]}"
                                if note not in notes:
                                    notes.append(note)
                                print(f"  round {round_index + 1} {note}", flush=True)
                                continue
                            results.setdefault(server.name, {}).setdefault(key, []).append(outcome)
                            print(f"  round {round_index + 1} {server.name:<12} {mode:<13} C={concurrency:<2} "
                                  + summary(outcome), flush=True)  # fmt: skip
    return {"results": results, "notes": notes}


def report(model: Path, data: dict[str, Any], concurrency: list[int], modes: list[str]) -> list[str]:
    results = data["results"]
    names = [name for name in SERVERS if results.get(name)]
    lines = [f"\n## {model.name}\n",
             "| mode | C | server | tok/s | decode tok/s | aggregate tok/s | tokens / request | TTFT p50 (s) "
             "| s / request | parses as JSON | valid |", "|---" * 11 + "|"]  # fmt: skip
    for c in concurrency:
        for mode in modes:
            key = f"{mode}/c{c}"
            for name in names:
                entries = results[name].get(key)
                if not entries:
                    lines.append(f"| {mode} | {c} | {name} |" + " - |" * 8)
                    continue
                total = sum(entry["total"] for entry in entries)
                parses = sum(entry["parses"] for entry in entries)
                valid = sum(entry["valid"] for entry in entries)
                cells = [mode, str(c), name, *(f"{median_of(entries, key):.1f}" for key in RATES),
                         f"{sum(entry['tokens'] for entry in entries) / total:.0f}",
                         f"{median_of(entries, 'ttft_p50'):.3f}", f"{median_of(entries, 'request_s'):.2f}",
                         f"{parses}/{total}", f"{valid}/{total}"]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    ours = results.get("llmrun", {})
    native = results.get("llama-server", {})
    for c in concurrency:
        for mode in ("json_schema", "tool_call"):
            constrained = ours.get(f"{mode}/c{c}")
            plain = "tool_prompt" if mode == "tool_call" else "unconstrained"  # the same prompt, no grammar
            pairs = [(f"llmrun {plain}", ours.get(f"{plain}/c{c}"), TARGET_VS_UNCONSTRAINED),
                     (f"llama-server {mode}", native.get(f"{mode}/c{c}"), TARGET_VS_NATIVE)]  # fmt: skip
            for label, other, target in pairs:
                if not constrained or not other:
                    lines.append(f"C={c}: llmrun {mode} / {label}: - (target >= {target:.1f}x)")
                    continue
                ratio = median_of(constrained, "tok_s") / median_of(other, "tok_s")
                decode = median_of(constrained, "decode_tok_s") / median_of(other, "decode_tok_s")
                verdict = "meets" if (decode if mode == "tool_call" else ratio) >= target else "MISSES"
                rates = (
                    f"{ratio:.2f}x tok/s ({verdict} the target >= {target:.1f}x); decode tok/s {decode:.2f}x"
                    if mode != "tool_call"
                    else f"{ratio:.2f}x tok/s; decode tok/s {decode:.2f}x ({verdict} the target >= {target:.1f}x)"
                )
                lines.append(f"C={c}: llmrun {mode} / {label}: {rates}")  # fmt: skip
    for note in data["notes"]:
        lines.append(f"note: {note}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", default=[], help="a GGUF file (default: SmolLM2)")
    parser.add_argument("--synthetic", action="append", default=[], metavar="PRESET:QUANT", help="e.g. 1b:Q4_0")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=2048, help=f"context per request (llama-server gets {PARALLEL}x)")
    parser.add_argument("--concurrency", type=lambda text: [int(x) for x in text.split(",")], default=[1, 4])
    parser.add_argument(
        "--modes",
        type=lambda text: text.split(","),
        default=list(MODES),
        help="comma-separated, of: " + ", ".join(MODES),
    )
    parser.add_argument("--requests", type=int, default=6, help="requests per cell (rounded up to a multiple of C)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeat-penalty", type=float, default=1.0,
                        help="sent to both servers (llmrun's own default is 1.1, llama-server's 1.0)")  # fmt: skip
    parser.add_argument("--skip", action="append", default=[], choices=["llama-server"])
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    if unknown := set(args.modes) - set(MODES):
        parser.error(f"unknown mode {sorted(unknown)[0]!r}; the modes are {', '.join(MODES)}")
    models = list(args.model)
    cache = ROOT / ".cache" / "models"
    models += [synthetic_model(spec, cache) for spec in args.synthetic]
    if not models:
        models = [smollm2_path()]
    bin_dir = None
    if "llama-server" not in args.skip:
        bin_dir = native_bin_dir()
        if bin_dir is None:
            print("native llama-server not built (run scripts/build_native.sh); measuring llmrun alone", flush=True)
    lines = [f"# grammar-constrained generation, llmrun serve vs llama-server: {args.threads} threads, ctx {args.ctx} "
             f"per request, {PARALLEL} slots, temperature 0, repeat penalty "
             f"{args.repeat_penalty}, up to {N_GEN} tokens, {args.requests} requests per cell, "
             f"{args.rounds} rounds (medians)"]  # fmt: skip
    raw: dict[str, Any] = {"schema": SCHEMA, "models": {}}
    for model in models:
        print(f"{model.name}", flush=True)
        data = bench_model(model, args, bin_dir)
        raw["models"][model.name] = data
        lines += report(model, data, args.concurrency, args.modes)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
