"""`llmrun bench` through the installed CLI: every output format, llama-bench's fields, bad flags."""

from __future__ import annotations

import csv
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Cli
from test_cli_store import assert_one_line_error

LLAMA_BENCH_FIELDS = {
    "build_commit", "cpu_info", "backends", "model_filename", "model_type", "model_size", "model_n_params",
    "n_batch", "n_ubatch", "n_threads", "type_k", "type_v", "n_gpu_layers", "flash_attn", "n_prompt", "n_gen",
    "n_depth", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns", "samples_ts",
}  # fmt: skip
SMALL = ("-p", "16", "-n", "4", "-r", "2")


@pytest.fixture
def bench_cli(cli: Cli, smollm2: Path, tiny_model: Path) -> Cli:
    cli("import", str(smollm2), "--name", "smollm2", "--link")
    cli("import", str(tiny_model), "--name", "tiny", "--link")
    return cli


def test_json_rows_use_llama_bench_fields(bench_cli: Cli, smollm2: Path) -> None:
    result = bench_cli("bench", "smollm2", "tiny", *SMALL, "-o", "json")
    assert result.returncode == 0, result.stderr
    rows = result.json()
    assert [(row["model_type"].split()[0], row["n_prompt"], row["n_gen"]) for row in rows] == [
        ("llama", 16, 0), ("llama", 0, 4), ("llama", 16, 0), ("llama", 0, 4),
    ]  # fmt: skip
    for row in rows:
        assert set(row) >= LLAMA_BENCH_FIELDS
        assert len(row["samples_ts"]) == 2 and row["avg_ts"] > 0
        assert row["avg_ns"] == pytest.approx(sum(row["samples_ns"]) / 2, abs=1)
    assert rows[0]["model_filename"] == str(smollm2)
    assert rows[0]["model_n_params"] == 134515008


def test_every_output_format_parses(bench_cli: Cli) -> None:
    jsonl = bench_cli("bench", "tiny", *SMALL, "-o", "jsonl").stdout.splitlines()
    assert [json.loads(line)["n_gen"] for line in jsonl] == [0, 4]
    table = list(csv.DictReader(io.StringIO(bench_cli("bench", "tiny", *SMALL, "-o", "csv").stdout)))
    assert len(table) == 2 and float(table[1]["avg_ts"]) > 0 and table[0]["n_prompt"] == "16"
    markdown = bench_cli("bench", "tiny", *SMALL, "-o", "md").stdout.splitlines()
    assert markdown[0] == "| model | size | params | backend | threads | test | t/s |"
    assert "| pp16 |" in markdown[2] and " ± " in markdown[2]
    assert "tg4" in markdown[3]
    piped_default = bench_cli("bench", "tiny", *SMALL).stdout
    assert piped_default.startswith("| model |")


def test_sweeps_multiply_tests(bench_cli: Cli) -> None:
    rows = bench_cli("bench", "tiny", "-p", "8,16", "-n", "", "-t", "1,2", "-r", "1", "-o", "json").json()
    assert sorted((row["n_prompt"], row["n_threads"]) for row in rows) == [(8, 1), (8, 2), (16, 1), (16, 2)]
    combined = bench_cli("bench", "tiny", "-p", "", "-n", "", "-pg", "8,4", "-r", "1", "-o", "json").json()
    assert [(row["n_prompt"], row["n_gen"]) for row in combined] == [(8, 4)]
    kv = bench_cli("bench", "smollm2", "-p", "8", "-n", "", "--ctk", "q8_0", "--ctv", "q8_0", "-fa", "on", "-r", "1",
                   "-o", "json").json()  # fmt: skip
    assert (kv[0]["type_k"], kv[0]["type_v"], kv[0]["flash_attn"]) == ("q8_0", "q8_0", 1)


def test_compare_prints_the_ratio_against_an_earlier_run(bench_cli: Cli, tmp_path: Path) -> None:
    before = tmp_path / "before.json"
    before.write_text(bench_cli("bench", "tiny", *SMALL, "-o", "json").stdout)
    result = bench_cli("bench", "tiny", *SMALL, "-o", "md", "--compare", str(before))
    assert "vs before" in result.stdout.splitlines()[0]
    assert all(line.rstrip(" |").endswith("x") for line in result.stdout.splitlines()[2:])
    rows = bench_cli("bench", "tiny", *SMALL, "-o", "json", "--compare", str(before)).json()
    assert all(row["compare_ratio"] > 0 for row in rows)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("-p", "0"), "-p 0 must be at least 1"),
        (("-p", "abc"), "whole numbers"),
        (("-p", "", "-n", ""), "nothing to measure"),
        (("-pg", "512"), "pairs"),
        (("-o", "xml"), "unknown output format"),
        (("-fa", "maybe"), "-fa takes"),
        (("--ctk", "q3_k"), "unknown KV cache type"),
    ],
)
def test_bad_flags_are_one_line_errors(bench_cli: Cli, args: tuple[str, ...], fragment: str) -> None:
    result = bench_cli("bench", "tiny", "-r", "1", *args)
    assert result.returncode in (1, 2), result.stderr
    assert_one_line_error(result.stderr, fragment)


def test_unknown_model_is_not_found(bench_cli: Cli) -> None:
    result = bench_cli("bench", "no-such-model", "--no-pull")
    assert result.returncode == 3
    assert_one_line_error(result.stderr, "no-such-model")


@pytest.fixture
def openai_server(tiny_model: Path) -> Iterator[str]:
    """llama-cpp-python's own OpenAI-compatible server on 127.0.0.1 (queueing, not interrupting, requests)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_model), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "512", "--interrupt_requests", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail("llama_cpp.server did not start")
    yield url
    process.terminate()
    process.wait(timeout=10)


def test_load_test_of_an_openai_server_reports_every_request(cli: Cli, openai_server: str, tmp_path: Path) -> None:
    plot = tmp_path / "load.png"
    result = cli("bench", "--server", openai_server, "-c", "1,2", "--requests", "4", "-n", "8", "-o", "json",
                 "--plot", str(plot))  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = result.json()
    assert [(row["concurrency"], row["requests"], row["errors"]) for row in rows] == [(1, 4, 0), (2, 4, 0)]
    for row in rows:
        assert row["output_tokens"] > 0 and row["tokens_per_s"] > 0 and row["requests_per_s"] > 0
        assert 0 < row["ttft_p50_ms"] <= row["ttft_p95_ms"] <= row["ttft_p99_ms"]
        assert row["itl_p50_ms"] <= row["itl_p99_ms"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = cli("bench", "--server", f"{openai_server}/v1/", "-c", "1", "--requests", "2", "-n", "4").stdout
    assert markdown.startswith("| concurrency | requests | errors | tok/s |")


def test_an_unreachable_server_is_one_line(cli: Cli) -> None:
    result = cli("bench", "--server", "http://127.0.0.1:9", "-c", "1")
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "cannot reach an OpenAI-compatible server", "127.0.0.1:9")
    assert cli("bench", "--server", "ftp://x").returncode == 2


def test_a_thread_sweep_can_be_plotted(bench_cli: Cli, tmp_path: Path) -> None:
    plot = tmp_path / "threads.png"
    result = bench_cli("bench", "tiny", "-p", "8", "-n", "", "-t", "1,2", "-r", "1", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert plot.stat().st_size > 1000
