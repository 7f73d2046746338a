#!/usr/bin/env python3
"""Benchmark `llmrun serve` under concurrency against native llama-server and llama-cpp-python's server.

For each model, with the same threads, per-request context and prompts, all servers are
started, then every measurement runs on each server in turn (an idle server uses no CPU; odd
rounds take them in the other order), round after round, so drift in the machine's load hits
all of them alike; the report adds llmrun / llama-server for each cell round by round:

  * llmrun: `llmrun serve MODEL --parallel 8 --ctx CTX --threads T --no-log`;
  * llama-server: `llama-server -m MODEL --parallel 8 -c 8*CTX -t T` built from the llama.cpp
    source vendored in the installed llama-cpp-python's sdist (scripts/build_native.sh);
  * llama-cpp-python: its continuous-batching example server (`examples/server/server.py`
    in the same sdist) with `n_seq_max` 8 and `n_ctx` 8*CTX (left out, with a note, when it
    cannot start).

Measured per server:
  * C concurrent streaming chat clients (C = 1, 4, 8, 16), each asking for 128 tokens with
    `ignore_eos`: aggregate generated tokens/s (all tokens / wall time) and time to first
    token p50/p95;
  * 8 clients arriving at once with the same fresh 1,000-token system prompt (new each
    round, so nothing is cached) and different questions: time to first token p50;
  * resident memory with the model loaded after the load test, and CPU use while idle.

    python scripts/bench_serve.py                               # SmolLM2, 2 rounds
    python scripts/bench_serve.py --synthetic 1b:Q4_0 --rounds 1  # a synthetic ~1B Q4_0 llama
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_run import native_bin_dir, synthetic_model  # noqa: E402
from fetch_smollm2 import smollm2_path  # noqa: E402

LLMRUN = Path(sys.executable).with_name("llmrun")
PARALLEL = 8
N_GEN = 128
SHARED_PREFIX_CLIENTS = 8
SHARED_PREFIX_GEN = 16
SHARED_PREFIX_TOKENS = 1000  # about; a byte-level vocabulary gets fewer rules
TOPICS = ("a lighthouse keeper", "a lost robot", "the first city on Mars", "a chess prodigy", "a river in winter",
          "an old map", "a night train", "a beekeeper", "a deep-sea diver", "a forgotten song", "a glass factory",
          "a desert storm", "a clockmaker", "a volcano island", "a mountain rescue", "a quiet library")  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    name: str
    command: list[str]
    env: dict[str, str]
    model: str  # the model name requests use
    port: int
    process: subprocess.Popen[bytes] | None = None
    log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the server
        self.process = subprocess.Popen(self.command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.name} exited: {self.log.read().decode(errors='replace')[-2000:]}")
            try:
                if self.ready():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} did not start")

    def ready(self) -> bool:
        """The server answers a chat request."""
        response = httpx.post(f"{self.url}/v1/chat/completions", timeout=30, json={
            "model": self.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})  # fmt: skip
        return response.status_code == 200

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def rss_mb(self) -> float:
        """Resident memory of the server process and its children, MB."""
        assert self.process is not None
        total = 0
        for pid in [self.process.pid, *_children(self.process.pid)]:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def cpu_seconds(self) -> float:
        assert self.process is not None
        ticks = 0
        for pid in [self.process.pid, *_children(self.process.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
            except OSError:
                pass
        return ticks / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


@dataclass
class Outcome:
    ttft_s: float
    tokens: int


async def stream_chat(client: httpx.AsyncClient, server: Server, messages: list[dict[str, str]], max_tokens: int,
                      started: float) -> Outcome:  # fmt: skip
    """One streaming chat request: time to the first content, and tokens generated (usage, else chunks)."""
    body = {"model": server.model, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0.8, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    first: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage_tokens = data["usage"].get("completion_tokens")
            for choice in data.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
    return Outcome((first or time.perf_counter()) - started, usage_tokens or chunks)


async def load(server: Server, concurrency: int) -> dict[str, float]:
    """C clients at once, 128 tokens each: aggregate tokens/s and TTFT percentiles."""
    limits = httpx.Limits(max_connections=concurrency + 4)
    nonce = time.time_ns() % 1_000_000  # no prompt is cached from an earlier run, beyond the chat template's start
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        outcomes = await asyncio.gather(*[
            stream_chat(client, server, [{"role": "user", "content": f"Write a long story about {TOPICS[i % 16]} "
                                                                     f"(story {nonce}-{i})."}], N_GEN, started)
            for i in range(concurrency)
        ])  # fmt: skip
        wall = time.perf_counter() - started
    ttfts = sorted(outcome.ttft_s for outcome in outcomes)
    tokens = sum(outcome.tokens for outcome in outcomes)
    return {"tok_s": tokens / wall, "ttft_p50": _percentile(ttfts, 50), "ttft_p95": _percentile(ttfts, 95),
            "tokens": tokens}  # fmt: skip


def shared_system_prompt(round_id: str, n_rules: int = 62) -> str:
    rules = " ".join(f"Rule {i}: answer questions about topic {i} with care, citing rule {i}." for i in range(n_rules))
    return f"Session {round_id}. You are the assistant of a help desk. {rules}"


def shared_rules_for(model: Path, target_tokens: int = SHARED_PREFIX_TOKENS) -> int:
    """How many rules make the shared system prompt about ``target_tokens`` long in this model's vocabulary."""
    full = count_tokens(model, shared_system_prompt("0-0", 62))
    n_rules = 62 if full <= target_tokens * 1.3 else max(1, int(62 * target_tokens * 1.25 / full))
    while n_rules > 1 and count_tokens(model, shared_system_prompt("0-0", n_rules)) > target_tokens * 1.3:
        n_rules -= 1
    return n_rules


