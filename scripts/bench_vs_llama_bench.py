#!/usr/bin/env python3
"""`llmrun bench` against native `llama-bench` (built from the vendored llama.cpp), in one run.

Both measure pp512 and tg128 on the same model with the same threads; runs alternate
(llama-bench, then llmrun bench, -r 5 each) so machine drift hits both. Prints each
tool's tokens/s and the ratio. Models: SmolLM2 and, with --synthetic, a synthetic llama
(default 1b:Q4_0, made with scripts/synthetic_gguf.py).

    python scripts/bench_vs_llama_bench.py --synthetic 1b:Q4_0 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_run import native_bin_dir, synthetic_model  # noqa: E402
from fetch_smollm2 import smollm2_path  # noqa: E402

LLMRUN = Path(sys.executable).with_name("llmrun")


def measure(command: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    completed = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    rows = json.loads(completed.stdout)
    return {("pp" if row["n_prompt"] else "tg") + str(row["n_prompt"] or row["n_gen"]): row["avg_ts"] for row in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two tools (each -r 5)")
    parser.add_argument("--synthetic", action="append", default=[], metavar="PRESET:QUANT")
    args = parser.parse_args()

    import os

    from llmrun.machine import physical_cores

    threads = args.threads or physical_cores()
    cache = ROOT / ".cache" / "models"
    models = [smollm2_path()] + [synthetic_model(spec, cache) for spec in args.synthetic]
    bench = native_bin_dir() / "llama-bench"
    env = {**os.environ, "LLMRUN_HOME": tempfile.mkdtemp(prefix="llmrun-bench-")}
    print(f"pp512 and tg128, {threads} threads, {args.rounds} rounds of -r 5 (mean tokens/s)")
    print(f"{'model':<36} {'test':<6} {'llama-bench':>12} {'llmrun bench':>13} {'ratio':>7}")
    for model in models:
        common = ["-p", "512", "-n", "128", "-t", str(threads), "-r", "5", "-o", "json"]
        native: dict[str, list[float]] = {}
        ours: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for test, value in measure([str(bench), "-m", str(model), *common]).items():
                native.setdefault(test, []).append(value)
            for test, value in measure([str(LLMRUN), "bench", str(model), *common], env).items():
                ours.setdefault(test, []).append(value)
        for test in ("pp512", "tg128"):
            n, o = statistics.mean(native[test]), statistics.mean(ours[test])
            print(f"{model.name:<36} {test:<6} {n:12.2f} {o:13.2f} {o / n:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
