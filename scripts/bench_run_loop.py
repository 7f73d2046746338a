#!/usr/bin/env python3
"""A shell loop of `llmrun run` over many short prompts: the model loaded every time vs once, by a server.

The same bash loop runs twice (interleaved, in alternating order, over --rounds rounds):

    for i in $(seq N); do llmrun run MODEL "PROMPT $i" -n 8 -t 0 > /dev/null; done               # in-process
    for i in $(seq N); do llmrun run MODEL "PROMPT $i" -n 8 -t 0 --server URL > /dev/null; done  # through serve

against one `llmrun serve MODEL` started beforehand (its start is not counted: it is paid once).
Reported: wall time of each loop, seconds per prompt, and the ratio (issue #11). Default model:
a synthetic ~1B Q4_0 llama (its load is what a loop pays each time; its text is noise).

    python scripts/bench_run_loop.py                   # 100 prompts, synthetic 1B Q4_0, 1 round
    python scripts/bench_run_loop.py --prompts 20 --model .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_run import synthetic_model  # noqa: E402
from bench_serve import LLMRUN, Server, free_port  # noqa: E402

PROMPT = "Give a one-line title for note number"
N_GEN = 8


def loop(count: int, model: str, extra: list[str], env: dict[str, str]) -> float:
    """Wall time of a bash loop of ``count`` runs."""
    command = " ".join(shlex.quote(part) for part in [str(LLMRUN), "run", model])
    options = " ".join(shlex.quote(part) for part in ["-n", str(N_GEN), "-t", "0", "--no-log", *extra])
    script = f'for i in $(seq {count}); do {command} "{PROMPT} $i" {options} > /dev/null || exit 1; done'
    began = time.perf_counter()
    subprocess.run(["bash", "-c", script], env=env, check=True)
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a GGUF file (default: a synthetic 1B Q4_0 llama)")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    model = args.model or synthetic_model("1b:Q4_0", ROOT / ".cache" / "models")
    home = Path(tempfile.mkdtemp(prefix="bench-run-loop-"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMRUN_")}
    env["LLMRUN_HOME"] = str(home)
    name = "loop-model"
    subprocess.run([str(LLMRUN), "import", str(model), "--name", name, "--link"], env=env, check=True,
                   capture_output=True)  # fmt: skip
    port = free_port()
    server = Server("llmrun", [str(LLMRUN), "serve", name, "--port", str(port), "--parallel", "1", "--no-log"],
                    env, name, port)  # fmt: skip
    url = server.url
    try:
        server.start()
        here, there = [], []
        for number in range(args.rounds):
            order = [("here", []), ("there", ["--server", url])]
            for which, extra in order if number % 2 == 0 else order[::-1]:
                seconds = loop(args.prompts, name, extra, env)
                (here if which == "here" else there).append(seconds)
                print(f"round {number + 1}, {'in-process' if which == 'here' else 'through serve'}: {seconds:.1f} s",
                      flush=True)  # fmt: skip
    finally:
        server.stop()
    best_here, best_there = min(here), min(there)
    print(f"\n# {args.prompts} prompts through `llmrun run` in a bash loop: {model.name}, {N_GEN} tokens each "
          f"(best of {args.rounds})\n")  # fmt: skip
    print("| | loop (s) | per prompt (s) |")
    print("|---|---:|---:|")
    print(f"| in-process (loads the model each time) | {best_here:.1f} | {best_here / args.prompts:.3f} |")
    print(f"| `--server` (a running `llmrun serve`) | {best_there:.1f} | {best_there / args.prompts:.3f} |")
    print(f"\n`--server` is {best_here / best_there:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