async def shared_prefix(server: Server, round_id: str, n_rules: int) -> dict[str, float]:
    system = shared_system_prompt(round_id, n_rules)
    async with httpx.AsyncClient(timeout=900) as client:
        started = time.perf_counter()
        outcomes = await asyncio.gather(*[
            stream_chat(client, server, [{"role": "system", "content": system},
                                         {"role": "user", "content": f"Tell me about {TOPICS[i]}."}],
                        SHARED_PREFIX_GEN, started)
            for i in range(SHARED_PREFIX_CLIENTS)
        ])  # fmt: skip
    ttfts = sorted(outcome.ttft_s for outcome in outcomes)
    return {"ttft_p50": _percentile(ttfts, 50), "ttft_p95": _percentile(ttfts, 95)}


def _percentile(values: list[float], percent: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(percent) - 1]


def idle_cpu_percent(server: Server, seconds: float = 5.0) -> float:
    time.sleep(1.0)
    before = server.cpu_seconds()
    time.sleep(seconds)
    return 100 * (server.cpu_seconds() - before) / seconds


def count_tokens(model: Path, text: str) -> int:
    import llama_cpp

    from llmrun.engine.native import init_native

    init_native(False)  # llama.cpp's log stays quiet

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    handle = llama_cpp.llama_model_load_from_file(str(model).encode(), params)
    vocab = llama_cpp.llama_model_get_vocab(handle)
    data = text.encode()
    buffer = (llama_cpp.llama_token * (len(data) + 8))()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buffer, len(buffer), False, False)
    llama_cpp.llama_model_free(handle)
    return int(n)


