#!/usr/bin/env python3
"""Benchmark the store's read paths: `llmrun verify` against `sha256sum`, and `llmrun list` with 200 models.

Targets (from the store's issue):
  * `llmrun verify` of a model runs at disk/sha256 speed: its MB/s is at least 0.9x that of
    `sha256sum` on the same stored file, measured in one run;
  * `llmrun list` with 200 models in the store takes under 0.15 s (it checks sizes, never hashes).

In one run, in temporary stores (LLMRUN_HOME):
  * a big GGUF (default: .cache/models/synthetic-1b-Q4_0.gguf when there, else SmolLM2 from
    scripts/fetch_smollm2.py) is imported as `big`; after one untimed read of the stored file
    (so the page cache is warm for both), each round times `sha256sum files/<sha>/<file>` and
    `llmrun verify big` (whole commands, wall time), taking them in the other order every other
    round; min and median seconds and MB/s, and the ratio verify / sha256sum by each. Where
    `openssl` is installed, `openssl dgst -sha256` joins the rounds for reference: coreutils'
    sha256sum may be built without the CPU's SHA instructions that OpenSSL (and so Python's
    hashlib) uses, which makes it the slower of the two;
  * llmrun's start-up, to show how much of a gap is Python rather than hashing: `llmrun --version`,
    and `llmrun verify` of a store with one tiny model; and `sha256_of` in-process on the big file;
  * 200 models: one tiny synthetic GGUF imported, then 199 more manifests written beside its own
    (copies with another name, quoted into a file name as the store does), all naming the one
    stored file; `llmrun list --json` must show 200 models, all ok; then `llmrun list` in a pipe,
    and on an empty store for the start-up baseline.

A markdown table of the numbers ends the output (progress goes to stderr); --json prints them as JSON instead.

    python scripts/bench_store.py                       # 5 verify rounds, 10 list rounds
    python scripts/bench_store.py --rounds 3 --file model.gguf --json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from fetch_smollm2 import smollm2_path  # noqa: E402
from synthetic_gguf import write_model  # noqa: E402

from llmrun.store.store import sha256_of  # noqa: E402

LLMRUN = Path(sys.executable).with_name("llmrun")
DEFAULT_BIG = ROOT / ".cache" / "models" / "synthetic-1b-Q4_0.gguf"
N_MODELS = 200
VERIFY_TARGET = 0.9  # verify MB/s / sha256sum MB/s, at least
LIST_TARGET_S = 0.15  # median wall time of `llmrun list` with 200 models, under
MB = 1e6


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def home_env(home: Path) -> dict[str, str]:
    return {**os.environ, "LLMRUN_HOME": str(home)}


def llmrun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LLMRUN), *args], check=True, capture_output=True, text=True, env=env)


def wall_time(command: list[str], env: dict[str, str] | None = None) -> float:
    """Seconds one command takes, its output going to a pipe; it must succeed."""
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def repeat(measure: Callable[[], float], rounds: int) -> list[float]:
    return [measure() for _ in range(rounds)]


def stats(times: list[float], size: int = 0) -> dict[str, Any]:
    """Min, median and max seconds; MB/s by the median and by the best time when ``size`` bytes were read."""
    summary: dict[str, Any] = {
        "times_s": times, "min_s": min(times), "median_s": statistics.median(times), "max_s": max(times),
    }  # fmt: skip
    if size:
        summary["mb_per_s_median"] = size / MB / summary["median_s"]
        summary["mb_per_s_best"] = size / MB / summary["min_s"]
    return summary


def big_model(choice: Path | None) -> Path:
    if choice is not None:
        return choice
    return DEFAULT_BIG if DEFAULT_BIG.exists() else smollm2_path()


def stored_file(env: dict[str, str], name: str) -> tuple[Path, str]:
    """The path inside the store of a model's (first) file, from `llmrun list --json`, and its sha256."""
    entry = next(entry for entry in json.loads(llmrun(["list", "--json"], env).stdout) if entry["name"] == name)
    stored = entry["files"][0]
    path = Path(stored["path"])
    return (path if entry["linked"] else Path(env["LLMRUN_HOME"]) / path), stored["sha256"]


def read_through(path: Path) -> None:
    """Read the whole file once, untimed, so the page cache holds it for what follows."""
    with open(path, "rb", buffering=0) as stream:
        while stream.read(8 << 20):
            pass


def check_verify(env: dict[str, str], name: str) -> None:
    models = json.loads(llmrun(["verify", name, "--json"], env).stdout)["models"]
    assert [(model["name"], model["status"]) for model in models] == [(name, "ok")], models


