"""One model across machines: `llmrun worker` (llama.cpp's RPC server) and `--rpc` on run, chat, serve and bench.

llama-cpp-python is built without RPC by default, so the default run checks what such a build says; the slow tests
need one built with CMAKE_ARGS="-DGGML_RPC=ON" (two workers on loopback)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator

import llama_cpp
import pytest
from conftest import LLMRUN, Cli, finish
from serving import free_port
from test_cli_store import assert_one_line_error

RPC_BUILD = bool(llama_cpp.llama_supports_rpc())
needs_rpc = pytest.mark.skipif(not RPC_BUILD, reason='llama.cpp built without RPC (CMAKE_ARGS="-DGGML_RPC=ON")')


@pytest.mark.skipif(RPC_BUILD, reason="this llama.cpp has RPC")
def test_without_an_rpc_build_worker_and_rpc_say_how_to_rebuild(smollm2_cli: Cli) -> None:
    for args in (("worker",), ("run", "smollm2", "Hi", "--rpc", "127.0.0.1:50052")):
        result = smollm2_cli(*args)
        assert result.returncode == 1, args
        assert_one_line_error(result.stderr, "built without RPC", 'CMAKE_ARGS="-DGGML_RPC=ON"')


def test_malformed_rpc_endpoints_and_rpc_with_a_server_are_usage_errors(smollm2_cli: Cli) -> None:
    bad = smollm2_cli("run", "smollm2", "Hi", "--rpc", "host-without-port")
    assert bad.returncode == 2
    assert_one_line_error(bad.stderr, "is not host:port")
    both = smollm2_cli("run", "smollm2", "Hi", "--rpc", "127.0.0.1:50052", "--server", "http://127.0.0.1:9")
    assert both.returncode == 2
    assert_one_line_error(both.stderr, "--rpc applies to a model loaded here")


class Worker:
    def __init__(self, cli: Cli) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(LLMRUN), "worker", "--port", str(self.port), "--threads", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli.env(),
        )  # fmt: skip
        assert self.process.stderr is not None
        line = self.process.stderr.readline()
        assert "llmrun worker on" in line, line

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


@pytest.fixture
def workers(smollm2_cli: Cli) -> Iterator[list[Worker]]:
    started = [Worker(smollm2_cli) for _ in range(2)]
    yield started
    for worker in started:
        worker.stop()


@pytest.mark.slow
@needs_rpc
def test_a_greedy_answer_through_two_workers_equals_the_local_one(smollm2_cli: Cli, workers: list[Worker]) -> None:
    question = ("run", "smollm2", "What is the capital of France?", "-t", "0", "-n", "32", "--threads", "1")
    local = smollm2_cli(*question)
    rpc = ",".join(worker.endpoint for worker in workers)
    remote = smollm2_cli(*question, "--rpc", rpc, "-v")
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout and "Paris" in remote.stdout
    assert f"layers on RPC workers {workers[0].endpoint}, {workers[1].endpoint}" in remote.stderr


@pytest.mark.slow
@needs_rpc
def test_a_worker_killed_mid_answer_is_one_line_and_exit_5_not_a_hang(smollm2_cli: Cli, workers: list[Worker]) -> None:
    rpc = ",".join(worker.endpoint for worker in workers)
    process = smollm2_cli.popen("run", "smollm2", "Count to a thousand.", "--ignore-eos", "-n", "3000", "--rpc", rpc)
    assert process.stdout is not None
    first = process.stdout.read(20)
    workers[1].process.send_signal(signal.SIGKILL)
    began = time.monotonic()
    result = finish(process)
    assert time.monotonic() - began < 20
    assert result.returncode == 5, result.stderr
    assert_one_line_error(result.stderr, "an RPC worker stopped answering")
    assert len(first + result.stdout) >= 20


@needs_rpc
def test_an_unreachable_worker_is_one_line_before_loading(smollm2_cli: Cli) -> None:
    result = smollm2_cli("run", "smollm2", "Hi", "--rpc", f"127.0.0.1:{free_port()}")
    assert result.returncode == 5
    assert_one_line_error(result.stderr, "no RPC worker answers", "llmrun worker")
