#!/usr/bin/env python3
"""The most speculative decoding can gain on this machine: every guess right.

Speculation verifies D guessed tokens as extra rows of one ``llama_decode`` (logits at every
row, each row sampled); with every guess right, one decode of D + 1 rows emits D + 1 tokens.
This script times exactly that against plain decoding (one row per decode), for the same
tokens at the same depth, with llama.cpp called directly through llama-cpp-python's C API (no
llmrun code, no Python-side logits copies, no guessing cost: the guesses are the plain answer
itself). Whatever any implementation does on top, prompt lookup or a draft model, llmrun's or
llama-server's, it cannot go faster than this ratio; with misses it goes slower.

    python scripts/spec_ceiling.py                       # SmolLM2, drafts of 4, 8, 16, 32
    python scripts/spec_ceiling.py --model .cache/models/synthetic-1b-Q4_0.gguf --tokens 128
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import llama_cpp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmrun.machine import physical_cores  # noqa: E402

MODEL = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)  # llama.cpp's load log, unwanted here


def run(ctx: llama_cpp.llama_context_p, batch: llama_cpp.llama_batch, prompt: list[int], answer: list[int],
        rows: int) -> float:  # fmt: skip
    """Seconds to decode ``answer`` after ``prompt``, ``rows`` tokens per decode, sampling every row greedily."""
    memory = llama_cpp.llama_get_memory(ctx)
    llama_cpp.llama_memory_clear(memory, True)
    sampler = llama_cpp.llama_sampler_init_greedy()

    def decode(tokens: list[int], position: int, logits_all: bool) -> None:
        for index, token in enumerate(tokens):
            batch.token[index] = token
            batch.pos[index] = position + index
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = 0
            batch.logits[index] = logits_all or index == len(tokens) - 1
        batch.n_tokens = len(tokens)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    for start in range(0, len(prompt), 512):
        decode(prompt[start : start + 512], start, False)
    started = time.perf_counter()
    for start in range(0, len(answer), rows):
        chunk = answer[start : start + rows]
        decode(chunk, len(prompt) + start, True)
        for index in range(len(chunk)):
            llama_cpp.llama_sampler_sample(sampler, ctx, index)
    elapsed = time.perf_counter() - started
    llama_cpp.llama_sampler_free(sampler)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--tokens", type=int, default=256, help="answer length")
    parser.add_argument("--prompt-tokens", type=int, default=350, help="depth the answer starts at")
    parser.add_argument("--drafts", type=lambda text: [int(n) for n in text.split(",")], default=[4, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"no model at {args.model}; run scripts/fetch_smollm2.py or scripts/synthetic_gguf.py")

    llama_cpp.llama_log_set(QUIET, None)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(args.model).encode(), params)
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = 4096
    cparams.n_batch = cparams.n_ubatch = 512
    cparams.n_threads = cparams.n_threads_batch = args.threads
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    text = b"def common_prefix(cached, prompt):\n    length = 0\n" * 40
    tokens = (ctypes.c_int32 * 4096)()
    count = llama_cpp.llama_tokenize(vocab, text, len(text), tokens, 4096, True, False)
    ids = [tokens[i] % n_vocab for i in range(count)]
    prompt = ids[: args.prompt_tokens]
    answer = (ids * (1 + args.tokens // len(ids)))[: args.tokens]

    run(ctx, batch, prompt, answer[:32], 1)  # warm-up
    seconds: dict[int, list[float]] = {rows: [] for rows in [1, *[d + 1 for d in args.drafts]]}
    for _ in range(args.rounds):
        for rows in seconds:
            seconds[rows].append(run(ctx, batch, prompt, answer, rows))
    plain = statistics.median(seconds[1])
    print(f"{args.model.name}, {args.threads} threads, {args.tokens} tokens after {len(prompt)}, "
          f"median of {args.rounds} rounds")  # fmt: skip
    print("| guessed per decode | rows | tok/s | vs plain | one decode vs one row |")
    print("|---|---|---|---|---|")
    for rows, times in seconds.items():
        median = statistics.median(times)
        steps = -(-args.tokens // rows)
        print(f"| {rows - 1} | {rows} | {args.tokens / median:.1f} | {plain / median:.2f}x | "
              f"{(median / steps) / (plain / args.tokens):.2f}x |")  # fmt: skip
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
