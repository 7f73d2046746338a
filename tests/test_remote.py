"""`run` and `chat` through a server (`--server URL`, `LLMRUN_SERVER`, `--server auto`): the same output, records,
log and exit codes as in-process, with a real `llmrun serve` on 127.0.0.1."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Cli, finish, hub_env
from hub_standin import HubStandIn
from serving import Server, free_port
from test_cli_store import assert_one_line_error

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def store_cli(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Cli:
    cli = Cli(tmp_path_factory.mktemp("remote-home"))
    assert cli("import", str(smollm2), "--name", "smollm2", "--link").returncode == 0
    return cli


@pytest.fixture(scope="module")
def server(store_cli: Cli) -> Iterator[Server]:
    running = Server(store_cli, "--parallel", "2", "--ctx", "2048")
    yield running
    running.stop()


def requests_served(server: Server) -> float:
    total = 0.0
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith('llmrun_requests_total{route="/v1/chat/completions"'):
            total += float(line.split()[-1])
    return total


def test_run_through_a_server_prints_the_same_greedy_answer(store_cli: Cli, server: Server) -> None:
    here = store_cli("run", "smollm2", QUESTION, "-t", "0", "-n", "24")
    before = requests_served(server)
    there = store_cli("run", "smollm2", QUESTION, "-t", "0", "-n", "24", "--server", server.url)
    assert there.returncode == 0, there.stderr
    assert there.stdout == here.stdout and "Paris" in there.stdout
    assert there.stderr == ""
    assert requests_served(server) == before + 1  # it was the server that answered


def test_run_through_a_server_gives_the_same_json_record(store_cli: Cli, server: Server) -> None:
    here = store_cli("run", "smollm2", QUESTION, "-t", "0", "-n", "12", "--json").json()
    there = store_cli("run", "smollm2", QUESTION, "-t", "0", "-n", "12", "--json", "--server", server.url).json()
    assert set(there) == set(here)
    assert set(there["timings"]) == set(here["timings"])
    for key in ("model", "text", "finish_reason", "prompt_tokens", "completion_tokens"):
        assert there[key] == here[key], key
    assert there["context_size"] == 2048  # the server's, not this process's


def test_piped_stdin_and_a_system_prompt_reach_the_server(store_cli: Cli, server: Server) -> None:
    args = ("run", "smollm2", "-t", "0", "-n", "16", "--system", "Answer in one word.")
    here = store_cli(*args, input=QUESTION)
    there = store_cli(*args, "--server", server.url, input=QUESTION)
    assert there.returncode == 0, there.stderr
    assert there.stdout == here.stdout


def test_llmrun_server_environment_variable_sends_requests_there(store_cli: Cli, server: Server) -> None:
    before = requests_served(server)
    result = store_cli("run", "smollm2", "Hi", "-n", "3", env={"LLMRUN_SERVER": server.url})
    assert result.returncode == 0, result.stderr
    assert requests_served(server) == before + 1
    local = store_cli("run", "smollm2", "Hi", "-n", "3", "--server", "off", env={"LLMRUN_SERVER": server.url})
    assert local.returncode == 0, local.stderr
    assert requests_served(server) == before + 1  # --server off loads the model here


def test_an_exchange_through_a_server_on_the_same_store_is_logged_once(store_cli: Cli, server: Server) -> None:
    marker = f"Repeat the word {time.monotonic_ns()}."
    result = store_cli("run", "smollm2", marker, "-n", "4", "--server", server.url)
    assert result.returncode == 0, result.stderr
    time.sleep(0.5)  # the server writes its log on a thread of its own
    logged = [entry for entry in store_cli("logs", "--json", "-n", "0").json() if entry["prompt"] == marker]
    assert len(logged) == 1, logged
    assert logged[0]["model"] == "smollm2" and logged[0]["completion_tokens"] > 0
    quiet = f"Say nothing {time.monotonic_ns()}."
    assert store_cli("run", "smollm2", quiet, "-n", "2", "--no-log", "--server", server.url).returncode == 0
    time.sleep(0.5)
    assert not [entry for entry in store_cli("logs", "--json", "-n", "0").json() if entry["prompt"] == quiet]


def test_server_errors_keep_their_exit_codes(store_cli: Cli, server: Server) -> None:
    unreachable = store_cli("run", "smollm2", "Hi", "--server", f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 5
    assert_one_line_error(unreachable.stderr, "no server answers", "connection refused")
    missing = store_cli("run", "no-such-model", "Hi", "--no-pull", "--server", server.url)
    assert missing.returncode == 3
    assert_one_line_error(missing.stderr, "no-such-model")
    long = store_cli("run", "smollm2", "word " * 3000, "--server", server.url)
    assert long.returncode == 4
    assert_one_line_error(long.stderr, server.url)
    not_openai = store_cli("run", "smollm2", "Hi", "--server", f"{server.url}/elsewhere")
    assert not_openai.returncode == 2
    assert_one_line_error(not_openai.stderr, "OpenAI API")
    bad_url = store_cli("run", "smollm2", "Hi", "--server", "127.0.0.1:11435")
    assert bad_url.returncode == 2
    assert_one_line_error(bad_url.stderr, "not an http(s) URL")
    for option in (("--ctx", "512"), ("--lookup",), ("--threads", "1"), ("-ctk", "q8_0")):
        refused = store_cli("run", "smollm2", "Hi", *option, "--server", server.url)
        assert refused.returncode == 2, option
        assert_one_line_error(refused.stderr, "applies to a model loaded here", "--server off")
    a_file = store_cli("run", str(Path(__file__)), "Hi", "--server", server.url)
    assert a_file.returncode == 2
    assert_one_line_error(a_file.stderr, "a server cannot load it")


def test_a_wrong_api_key_is_a_usage_error(store_cli: Cli) -> None:
    guarded = Server(store_cli, "--ctx", "512", "--api-key", "sesame", "--no-log")
    try:
        refused = store_cli("run", "smollm2", "Hi", "--server", guarded.url, env={"LLMRUN_API_KEY": "wrong"})
        assert refused.returncode == 2
        assert_one_line_error(refused.stderr, "refused the request (401", "LLMRUN_API_KEY")
        allowed = store_cli("run", "smollm2", "Hi", "-n", "2", "--server", guarded.url,
                            env={"LLMRUN_API_KEY": "sesame"})  # fmt: skip
        assert allowed.returncode == 0, allowed.stderr
    finally:
        guarded.stop()


def test_server_auto_uses_a_running_local_server_and_loads_here_without_one(store_cli: Cli, server: Server) -> None:
    port = server.url.rsplit(":", 1)[1]
    before = requests_served(server)
    found = store_cli("run", "smollm2", "Hi", "-n", "2", "--server", "auto", "-v",
                      env={"LLMRUN_HOST": f"127.0.0.1:{port}"})  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert f"sending the request to {server.url}" in found.stderr
    assert requests_served(server) == before + 1
    # Options only a model loaded here can honour, or no server at LLMRUN_HOST: in-process, no error.
    here = store_cli("run", "smollm2", "Hi", "-n", "2", "--ctx", "256", "--server", "auto",
                     env={"LLMRUN_HOST": f"127.0.0.1:{port}"})  # fmt: skip
    assert here.returncode == 0, here.stderr
    elsewhere = {"LLMRUN_SERVER": "auto", "LLMRUN_HOST": f"127.0.0.1:{free_port()}"}
    nobody = store_cli("run", "smollm2", "Hi", "-n", "2", "-v", env=elsewhere)
    assert nobody.returncode == 0, nobody.stderr
    assert "sending the request" not in nobody.stderr and "loaded smollm2" in nobody.stderr
    assert requests_served(server) == before + 1


def test_ctrl_c_during_a_served_answer_keeps_its_output_and_logs_it(store_cli: Cli, server: Server) -> None:
    process = store_cli.popen("run", "smollm2", "Count from one to a thousand.", "--ignore-eos", "-n", "2000",
                              "--server", server.url)  # fmt: skip
    assert process.stdout is not None
    first = process.stdout.read(40)
    process.send_signal(signal.SIGINT)
    result = finish(process)
    assert result.returncode == 130, result.stderr
    printed = first + result.stdout
    assert len(printed) >= 40
    deadline = time.monotonic() + 10  # the server notices the client is gone and frees the slot
    while server.busy_slots() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.busy_slots() == 0
    logged = store_cli("logs", "--json", "-n", "1").json()[0]
    assert logged["finish_reason"] == "cancelled" and printed.startswith(logged["response"].strip()[:20])


def test_chat_through_a_server_keeps_the_conversation_and_the_log(store_cli: Cli, server: Server) -> None:
    lines = "My name is Ada.\n/undo\nWhat is the capital of France?\n/stats\n"
    here = store_cli("chat", "smollm2", "-t", "0", "-n", "20", "--plain", input=lines)
    there = store_cli("chat", "smollm2", "-t", "0", "-n", "20", "--plain", "--server", server.url, input=lines)
    assert there.returncode == 0, there.stderr
    assert there.stdout == here.stdout and "Paris" in there.stdout
    assert "dropped: My name is Ada." in there.stderr
    assert "last answer:" in there.stderr
    conversation = store_cli("logs", "--json", "-n", "1").json()[0]["conversation_id"]
    turns = [entry for entry in store_cli("logs", "--json", "-n", "0").json()
             if entry["conversation_id"] == conversation]  # fmt: skip
    assert sorted(entry["prompt"] for entry in turns) == ["My name is Ada.", "What is the capital of France?"]


def test_chat_through_a_server_drops_old_turns_when_the_context_is_full(store_cli: Cli) -> None:
    small = Server(store_cli, "--ctx", "256", "--no-log")
    try:
        long_turn = "Tell me about the sea. " * 20
        lines = "".join(f"{long_turn}{number}\n" for number in range(4))
        result = store_cli("chat", "smollm2", "-n", "8", "--plain", "--server", small.url, "--no-log", input=lines)
        assert result.returncode == 0, result.stderr
        assert "the context is full: dropped" in result.stderr
        assert "error" not in result.stderr
    finally:
        small.stop()


def test_run_through_a_server_pulls_a_model_it_lacks(cli: Cli, hub: HubStandIn, home: Path) -> None:
    env, base_env = hub_env(hub, home), cli.env
    cli.env = lambda **extra: base_env(**{**env, **extra})  # type: ignore[method-assign]
    serving = Server.bare(cli, "--ctx", "512", "--no-log")
    try:
        pulled = cli("run", "bartowski/Tiny-GGUF:Q8_0", "Hi", "-n", "3", "--server", serving.url)
        assert pulled.returncode == 0, pulled.stderr
        assert "success" in pulled.stderr
        assert "bartowski/Tiny-GGUF:Q8_0" in [entry["name"] for entry in cli("list", "--json").json()]
    finally:
        serving.stop()


def test_chat_through_a_server_logs_the_servers_name_for_the_model(store_cli: Cli, server: Server) -> None:
    marker = f"Say hello {time.monotonic_ns()}."
    result = store_cli("chat", "smollm2:latest", "-n", "3", "--plain", "--server", server.url, input=marker + "\n")
    assert result.returncode == 0, result.stderr
    [logged] = [entry for entry in store_cli("logs", "--json", "-n", "0").json() if entry["prompt"] == marker]
    assert logged["model"] == "smollm2"  # as `run --server` logs it, not the name as typed
