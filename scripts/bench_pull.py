#!/usr/bin/env python3
"""Benchmark `llmrun pull` download throughput against `curl` of the same URL, in one run.

A ~1 GB synthetic GGUF is served by the Hub stand-in (tests/hub_standin.py) on 127.0.0.1.
Each repetition downloads it with `curl` (the CDN URL the Hub redirects to, written to a
file) and with `llmrun pull` into an empty store (which also checks the sha256 and the
GGUF before listing the model). Both write to /dev/shm when it exists; runs alternate in
order, each after `sync`; the ratio of mean throughputs is printed.

    python scripts/bench_pull.py -r 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))

from hub_standin import HubStandIn  # noqa: E402
from synthetic_gguf import Shape, write_model  # noqa: E402

LLMRUN = Path(sys.executable).with_name("llmrun")
REPO = "bench/Big-GGUF"
FILE = "Big-F16.gguf"
# 30 layers of a 1024-wide llama in f16: about 1.0 GB.
SHAPE = Shape(n_embd=1024, n_ff=4096, n_layer=30, n_head=16, n_head_kv=16, n_ctx_train=4096)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("curl") is None:
        sys.exit("curl is needed for the comparison")

    cache = ROOT / ".cache" / "models"
    cache.mkdir(parents=True, exist_ok=True)
    model = cache / "synthetic-1gb-f16.gguf"
    if not model.exists():
        write_model(model, SHAPE, float_type="f16")
    size = model.stat().st_size

    hub = HubStandIn().start()
    remote = hub.add_file(REPO, FILE, model)
    url = f"{hub.cdn_url}/lfs/{remote.sha256}/{REPO}/{FILE}"
    # Both write to RAM (/dev/shm) where there is one: this VM's disk write-back varies 10x from
    # run to run, which would drown the difference between the two clients.
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="llmrun-bench-pull-", dir=shm if shm.is_dir() else None))
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(work / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}

    def with_curl() -> float:
        target = work / "curl.gguf"
        start = time.perf_counter()
        subprocess.run(["curl", "-sf", "-o", str(target), url], check=True)
        elapsed = time.perf_counter() - start
        target.unlink()
        return size / elapsed

    def with_llmrun() -> float:
        home = work / "home"
        start = time.perf_counter()
        subprocess.run([str(LLMRUN), "pull", REPO, "--quiet"], check=True, env={**env, "LLMRUN_HOME": str(home)})
        elapsed = time.perf_counter() - start
        shutil.rmtree(home)
        return size / elapsed

    curl_rates, llmrun_rates = [], []
    for repetition in range(args.repetitions):
        # Alternate who goes first, and flush the page cache's dirty pages before each run:
        # otherwise the one that follows pays for writing back the other's gigabyte.
        for measure, rates in [(with_curl, curl_rates), (with_llmrun, llmrun_rates)][
            :: 1 if repetition % 2 == 0 else -1
        ]:
            os.sync()
            rates.append(measure())
    hub.stop()
    shutil.rmtree(work, ignore_errors=True)

    def show(rates: list[float]) -> str:
        spread = statistics.stdev(rates) if len(rates) > 1 else 0.0
        return f"{statistics.mean(rates) / 1e6:8.1f} ± {spread / 1e6:5.1f} MB/s"

    print(f"download of {size / 1e9:.2f} GB from 127.0.0.1, {args.repetitions} runs each")
    print(f"  curl         {show(curl_rates)}")
    print(f"  llmrun pull  {show(llmrun_rates)}   (includes sha256 and GGUF checks)")
    print(f"  ratio        {statistics.mean(llmrun_rates) / statistics.mean(curl_rates):.3f}   (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
