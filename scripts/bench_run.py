#!/usr/bin/env python3
"""Benchmark `llmrun run` generation speed against native llama.cpp, and CLI start-up time.

In one run, for each model and the same thread count:
  * native: `llama-bench -p 0 -n 128 -d P` (tg128 after P tokens already in the KV cache,
    P being the length of llmrun's chat-templated prompt), built from the llama.cpp source
    vendored in the installed llama-cpp-python's sdist (scripts/build_native.sh);
  * llmrun: `llmrun run MODEL PROMPT --json --ignore-eos -n 129 --ctx 256` (128 decodes
    after the first token, greedy), generation tokens/s as reported in its JSON;
runs alternate between the two so drift in machine load hits both, and the ratio is
printed. Then the wall time of `llmrun --help` and `llmrun list`.

    python scripts/bench_run.py                        # SmolLM2, 5 repetitions
    python scripts/bench_run.py --synthetic 0.5b:Q4_0  # also a synthetic 0.5B llama
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from fetch_smollm2 import smollm2_path  # noqa: E402

LLMRUN = Path(sys.executable).with_name("llmrun")
N_GEN = 128
PROMPT = "Write a long story about a lighthouse keeper."


def native_bin_dir() -> Path:
    """The native tools' folder (built on first use); they run as llmrun does, off AMX (see llmrun.machine)."""
    from llmrun.machine import avoid_amx
    from llmrun.settings import get_settings

    avoid_amx(get_settings().amx)  # inherited by every native tool this process starts
    built = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_native.sh")], check=True, capture_output=True, text=True
    )
    return ROOT / built.stdout.strip().splitlines()[-1]


def native_tg(bin_dir: Path, model: Path, threads: int, depth: int) -> float:
    """One llama-bench tg128 at the same KV depth as llmrun's prompt (it warms up itself), tokens/s."""
    completed = subprocess.run(
        [str(bin_dir / "llama-bench"), "-m", str(model), "-p", "0", "-n", str(N_GEN), "-d", str(depth),
         "-t", str(threads), "-r", "1", "-o", "json"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return float(json.loads(completed.stdout)[0]["avg_ts"])


def llmrun_tg(model: Path, threads: int, env: dict[str, str]) -> tuple[float, int]:
    """One `llmrun run`: generation tokens/s over 128 decodes, and the prompt's length in tokens."""
    completed = subprocess.run(
        [str(LLMRUN), "run", str(model), PROMPT, "--json", "--ignore-eos", "-n", str(N_GEN + 1),
         "-t", "0", "--threads", str(threads), "--ctx", "256"],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    data = json.loads(completed.stdout)
    assert data["completion_tokens"] == N_GEN + 1, data
    return float(data["timings"]["generation_tokens_per_s"]), int(data["prompt_tokens"])


def wall_times(args: list[str], env: dict[str, str], repetitions: int) -> list[float]:
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        subprocess.run([str(LLMRUN), *args], check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - start)
    return times


def synthetic_model(spec: str, cache: Path) -> Path:
    from synthetic_gguf import PRESETS, quantize, write_model

    preset, _, quant = spec.partition(":")
    quant = quant or "Q4_0"
    target = cache / f"synthetic-{preset}-{quant}.gguf"
    if not target.exists():
        f16 = cache / f"synthetic-{preset}-f16.gguf"
        write_model(f16, PRESETS[preset], float_type="f16")
        quantize(f16, target, quant)
        f16.unlink()
    return target


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):8.2f} ± {sd:5.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="default: llmrun's default (physical cores)")
    parser.add_argument("-r", "--repetitions", type=int, default=5)
    parser.add_argument(
        "--synthetic", action="append", default=[], metavar="PRESET:QUANT", help="e.g. 0.5b:Q4_0, 1b:Q4_0"
    )
    parser.add_argument("--no-smollm2", action="store_true")
    args = parser.parse_args()

    from llmrun.machine import physical_cores

    threads = args.threads or physical_cores()
    cache = ROOT / ".cache" / "models"
    cache.mkdir(parents=True, exist_ok=True)
    models = ([] if args.no_smollm2 else [smollm2_path()]) + [synthetic_model(spec, cache) for spec in args.synthetic]
    bin_dir = native_bin_dir()
    home = Path(tempfile.mkdtemp(prefix="llmrun-bench-"))
    env = {**os.environ, "LLMRUN_HOME": str(home)}

    print(f"generation, tg{N_GEN}, {threads} threads, {args.repetitions} runs each (mean ± sd tokens/s)")
    print(f"{'model':<44} {'native llama.cpp':>18} {'llmrun run':>18} {'ratio':>7}")
    for model in models:
        _, depth = llmrun_tg(model, threads, env)  # warm-up (page cache, CPU frequency); the prompt's length
        native, ours = [], []
        for _ in range(args.repetitions):
            native.append(native_tg(bin_dir, model, threads, depth))
            ours.append(llmrun_tg(model, threads, env)[0])
        ratio = statistics.mean(ours) / statistics.mean(native)
        print(f"{model.name:<44} {mean_sd(native):>18} {mean_sd(ours):>18} {ratio:7.3f}")

    print("\nstart-up, wall seconds over 20 runs (median, max); target < 0.15 s")
    subprocess.run(
        [str(LLMRUN), "import", str(models[0]), "--name", "bench", "--link"], check=True, capture_output=True, env=env
    )
    for command in (["--help"], ["list"]):
        times = wall_times(command, env, 20)
        print(f"  llmrun {' '.join(command):<8} median {statistics.median(times):.3f}  max {max(times):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