def servers_for(model: Path, threads: int, ctx: int, bin_dir: Path, home: Path, skip: set[str]) -> list[Server]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMRUN_")}
    env["LLMRUN_HOME"] = str(home)
    name = model.stem.lower()
    subprocess.run([str(LLMRUN), "import", str(model), "--name", name, "--link", "--force"], env=env, check=True,
                   capture_output=True)  # fmt: skip
    servers = []
    port = free_port()
    ours = [str(LLMRUN), "serve", name, "--port", str(port), "--parallel", str(PARALLEL), "--ctx", str(ctx),
            "--threads", str(threads), "--no-log"]  # fmt: skip
    servers.append(Server("llmrun", ours, env, name, port))
    native_env = {**os.environ, "LD_LIBRARY_PATH": str(bin_dir)}
    port = free_port()
    servers.append(Server("llama-server", [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1",
                                           "--port", str(port), "--parallel", str(PARALLEL), "-c",
                                           str(PARALLEL * ctx), "-t", str(threads), "-tb", str(threads),
                                           "--alias", name, "--no-webui"], native_env, name, port))  # fmt: skip
    example = bin_dir.parent.parent / "examples" / "server" / "server.py"
    if "llama-cpp-python" not in skip and example.exists():
        port = free_port()
        config = home / f"lcp-{name}.json"
        config.write_text(json.dumps({
            "server": {"host": "127.0.0.1", "port": port},
            "model": {"path": str(model), "alias": name, "n_ctx": PARALLEL * ctx, "n_seq_max": PARALLEL,
                      "threads": threads, "threads_batch": threads},
        }))  # fmt: skip
        servers.append(Server("llama-cpp-python", [sys.executable, str(example), "-C", str(config)], dict(os.environ),
                              name, port))  # fmt: skip
    return [server for server in servers if server.name not in skip]


@contextlib.contextmanager
def started(servers: list[Server], notes: list[str]) -> Iterator[list[Server]]:
    """Start every server (one that cannot start becomes a note); yield those running; stop them all after."""
    running = []
    try:
        for server in servers:
            try:
                server.start()
                running.append(server)
            except RuntimeError as error:
                notes.append(f"{server.name}: {str(error).splitlines()[0]}")
        yield running
    finally:
        for server in servers:
            server.stop()


def bench_model(model: Path, args: argparse.Namespace, bin_dir: Path) -> dict[str, Any]:
    """All servers up at once (idle ones use no CPU); each measurement runs on one server after the other."""
    results: dict[str, dict[str, list[Any]]] = {}
    notes: list[str] = []
    n_rules = shared_rules_for(model)
    with tempfile.TemporaryDirectory() as home_dir:
        servers = servers_for(model, args.threads, args.ctx, bin_dir, Path(home_dir), set(args.skip))
        with started(servers, notes) as running:
            for round_index in range(args.rounds):
                # Odd rounds take the servers in the other order: no server always runs just after another.
                order = running if round_index % 2 == 0 else running[::-1]
                for concurrency in args.concurrency:
                    for server in order:
                        outcome = asyncio.run(load(server, concurrency))
                        results.setdefault(server.name, {}).setdefault(f"c{concurrency}", []).append(outcome)
                        print(f"  round {round_index + 1} {server.name:<17} C={concurrency:<3} "
                              f"{outcome['tok_s']:7.1f} tok/s  TTFT p50 {outcome['ttft_p50']:.3f}s "
                              f"p95 {outcome['ttft_p95']:.3f}s  ({outcome['tokens']} tokens)", flush=True)  # fmt: skip
                if args.no_shared_prefix:
                    continue
                for server in order:
                    outcome = asyncio.run(shared_prefix(server, f"{round_index}-{time.time_ns()}", n_rules))
                    results[server.name].setdefault("shared", []).append(outcome)
                    print(f"  round {round_index + 1} {server.name:<17} shared 1k prefix x8: TTFT p50 "
                          f"{outcome['ttft_p50']:.3f}s p95 {outcome['ttft_p95']:.3f}s", flush=True)  # fmt: skip
            for server in running:
                results[server.name]["rss_mb"] = [server.rss_mb()]
                results[server.name]["idle_cpu"] = [idle_cpu_percent(server)]
    return {"results": results, "notes": notes}


def median_of(entries: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(entry[key]) for entry in entries)


