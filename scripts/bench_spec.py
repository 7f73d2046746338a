#!/usr/bin/env python3
"""Benchmark speculative decoding: `llmrun serve --lookup` against llama-server's n-gram drafts, or
`llmrun serve --draft` against llama-server's draft model (`--draft DRAFT.gguf`).

One streaming chat client at a time, greedy (temperature 0, repeat penalty 1), a fixed
`max_tokens`, the same model file, threads, context and one slot everywhere; four servers
per model, started once and kept up for every round. Prompt lookup (the default):

  * llmrun:              `llmrun serve MODEL --parallel 1 --ctx CTX --threads T --no-log`;
  * llmrun --lookup:     the same with `--lookup --draft-max D` (default 16);
  * llama-server:        `llama-server -m MODEL -np 1 -c CTX -t T -tb T`, built from the llama.cpp
                         vendored in llama-cpp-python's sdist (scripts/build_native.sh);
  * llama-server ngram:  the same with `--spec-type ngram-simple` and drafts of at most D tokens
                         (`--spec-ngram-simple-size-m D`; `--spec-draft-n-max` only bounds
                         draft-model types). ngram-simple is prompt lookup: the last n tokens
                         (n = 12 by default) are looked up in prompt + generated text and what
                         followed their latest earlier occurrence is the draft. `--native-spec`
                         picks another n-gram type, `--native-ngram-n` the lookup length.

With `--draft DRAFT.gguf` (a small model with the same vocabulary) the speculating two are

  * llmrun --draft:      `llmrun serve MODEL ... --draft DRAFT.gguf --draft-max D`;
  * llama-server -md:    `llama-server ... -md DRAFT.gguf --spec-type draft-simple --spec-draft-n-max D
                         -td T -tbd T` (without --spec-type this build loads the draft and never uses
                         it; the draft's context is the main model's -c, it has no option of its own).

A model the draft cannot serve (another vocabulary: llmrun refuses it) is skipped, with llmrun's
reason in the report.

Flash attention is left at each server's default (auto). Prompts, as chat messages:
input-grounded ones a model can copy from (repeat: a ~330-token excerpt of
llmrun/engine/scheduler.py copied back; edit: the same with one identifier renamed;
extract: a made-up invoice returned as JSON with values verbatim) and free-form ones
(story, explain). Each server first answers the same short warm-up request (not measured;
a speculating llmrun also learns what its verify decodes cost as it goes). Each round sends every
prompt to every server in turn (odd rounds in the other order), so drift in the machine's
load hits all of them alike. From round 2 on a server may find the prompt in its cache (all
of them can): time to first token falls, generation speed does not depend on it. The
repeat penalty is set to 1 in every request (llmrun's own default is 1.1, llama-server's 1).

Per request: time to first token, generation tokens/s = (completion_tokens - 1) / (time of the
last content chunk - time of the first), completion_tokens from the usage chunk, and the drafts:
tokens accepted / guessed, from llama-server's `timings.draft_n` / `draft_n_accepted` and llmrun's
`usage.completion_tokens_details.accepted_prediction_tokens` / `rejected_prediction_tokens`.
The report has medians over rounds, the speed ratios, and whether each server's greedy text is the
same with and without speculation (as it should be; past ~256 tokens of context llama.cpp's flash
attention kernels may let batched verify rows round differently).
The two engines' plain greedy answers may part at a near-tie (the same model, rounded differently),
and from there each follows its own text: one that starts looping early gives n-gram lookup far
more to guess than one that loops late. The `llmrun = llama-server` column says where their plain
answers part; a lookup / llama-server ratio compares like for like only as far as they agree.
`scripts/spec_ceiling.py` measures the most any speculation can gain here (every guess right).

    python scripts/bench_spec.py                                  # both models, 3 rounds
    python scripts/bench_spec.py --model .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --rounds 1 --max-tokens 48 --prompts repeat,story         # a quick look
    python scripts/bench_spec.py --native-spec ngram-map-k --json spec.json
    python scripts/bench_spec.py --model BIG.gguf --draft SMALL.gguf --draft-max 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_run import native_bin_dir  # noqa: E402
from bench_serve import LLMRUN, Server, free_port, started  # noqa: E402

from llmrun.machine import physical_cores  # noqa: E402

CACHE = ROOT / ".cache" / "models"
MODELS = (CACHE / "SmolLM2-135M-Instruct.Q4_1.gguf", CACHE / "synthetic-1b-Q4_0.gguf")
DRAFT_MAX = 16
# llama-server's n-gram speculation types, and the options that set their draft length and lookup length.
NATIVE_SPEC = {
    "ngram-simple": ("--spec-ngram-simple-size-m", "--spec-ngram-simple-size-n"),
    "ngram-map-k": ("--spec-ngram-map-k-size-m", "--spec-ngram-map-k-size-n"),
    "ngram-map-k4v": ("--spec-ngram-map-k4v-size-m", "--spec-ngram-map-k4v-size-n"),
    "ngram-mod": ("--spec-ngram-mod-n-max", "--spec-ngram-mod-n-match"),
    "ngram-cache": ("", ""),  # drafts of 8 tokens, not configurable
}


@dataclass(frozen=True)
class Mode:
    """How the two speculating servers guess tokens: by prompt lookup (the default) or with a draft model."""

    kind: str  # "lookup" or "draft"
    systems: tuple[str, str, str, str]  # the servers' names: llmrun, llmrun speculating, llama-server, its speculating
    llmrun_args: tuple[str, ...]  # what makes llmrun speculate
    native_args: tuple[str, ...]  # what makes llama-server speculate
    title: str


def mode_for(args: argparse.Namespace) -> Mode:
    """Prompt lookup, or with ``args.draft`` the draft model, for both servers."""
    draft_max = str(args.draft_max)
    if args.draft is None:
        ngram = native_spec_args(args.native_spec, args.draft_max, args.native_ngram_n)
        return Mode("lookup", ("llmrun", "llmrun --lookup", "llama-server", f"llama-server {args.native_spec}"),
                    ("--lookup", "--draft-max", draft_max), tuple(ngram),
                    f"Prompt lookup: llmrun serve --lookup vs llama-server --spec-type {args.native_spec}")  # fmt: skip
    name = args.draft.name
    threads = str(args.threads)
    # This build needs --spec-type: a -md alone is loaded and never drafts (its type stays none). The draft
    # gets the main model's threads with -td/-tbd (their default too) and its context (-c: there is no
    # draft context option). --spec-draft-n-min (0) and --spec-draft-p-min (0.00) stay at their defaults.
    native = ("-md", str(args.draft), "--spec-type", "draft-simple", "--spec-draft-n-max", draft_max, "-td", threads,
              "-tbd", threads)  # fmt: skip
    title = f"Draft model: llmrun serve --draft {name} vs llama-server -md {name} --spec-type draft-simple"
    return Mode("draft", ("llmrun", f"llmrun --draft {name}", "llama-server", f"llama-server -md {name}"),
                ("--draft", str(args.draft), "--draft-max", draft_max), native, title)  # fmt: skip


# A fixed excerpt of llmrun/engine/scheduler.py (so the prompt does not change with the code).
CODE = '''def _common_prefix(cached: list[int] | tuple[int, ...], prompt: tuple[int, ...]) -> int:
    length = 0
    for cached_token, prompt_token in zip(cached, prompt, strict=False):
        if cached_token != prompt_token:
            break
        length += 1
    return length


class HostCache:
    """Slots' KV caches saved in host memory when a new request takes their slot, up to ``budget`` bytes.

    A later prompt that starts like a saved one (a conversation's next turn, after its slot
    went to another) gets it back into a slot in a copy, instead of evaluating it again: as
    llama-server's ``--cache-ram``. The least recently used entries go first.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.entries: OrderedDict[tuple[int, ...], ctypes.Array[ctypes.c_uint8]] = OrderedDict()

    def best(self, prompt: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
        """The saved tokens sharing the longest prefix with ``prompt``, and that length."""
        best: tuple[tuple[int, ...], int] = ((), 0)
        for tokens in self.entries:
            shared = _common_prefix(tokens, prompt)
            if shared > best[1]:
                best = (tokens, shared)
        return best
'''

INVOICE = """INVOICE

Invoice number: INV-2024-08817
Issue date: 14 March 2024
Due date: 13 April 2024

Seller: Harbourview Marine Supplies Ltd., 42 Quay Street, Portsmouth PO1 3AX, United Kingdom
Buyer: Northwind Sailing Club, attn. Margaret Ellison, 7 Lighthouse Lane, Falmouth TR11 4NQ
Buyer account: NSC-00394

Items:
1. Stainless steel shackle, 10 mm, quantity 24, unit price GBP 3.85, amount GBP 92.40
2. Braided mooring line, 16 mm x 25 m, quantity 6, unit price GBP 48.50, amount GBP 291.00
3. Inflatable fender F4, blue, quantity 8, unit price GBP 36.75, amount GBP 294.00

Subtotal: GBP 677.40
VAT (20%): GBP 135.48
Shipping: GBP 24.00
Total due: GBP 836.88

Payment terms: net 30 days, bank transfer only
Bank: Solent Commercial Bank, sort code 40-12-76, account 61839924
Notes: Fenders ship separately from the Southampton warehouse; expect delivery within 5 working days.
"""

EDIT = (
    "Rename the function `_common_prefix` to `shared_prefix_length` in this code and print the whole code, "
    f"changed nowhere else:\n\n```python\n{CODE}```"
)
EXTRACT = f"Return the fields of this invoice as a JSON object, with every value copied verbatim:\n\n{INVOICE}"
# Something to copy, so a speculating server has decoded a few guesses before anything is measured.
WARM_UP = [{"role": "user", "content": "Say this twice: the quick brown fox jumps over the lazy dog."}]
PROMPTS: dict[str, list[dict[str, str]]] = {
    "repeat": [
        {"role": "system", "content": "You copy text exactly."},
        {"role": "user", "content": f"```python\n{CODE}```"},
    ],
    "edit": [{"role": "user", "content": EDIT}],
    "extract": [{"role": "user", "content": EXTRACT}],
    "story": [{"role": "user", "content": "Write a story about a lighthouse keeper."}],
    "explain": [{"role": "user", "content": "Explain how a hash table works."}],
}


@dataclass
class Reply:
    """One streamed chat completion, as measured by the client."""

    ttft_s: float
    tok_s: float | None  # generation speed after the first token; None under two tokens
    wall_s: float
    prompt_tokens: int
    completion_tokens: int
    text: str
    server_tok_s: float | None = None  # llama-server's own timings.predicted_per_second
    # Tokens guessed and accepted: llama-server's timings.draft_n / draft_n_accepted, llmrun's usage
    # completion_tokens_details (both leave them out when nothing was guessed: 0); None where nothing speculates.
    draft_n: int | None = None
    draft_accepted: int | None = None


class HealthServer(Server):
    """A bench_serve Server that is ready when `/health` answers 200, then asks for the name to use."""

    def ready(self) -> bool:
        if httpx.get(f"{self.url}/health", timeout=5).status_code != 200:
            return False
        self.model = _served_model(self.url) or self.model
        return True


# What llmrun says of a draft it cannot use: "error: D cannot draft for M: ..." or "warning: ...; serving M without
# speculation" (when it serves the model anyway).
REFUSALS = ("cannot draft", "without speculation")


class DraftRefused(Exception):
    """llmrun --draft did not start, or serves without its draft: the model's benchmark is skipped."""


class DraftServer(HealthServer):
    """`llmrun serve --draft`: a draft it cannot use for the model (another vocabulary) ends this model's run."""

    def start(self, timeout_s: float = 300) -> None:
        try:
            super().start(timeout_s)
        except RuntimeError as error:
            self.stop()
            why = _refusal(str(error), (*REFUSALS, "error:", "Error:")) or str(error).splitlines()[0]
            raise DraftRefused(why) from error
        self.log.seek(0)  # the log's end, where the server goes on writing, is where reading it stops
        warning = _refusal(self.log.read().decode(errors="replace"), REFUSALS)
        if warning is not None:  # an llmrun that warns and serves the model without speculation
            self.stop()
            raise DraftRefused(warning)


def _refusal(log: str, markers: tuple[str, ...]) -> str | None:
    """The first line of ``log`` with one of ``markers`` (the earlier markers first), if any."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for marker in markers:
        found = [line for line in lines if marker in line]
        if found:
            return found[0]
    return None


def _served_model(url: str) -> str | None:
    with contextlib.suppress(httpx.HTTPError, KeyError, IndexError, ValueError):
        return str(httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"])
    return None


def native_dir() -> Path:
    """llama-server's folder: the vendored build for the installed llama-cpp-python, built if missing."""
    import importlib.metadata

    version = importlib.metadata.version("llama-cpp-python")
    built = ROOT / ".cache" / "native" / f"llama_cpp_python-{version}" / "build" / "bin"
    return built if (built / "llama-server").exists() else native_bin_dir()


def native_spec_args(kind: str, draft_max: int, ngram_n: int | None) -> list[str]:
    size_option, lookup_option = NATIVE_SPEC[kind]
    args = ["--spec-type", kind, "--spec-draft-n-max", str(draft_max)]
    if size_option:
        args += [size_option, str(draft_max)]
    if kind == "ngram-mod":  # it drafts nothing shorter than n-min (default 48 of n-max 64): keep that ratio
        args += ["--spec-ngram-mod-n-min", str(max(1, draft_max * 3 // 4))]
    if ngram_n is not None and lookup_option:
        args += [lookup_option, str(ngram_n)]
    return args


def servers_for(model: Path, args: argparse.Namespace, mode: Mode, bin_dir: Path, home: Path) -> list[Server]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLMRUN_")}
    env["LLMRUN_HOME"] = str(home)
    ours = [str(LLMRUN), "serve", str(model), "--parallel", "1", "--ctx", str(args.ctx), "--threads", str(args.threads),
            "--no-log"]  # fmt: skip
    native_env = {**os.environ, "LD_LIBRARY_PATH": str(bin_dir)}
    name = model.stem.lower()
    servers: list[Server] = []
    for index, system in enumerate(mode.systems):
        port = free_port()
        speculating = index % 2 == 1
        if index < 2:
            command = [*ours, "--port", str(port), *(mode.llmrun_args if speculating else ())]
            kind = DraftServer if speculating and mode.kind == "draft" else HealthServer
            servers.append(kind(system, command, env, name, port))
        else:
            native = [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                      "-np", "1", "-c", str(args.ctx), "-t", str(args.threads), "-tb", str(args.threads),
                      "--alias", name, "--no-webui", *(mode.native_args if speculating else ())]  # fmt: skip
            servers.append(HealthServer(system, native, native_env, name, port))
    return servers


def chat(client: httpx.Client, server: Server, messages: list[dict[str, str]], max_tokens: int,
         speculating: bool) -> Reply:  # fmt: skip
    """One greedy streaming chat completion, timed chunk by chunk."""
    body = {"model": server.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "repeat_penalty": 1.0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    parts: list[str] = []
    first: float | None = None
    last: float | None = None
    usage: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    started_at = time.perf_counter()
    with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            usage = data.get("usage") or usage
            timings = data.get("timings") or timings
            for choice in data.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if content:
                    last = time.perf_counter()
                    first = first or last
                    parts.append(content)
    done = time.perf_counter()
    tokens = int(usage.get("completion_tokens") or len(parts))
    span = (last or 0.0) - (first or 0.0)
    details = usage.get("completion_tokens_details") or {}
    drafts: tuple[int | None, int | None] = (None, None)
    if "accepted_prediction_tokens" in details:  # llmrun
        accepted = int(details["accepted_prediction_tokens"])
        drafts = (accepted + int(details.get("rejected_prediction_tokens") or 0), accepted)
    elif "draft_n" in timings:  # llama-server
        drafts = (int(timings["draft_n"]), int(timings.get("draft_n_accepted", 0)))
    elif speculating:  # neither says anything when nothing was guessed
        drafts = (0, 0)
    return Reply(ttft_s=(first or done) - started_at, tok_s=(tokens - 1) / span if tokens > 1 and span > 0 else None,
                 wall_s=done - started_at, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                 completion_tokens=tokens, text="".join(parts),
                 server_tok_s=timings.get("predicted_per_second"), draft_n=drafts[0],
                 draft_accepted=drafts[1])  # fmt: skip


def bench_model(model: Path, args: argparse.Namespace, mode: Mode, bin_dir: Path) -> dict[str, Any]:
    """Every server up at once (an idle one uses no CPU); each prompt goes to each server in turn, round by round.

    With a draft model, llmrun --draft starts first: if it cannot use the draft for this model, nothing else
    starts and the result has ``skipped``, llmrun's reason.
    """
    results: dict[str, dict[str, list[Reply]]] = {}
    notes: list[str] = []
    speculating = set(mode.systems[1::2])
    width = max(len(system) for system in mode.systems)
    with tempfile.TemporaryDirectory(prefix="llmrun-bench-spec-") as home:
        servers = servers_for(model, args, mode, bin_dir, Path(home))
        commands = {server.name: " ".join(server.command) for server in servers}
        start_order = sorted(servers, key=lambda server: not isinstance(server, DraftServer))  # llmrun --draft first
        # A new connection per request: a kept-alive one can be closed by llama-server (5 s idle) as it is reused.
        no_keep_alive = httpx.Limits(max_keepalive_connections=0)
        try:
            with started(start_order, notes) as up, httpx.Client(timeout=900, limits=no_keep_alive) as client:
                running = [server for server in servers if any(server is one for one in up)]  # in mode.systems' order
                for server in running:  # the same short request first: nothing measured pays for first-use costs
                    _request(client, server, WARM_UP, 32, "warm-up", notes, server.name in speculating)
                for round_index in range(args.rounds):
                    order = running if round_index % 2 == 0 else running[::-1]
                    for prompt in args.prompts:
                        for server in [server for server in order if server.process is not None]:
                            what = f"{prompt} round {round_index + 1}"
                            reply = _request(client, server, PROMPTS[prompt], args.max_tokens, what, notes,
                                             server.name in speculating)  # fmt: skip
                            if reply is None:
                                continue
                            results.setdefault(server.name, {}).setdefault(prompt, []).append(reply)
                            print(f"  round {round_index + 1} {prompt:<8} {server.name:<{width}} "
                                  f"{_fmt(reply.tok_s, 7)} tok/s  TTFT {reply.ttft_s:.3f}s  {reply.completion_tokens} "
                                  f"tokens{_acceptance([reply])}", flush=True)  # fmt: skip
        except DraftRefused as refused:  # every server is stopped already
            print(f"  skipped: {refused}", flush=True)
            return {"commands": commands, "results": {}, "notes": notes, "skipped": str(refused)}
    return {"commands": commands, "results": results, "notes": notes}


def _request(client: httpx.Client, server: Server, messages: list[dict[str, str]], max_tokens: int, what: str,
             notes: list[str], speculating: bool) -> Reply | None:  # fmt: skip
    """``chat``, with a failure noted instead of raised; a server that died is stopped and left out from then on."""
    try:
        return chat(client, server, messages, max_tokens, speculating)
    except httpx.HTTPError as error:
        note = f"{server.name}: {what}: {type(error).__name__}: {error}"
        if server.process is not None and server.process.poll() is not None:
            server.log.seek(0)
            tail = server.log.read().decode(errors="replace").strip().splitlines()[-3:]
            note += f"; it exited with {server.process.returncode}: " + " / ".join(tail)
            server.stop()  # process None: skipped from now on
        notes.append(note)
        print(f"  {note}", flush=True)
        return None


def _fmt(value: float | None, width: int = 0, digits: int = 1) -> str:
    return "-".rjust(width) if value is None else f"{value:{width}.{digits}f}"


def _acceptance(replies: list[Reply]) -> str:
    """Draft tokens accepted / drafted, over all the replies ('' where nothing speculates)."""
    if not any(reply.draft_n is not None for reply in replies):
        return ""
    drafted = sum(reply.draft_n or 0 for reply in replies)
    accepted = sum(reply.draft_accepted or 0 for reply in replies)
    return f"  drafts {accepted}/{drafted}" + (f" ({100 * accepted / drafted:.0f}%)" if drafted else "")


def median_tok_s(replies: list[Reply]) -> float | None:
    speeds = [reply.tok_s for reply in replies if reply.tok_s is not None]
    return statistics.median(speeds) if speeds else None


def ratio(mine: float | None, theirs: float | None) -> str:
    return f"{mine / theirs:.2f}x" if mine is not None and theirs else "-"


def same_text(first: list[Reply], second: list[Reply]) -> str:
    """'same' when every round's texts match; else where the first difference starts."""
    if not first or not second:
        return "-"
    for one, other in zip(first, second, strict=False):
        if one.text != other.text:
            at = next((i for i, (a, b) in enumerate(zip(one.text, other.text, strict=False)) if a != b),
                      min(len(one.text), len(other.text)))  # fmt: skip
            return f"DIFFERENT (char {at})"
    return "same"


def report(model: Path, data: dict[str, Any], args: argparse.Namespace, mode: Mode) -> list[str]:
    results: dict[str, dict[str, list[Reply]]] = data["results"]
    heads = list(mode.systems)
    ours, theirs, kind = heads[1], heads[3], mode.kind  # kind: "lookup" or "draft"
    lines = [f"\n## {model.name}\n"]
    if "skipped" in data:
        return [*lines, f"skipped: {data['skipped']}", *(f"note: {note}" for note in data["notes"])]
    columns = ["prompt", "tokens", *(f"{head} tok/s" for head in heads), f"{kind} / plain", f"{kind} / {theirs}",
               "llmrun / llama-server", f"{theirs} / llama-server", f"{ours} drafts accepted",
               f"{theirs} drafts accepted", f"llmrun plain = {kind}", f"llama-server plain = {kind}",
               "llmrun = llama-server"]  # fmt: skip
    lines += ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    ttft_lines = ["\nTime to first token, median (s):\n", "| prompt | " + " | ".join(heads) + " |", "|---" * 5 + "|"]
    for prompt in args.prompts:
        replies = [results.get(system, {}).get(prompt, []) for system in mode.systems]
        speeds = [median_tok_s(system_replies) for system_replies in replies]
        counts = sorted({reply.completion_tokens for system_replies in replies for reply in system_replies})
        tokens = "/".join(str(count) for count in counts) or "-"
        cells = [prompt, tokens, *(_fmt(speed) for speed in speeds), ratio(speeds[1], speeds[0]),
                 ratio(speeds[1], speeds[3]), ratio(speeds[0], speeds[2]), ratio(speeds[3], speeds[2]),
                 _acceptance(replies[1]).replace("  drafts ", "") or "-",
                 _acceptance(replies[3]).replace("  drafts ", "") or "-", same_text(replies[0], replies[1]),
                 same_text(replies[2], replies[3]), same_text(replies[0], replies[2])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
        ttfts = [_fmt(statistics.median(r.ttft_s for r in system_replies), 0, 3) if system_replies else "-"
                 for system_replies in replies]  # fmt: skip
        ttft_lines.append(f"| {prompt} | " + " | ".join(ttfts) + " |")
    lines += ttft_lines
    if args.rounds > 1:  # the same prompt in the same round: pairs the machine's drift does not split
        paired = []
        for prompt in args.prompts:
            pairs = zip(results.get(ours, {}).get(prompt, []), results.get("llmrun", {}).get(prompt, []),
                        strict=False)  # fmt: skip
            paired.append(f"{prompt} " + " ".join(ratio(mine.tok_s, plain.tok_s) for mine, plain in pairs))
        lines.append(f"\nllmrun {kind} / plain tok/s, round by round: " + "; ".join(paired))
    lines += [f"note: {note}" for note in data["notes"]]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", default=[], help="a GGUF file (default: both models)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=physical_cores(), help="default: physical cores")
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--prompts", type=lambda text: text.split(","), default=list(PROMPTS),
                        help=f"comma-separated, of {','.join(PROMPTS)}")  # fmt: skip
    parser.add_argument("--draft-max", type=int, default=DRAFT_MAX, help="most tokens guessed at once, both servers")
    parser.add_argument(
        "--draft",
        type=Path,
        default=None,
        help="speculate with this draft model (llmrun --draft, llama-server -md) instead of by prompt lookup",
    )
    parser.add_argument(
        "--native-spec",
        choices=list(NATIVE_SPEC),
        default=None,
        help="llama-server's n-gram speculation type (default: ngram-simple, i.e. prompt lookup); not with --draft",
    )
    parser.add_argument(
        "--native-ngram-n",
        type=int,
        default=None,
        help="llama-server's lookup n-gram length (default: its own, 12 for ngram-simple); not with --draft",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    unknown = [prompt for prompt in args.prompts if prompt not in PROMPTS]
    if unknown:
        parser.error(f"unknown prompts {','.join(unknown)}; choose among {','.join(PROMPTS)}")
    if args.draft is not None:
        if args.native_spec is not None or args.native_ngram_n is not None:
            parser.error("--native-spec and --native-ngram-n are for prompt lookup, not with --draft")
        if not args.draft.is_file():
            parser.error(f"--draft {args.draft}: no such file")
    else:
        args.native_spec = args.native_spec or "ngram-simple"
    mode = mode_for(args)
    models = args.model or [model for model in MODELS if model.exists()]
    bin_dir = native_dir()
    lines = [f"# {mode.title}: {args.threads} threads, ctx {args.ctx}, 1 slot, greedy, max {args.max_tokens} tokens, "
             f"drafts up to {args.draft_max}, {args.rounds} rounds (medians)"]  # fmt: skip
    raw: dict[str, Any] = {}
    for model in models:
        print(model.name, flush=True)
        data = bench_model(model, args, mode, bin_dir)
        lines += report(model, data, args, mode)
        raw[model.name] = {**data, "results": {system: {prompt: [asdict(reply) for reply in replies]
                                                        for prompt, replies in prompts.items()}
                                               for system, prompts in data["results"].items()}}  # fmt: skip
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "models": raw}, indent=2, default=str))
    return 0


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM as Ctrl-C: the servers are stopped on the way out."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the servers are stopped already
        sys.exit(130)
