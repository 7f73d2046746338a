#!/usr/bin/env python3
"""What `llmrun serve --config` costs in front of an upstream engine: llmrun -> llama-server vs llama-server direct.

One native llama-server (built from the llama.cpp vendored in the installed llama-cpp-python,
scripts/build_native.sh; `--parallel 8`) serves the model; one `llmrun serve --config` routes the
model's name to it and loads nothing itself. Round after round, the same measurements go to
each address in turn (odd rounds in the other order):

  * 8 concurrent streaming chat clients, 128 tokens each (`ignore_eos`): aggregate generated
    tokens/s and time to first token p50;
  * time to first token of lone requests (`max_tokens` 1, 20 in a row): the p50 difference is
    the latency the hop adds.

Targets (issue #11): tokens/s through llmrun >= 0.97x direct; added TTFT p50 <= 5 ms. Both
servers run on this machine, so the proxy's own CPU time competes with the decode; that is
in the numbers.

    python scripts/bench_proxy.py                 # SmolLM2, 3 rounds
    python scripts/bench_proxy.py --synthetic 1b:Q4_0 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_run import native_bin_dir, synthetic_model  # noqa: E402
from bench_serve import LLMRUN, N_GEN, PARALLEL, Server, free_port, load  # noqa: E402
from fetch_smollm2 import smollm2_path  # noqa: E402

LONE_REQUESTS = 20


async def lone_ttfts(server: Server, count: int = LONE_REQUESTS) -> list[float]:
    """Time to the first token of requests sent one at a time, each with a prompt of its own."""
    ttfts = []
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(keepalive_expiry=1)) as client:
        for number in range(count):
            question = {"role": "user", "content": f"Say one word ({time.time_ns()}-{number})."}
            body = {"model": server.model, "max_tokens": 1, "stream": True, "temperature": 0, "messages": [question]}
            began = time.perf_counter()
            async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                        ttfts.append(time.perf_counter() - began)
                        break
    return ttfts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a GGUF file (default: SmolLM2)")
    parser.add_argument("--synthetic", metavar="PRESET:QUANT", help="a synthetic llama instead, e.g. 1b:Q4_0")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--ctx", type=int, default=2048, help="context per request (llama-server gets 8x)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = synthetic_model(args.synthetic, ROOT / ".cache" / "models") if args.synthetic else args.model
    model = model or smollm2_path()
    bin_dir = native_bin_dir()
    name = model.stem.lower()
    native_port, proxy_port = free_port(), free_port()
    native = Server("llama-server", [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1",
                                     "--port", str(native_port), "--parallel", str(PARALLEL), "-c",
                                     str(PARALLEL * args.ctx), "-t", str(args.threads), "-tb", str(args.threads),
                                     "--alias", name, "--no-webui"],
                    {**os.environ, "LD_LIBRARY_PATH": str(bin_dir)}, name, native_port)  # fmt: skip
    home = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    config = home / "upstreams.toml"
    config.write_text(f'[upstreams.native]\nurls = ["{native.url}"]\nmodels = ["{name}"]\n', encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMRUN_")}
    env["LLMRUN_HOME"] = str(home)
    proxy = Server("llmrun", [str(LLMRUN), "serve", "--config", str(config), "--port", str(proxy_port), "--no-log"],
                   env, name, proxy_port)  # fmt: skip
    results: dict[str, dict[str, list[float]]] = {"llama-server": {}, "llmrun": {}}
    try:
        native.start()
        proxy.start()
        for round_number in range(args.rounds):
            order = [native, proxy] if round_number % 2 == 0 else [proxy, native]
            for server in order:
                who = "llama-server" if server is native else "llmrun"
                measured = asyncio.run(load(server, PARALLEL))
                lone = asyncio.run(lone_ttfts(server))
                cell = results[who]
                cell.setdefault("tok_s", []).append(measured["tok_s"])
                cell.setdefault("ttft_p50", []).append(measured["ttft_p50"])
                cell.setdefault("lone_ttft_p50", []).append(statistics.median(lone))
                print(f"round {round_number + 1} {who}: {measured['tok_s']:.1f} tok/s at C={PARALLEL}, "
                      f"TTFT p50 {measured['ttft_p50'] * 1000:.0f} ms, lone TTFT p50 "
                      f"{statistics.median(lone) * 1000:.1f} ms", flush=True)  # fmt: skip
    finally:
        proxy.stop()
        native.stop()
    direct, routed = results["llama-server"], results["llmrun"]

    def median(cell: dict[str, list[float]], key: str) -> float:
        return statistics.median(cell[key])

    ratio = median(routed, "tok_s") / median(direct, "tok_s")
    added_ms = (median(routed, "lone_ttft_p50") - median(direct, "lone_ttft_p50")) * 1000
    added_load_ms = (median(routed, "ttft_p50") - median(direct, "ttft_p50")) * 1000
    pairs = ", ".join(f"{a / b:.3f}x" for a, b in zip(routed["tok_s"], direct["tok_s"], strict=True))
    print(f"\n# llmrun serve --config -> llama-server vs llama-server direct: {model.name}, {args.threads} threads, "
          f"{PARALLEL} streams x {N_GEN} tokens, {args.rounds} rounds (medians)\n")  # fmt: skip
    print("| | llama-server direct | through llmrun | ratio / added |")
    print("|---|---:|---:|---:|")
    print(f"| tokens/s, {PARALLEL} streams | {median(direct, 'tok_s'):.1f} | {median(routed, 'tok_s'):.1f} | "
          f"{ratio:.3f}x |")  # fmt: skip
    print(f"| TTFT p50, {PARALLEL} streams (ms) | {median(direct, 'ttft_p50') * 1000:.0f} | "
          f"{median(routed, 'ttft_p50') * 1000:.0f} | {added_load_ms:+.1f} ms |")  # fmt: skip
    print(f"| TTFT p50, lone requests (ms) | {median(direct, 'lone_ttft_p50') * 1000:.1f} | "
          f"{median(routed, 'lone_ttft_p50') * 1000:.1f} | {added_ms:+.1f} ms |")  # fmt: skip
    print(f"\ntokens/s ratio round by round: {pairs}")
    print(f"targets: tokens/s >= 0.97x ({'met' if ratio >= 0.97 else 'not met'}), added TTFT p50 <= 5 ms "
          f"({'met' if added_ms <= 5 else 'not met'})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