def hash_commands(path: Path) -> dict[str, list[str]]:
    """`sha256sum PATH`, and `openssl dgst -sha256 -r PATH` where openssl is installed."""
    commands = {"sha256sum": ["sha256sum", str(path)]}
    if shutil.which("openssl") is not None:
        commands["openssl"] = ["openssl", "dgst", "-sha256", "-r", str(path)]
    return commands


def verify_against_hashers(env: dict[str, str], path: Path, sha256: str, rounds: int) -> dict[str, list[float]]:
    """Interleaved wall times of the hash commands and `llmrun verify big`, the order flipped every other round."""
    commands = {**hash_commands(path), "verify": [str(LLMRUN), "verify", "big"]}
    for name, command in commands.items():
        if name != "verify":
            digest = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[0]
            assert digest == sha256, f"{name} says {digest}, the manifest {sha256}"
    times: dict[str, list[float]] = {name: [] for name in commands}
    order = list(commands)
    for index in range(rounds):
        for name in order if index % 2 == 0 else order[::-1]:
            times[name].append(wall_time(commands[name], env if name == "verify" else None))
        log(f"  round {index + 1}: " + ", ".join(f"{name} {times[name][-1]:.3f} s" for name in order))
    return times


def in_process_hash(path: Path, sha256: str, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        digest = sha256_of(path)
        times.append(time.perf_counter() - start)
        assert digest == sha256
    return times


def fill_store(home: Path, tiny: Path, count: int) -> list[str]:
    """``count`` models in ``home``: one imported, the rest its manifest again under other names, one file for all."""
    names = [f"bench/model-{index:03d}" for index in range(count)]
    llmrun(["import", str(tiny), "--name", names[0]], home_env(home))
    manifests = home / "manifests"
    first = json.loads((manifests / f"{quote(names[0], safe='')}.json").read_text(encoding="utf-8"))
    for name in names[1:]:
        (manifests / f"{quote(name, safe='')}.json").write_text(json.dumps({**first, "name": name}, indent=2))
    return names


def check_list(env: dict[str, str], names: list[str]) -> None:
    listed = json.loads(llmrun(["list", "--json"], env).stdout)
    assert sorted(entry["name"] for entry in listed) == sorted(names), f"{len(listed)} models listed"
    damaged = [entry["name"] for entry in listed if entry["status"] != "ok"]
    assert not damaged, f"damaged: {damaged}"


def measure(big: Path, rounds: int, list_rounds: int, work: Path) -> dict[str, Any]:
    big_env, small_home, empty_env = home_env(work / "big"), work / "small", home_env(work / "empty")
    log(f"importing {big} as big")
    llmrun(["import", str(big), "--name", "big"], big_env)
    path, sha256 = stored_file(big_env, "big")
    size = path.stat().st_size
    check_verify(big_env, "big")
    read_through(path)

    log(f"verify vs sha256sum, {rounds} rounds on {size / MB:.0f} MB")
    pair = verify_against_hashers(big_env, path, sha256, rounds)
    log("sha256_of in-process")
    hashed = in_process_hash(path, sha256, rounds)

    tiny = write_model(work / "tiny-llama.gguf")
    names = fill_store(small_home, tiny, 1)
    small_env = home_env(small_home)
    check_verify(small_env, names[0])
    log(f"start-up, {list_rounds} rounds")
    version = repeat(lambda: wall_time([str(LLMRUN), "--version"]), list_rounds)
    verify_tiny = repeat(lambda: wall_time([str(LLMRUN), "verify", names[0]], small_env), list_rounds)
    list_empty = repeat(lambda: wall_time([str(LLMRUN), "list"], empty_env), list_rounds)

    shutil.rmtree(small_home)
    names = fill_store(small_home, tiny, N_MODELS)
    check_list(small_env, names)
    log(f"list with {N_MODELS} models, {list_rounds} rounds")
    list_full = repeat(lambda: wall_time([str(LLMRUN), "list"], small_env), list_rounds)

    results: dict[str, Any] = {
        "file": str(big), "stored_file": str(path), "size_bytes": size, "rounds": rounds, "list_rounds": list_rounds,
        "sha256sum": stats(pair["sha256sum"], size), "verify": stats(pair["verify"], size),
        "openssl": stats(pair["openssl"], size) if "openssl" in pair else None,
        "sha256_of": stats(hashed, size), "version": stats(version), "verify_tiny": stats(verify_tiny),
        "list_empty": stats(list_empty), "list_200": stats(list_full),
    }  # fmt: skip
    return {**results, **judge(results)}


def judge(results: dict[str, Any]) -> dict[str, Any]:
    """The ratios to sha256sum, verify's speed with its start-up taken off, and whether the targets are met."""
    sha, verify, openssl, size = results["sha256sum"], results["verify"], results["openssl"], results["size_bytes"]
    hashing_s = verify["median_s"] - results["verify_tiny"]["median_s"]
    ratio_median = verify["mb_per_s_median"] / sha["mb_per_s_median"]
    return {
        "ratio_median": ratio_median,
        "ratio_best": verify["mb_per_s_best"] / sha["mb_per_s_best"],
        "ratio_sha256_of": results["sha256_of"]["mb_per_s_median"] / sha["mb_per_s_median"],
        "ratio_openssl": openssl["median_s"] / verify["median_s"] if openssl else None,
        "verify_without_startup_mb_per_s": size / MB / hashing_s if hashing_s > 0 else None,
        "ratio_without_startup": sha["median_s"] / hashing_s if hashing_s > 0 else None,
        "verify_target_met": ratio_median >= VERIFY_TARGET,
        "list_target_met": results["list_200"]["median_s"] < LIST_TARGET_S,
    }


def table(results: dict[str, Any], command: str) -> str:
    size, stored = results["size_bytes"], Path(results["stored_file"])
    short = f"files/{stored.parent.name[:12]}…/{stored.name}"

    def row(label: str, what: str, key: str) -> str:
        data = results[key]
        speed = f"{data['mb_per_s_median']:.0f} | {data['mb_per_s_best']:.0f}" if "mb_per_s_median" in data else "|"
        return (f"| {label} | `{what}` | {data['min_s']:.3f} | {data['median_s']:.3f} | {data['max_s']:.3f} "
                f"| {speed} |")  # fmt: skip

    def yes(met: bool) -> str:
        return "yes" if met else "**no**"

    without, load = results["ratio_without_startup"], results["load_average"]
    return "\n".join([
        f"command: `{command}`",
        f"file: {results['file']} ({size / MB:.0f} MB), {results['rounds']} verify rounds, "
        f"{results['list_rounds']} rounds of the rest; page cache warm; wall seconds",
        f"1-minute load average {load['before']:.2f} before, {load['after']:.2f} after, {load['cpus']} CPUs "
        "(other work on the machine skews the numbers)",
        "",
        "| measure | command | min s | median s | max s | MB/s (median) | MB/s (best) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        row("sha256sum", f"sha256sum {short}", "sha256sum"),
        *([row("openssl (reference)", f"openssl dgst -sha256 -r {short}", "openssl")] if results["openssl"] else []),
        row("llmrun verify", "llmrun verify big", "verify"),
        row("in-process hash", "llmrun.store.store.sha256_of(path)", "sha256_of"),
        row("start-up", "llmrun --version", "version"),
        row("verify, tiny model", "llmrun verify bench/model-000", "verify_tiny"),
        row("list, empty store", "llmrun list", "list_empty"),
        row(f"list, {N_MODELS} models", "llmrun list", "list_200"),
        "",
        "| target | measured | goal | met |",
        "| --- | ---: | ---: | --- |",
        f"| verify MB/s / sha256sum MB/s (medians) | {results['ratio_median']:.3f}x | >= {VERIFY_TARGET}x "
        f"| {yes(results['verify_target_met'])} |",
        f"| verify MB/s / sha256sum MB/s (best times) | {results['ratio_best']:.3f}x | >= {VERIFY_TARGET}x "
        f"| {yes(results['ratio_best'] >= VERIFY_TARGET)} |",
        f"| the same, verify's tiny-model time taken off | {'n/a' if without is None else f'{without:.3f}x'} "
        f"| (start-up's share) | |",
        f"| sha256_of in-process / sha256sum (medians) | {results['ratio_sha256_of']:.3f}x | (hashing alone) | |",
        *([f"| verify MB/s / openssl dgst MB/s (medians) | {results['ratio_openssl']:.3f}x | (reference) | |"]
          if results["ratio_openssl"] is not None else []),
        f"| `llmrun list`, {N_MODELS} models, median | {results['list_200']['median_s']:.3f} s | < {LIST_TARGET_S} s "
        f"| {yes(results['list_target_met'])} |",
    ])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of verify vs sha256sum (default 5)")
    parser.add_argument(
        "--list-rounds", type=int, default=10, help="rounds of list and of the start-up baselines (default 10)"
    )
    parser.add_argument("--file", type=Path, help="the big GGUF to verify (default: synthetic-1b-Q4_0, else SmolLM2)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the tables")
    args = parser.parse_args()
    if shutil.which("sha256sum") is None:
        sys.exit("sha256sum is needed for the comparison")

    command = shlex.join(["python", "scripts/bench_store.py", *sys.argv[1:]])
    work = Path(tempfile.mkdtemp(prefix="llmrun-bench-store-"))
    load_before = os.getloadavg()[0]
    try:
        results = measure(big_model(args.file), args.rounds, args.list_rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_average"] = {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()}
    print(json.dumps({"command": command, **results}, indent=2) if args.json else table(results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
