#!/usr/bin/env python3
"""Benchmark `llmrun chat` time to first token on turn 10 against turn 1.

A scripted conversation of 10 messages is piped into `llmrun chat` (the same REPL code
path as a terminal session); each turn's time to first token is read back from the log
(`llmrun logs --json`). Because the conversation stays in the KV cache, turn 10 should
evaluate only its new message; target: within 1.3x of turn 1. For contrast, the script
also prints what turn 10 costs when its whole prompt must be evaluated (the same prompt
sent as a fresh `llmrun run`).

    python scripts/bench_chat.py -r 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from fetch_smollm2 import smollm2_path  # noqa: E402

LLMRUN = Path(sys.executable).with_name("llmrun")
MESSAGES = [
    "Tell me about the history of bread.",
    "How is sourdough different?",
    "What flour should I use?",
    "How long should the dough rise?",
    "What temperature should the oven be?",
    "How do I know when it is done?",
    "How should I store the bread?",
    "Can I freeze it?",
    "What goes well with fresh bread?",
    "Summarise our conversation in one sentence.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("-n", "--max-tokens", type=int, default=64)
    args = parser.parse_args()
    model = smollm2_path()
    first, last, prompt_tokens = [], [], []
    for _ in range(args.repetitions):
        home = Path(tempfile.mkdtemp(prefix="llmrun-bench-chat-"))
        env = {**os.environ, "LLMRUN_HOME": str(home)}
        subprocess.run([str(LLMRUN), "import", str(model), "--name", "smollm2", "--link"], check=True, env=env,
                       capture_output=True)  # fmt: skip
        subprocess.run(
            [str(LLMRUN), "chat", "smollm2", "-t", "0", "-n", str(args.max_tokens)],
            input="\n".join(MESSAGES) + "\n", text=True, check=True, env=env, capture_output=True,
        )  # fmt: skip
        logged = json.loads(subprocess.run([str(LLMRUN), "logs", "-n", "0", "--json"], check=True, env=env,
                                           capture_output=True, text=True).stdout)  # fmt: skip
        assert len(logged) == len(MESSAGES), logged
        first.append(logged[0]["time_to_first_token_s"])
        last.append(logged[-1]["time_to_first_token_s"])
        prompt_tokens.append(logged[-1]["prompt_tokens"])

    # The same turn-10 prompt evaluated from scratch, for contrast.
    cold = []
    filler = "word " * (prompt_tokens[0] - 1)
    for _ in range(args.repetitions):
        result = subprocess.run(
            [str(LLMRUN), "run", str(model), "--raw", "-n", "1", "--json", "--no-log", filler],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        cold.append(json.loads(result.stdout)["timings"]["time_to_first_token_s"])

    mean = statistics.mean
    print(f"chat with SmolLM2, {len(MESSAGES)} turns of up to {args.max_tokens} tokens, {args.repetitions} runs")
    print(f"  time to first token, turn 1   {mean(first) * 1000:7.1f} ms")
    print(f"  time to first token, turn 10  {mean(last) * 1000:7.1f} ms   ({prompt_tokens[0]} prompt tokens)")
    print(f"  ratio turn 10 / turn 1        {mean(last) / mean(first):7.2f}   (target <= 1.3)")
    print(f"  a {prompt_tokens[0]}-token prompt evaluated cold: {mean(cold) * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