def report(model: Path, data: dict[str, Any], concurrency: list[int], shared_tokens: int) -> list[str]:
    results = data["results"]
    ours = results.get("llmrun", {})
    names = [name for name in ("llmrun", "llama-server", "llama-cpp-python") if results.get(name)]
    lines = [f"\n## {model.name}\n", "| C | " + " | ".join(f"{name} tok/s" for name in names)
             + " | llmrun / llama-server | " + " | ".join(f"{name} TTFT p50 / p95 (s)" for name in names)
             + " | TTFT p50 ratio |", "|---" * (3 + 2 * len(names)) + "|"]  # fmt: skip
    paired: list[str] = []
    for c in concurrency:
        key = f"c{c}"
        cells = [f"{median_of(results[name][key], 'tok_s'):.1f}" if key in results[name] else "-" for name in names]
        ttfts = [f"{median_of(results[name][key], 'ttft_p50'):.3f} / {median_of(results[name][key], 'ttft_p95'):.3f}"
                 if key in results[name] else "-" for name in names]  # fmt: skip
        native = results.get("llama-server", {})
        ratio = ttft_ratio = "-"
        if key in ours and key in native:
            ratio = f"{median_of(ours[key], 'tok_s') / median_of(native[key], 'tok_s'):.2f}x"
            ttft_ratio = f"{median_of(ours[key], 'ttft_p50') / median_of(native[key], 'ttft_p50'):.2f}x"
            pairs = zip(ours[key], native[key], strict=False)
            paired.append(f"C={c} " + " ".join(f"{mine['tok_s'] / theirs['tok_s']:.2f}x" for mine, theirs in pairs))
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {ratio} | " + " | ".join(ttfts) + f" | {ttft_ratio} |")
    if paired:  # the same cell in the same round: a pair the machine's drift between rounds does not split
        lines.append("\nllmrun / llama-server tok/s, round by round: " + "; ".join(paired))
    if all("shared" in results[name] for name in names):
        shared = [f"{name} {median_of(results[name]['shared'], 'ttft_p50'):.2f} / "
                  f"{median_of(results[name]['shared'], 'ttft_p95'):.2f}" for name in names]  # fmt: skip
        lines.append(f"\n8 fresh clients sharing a {shared_tokens}-token system prompt, TTFT p50 / p95 (s): "
                     + ", ".join(shared))  # fmt: skip
        if "llama-server" in results:
            native_ttft = median_of(results["llama-server"]["shared"], "ttft_p50")
            shared_ratio = median_of(ours["shared"], "ttft_p50") / native_ttft
            lines.append(f"llmrun / llama-server TTFT p50: {shared_ratio:.2f}x")
    rss = [f"{name} {statistics.median(results[name]['rss_mb']):.0f}" for name in names if results[name].get("rss_mb")]
    idle = [f"{name} {statistics.median(results[name]['idle_cpu']):.1f}" for name in names
            if results[name].get("idle_cpu")]  # fmt: skip
    lines.append("\nRSS after the load test (MB): " + ", ".join(rss))
    lines.append("Idle CPU (% of one core, 5 s): " + ", ".join(idle))
    for note in data["notes"]:
        lines.append(f"note: {note}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", default=[], help="a GGUF file (default: SmolLM2)")
    parser.add_argument("--synthetic", action="append", default=[], metavar="PRESET:QUANT", help="e.g. 1b:Q4_0")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--ctx", type=int, default=2048, help="context per request (llama-server gets 8x)")
    parser.add_argument("--concurrency", type=lambda text: [int(x) for x in text.split(",")], default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", action="append", default=[], choices=["llama-server", "llama-cpp-python"])
    parser.add_argument("--no-shared-prefix", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    models = list(args.model)
    cache = ROOT / ".cache" / "models"
    models += [synthetic_model(spec, cache) for spec in args.synthetic]
    if not models:
        models = [smollm2_path()]
    bin_dir = native_bin_dir()
    lines = [f"# llmrun serve vs llama-server vs llama-cpp-python: {args.threads} threads, ctx {args.ctx} per request, "
             f"{PARALLEL} slots, {N_GEN} tokens per request, {args.rounds} rounds (medians)"]  # fmt: skip
    raw = {}
    for model in models:
        print(f"{model.name}", flush=True)
        data = bench_model(model, args, bin_dir)
        raw[model.name] = data
        shared_tokens = count_tokens(model, shared_system_prompt("0-0", shared_rules_for(model)))
        lines += report(model, data, args.concurrency, shared_tokens)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
