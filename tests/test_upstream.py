"""`llmrun serve --config`: models routed to upstream engines. Real upstreams on 127.0.0.1 (native llama-server built
from the vendored llama.cpp, two more `llmrun serve`), the real openai, ollama and anthropic clients through llmrun;
replicas killed under load and brought back; upstreams that send garbage or hang."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
from conftest import ROOT, Cli
from serving import Server, free_port, wait_until_healthy
from test_cli_store import assert_one_line_error

QUESTION = "What is the capital of France?"


def native_server_binary() -> Path | None:
    import importlib.metadata

    version = importlib.metadata.version("llama-cpp-python")
    binary = ROOT / ".cache" / "native" / f"llama_cpp_python-{version}" / "build" / "bin" / "llama-server"
    return binary if binary.exists() else None


class NativeServer:
    """llama-server, as a user runs it: `llama-server -m MODEL --alias NAME`."""

    def __init__(self, binary: Path, model: Path, alias: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port), "--alias", alias,
             "-np", "4", "-c", "4096", "-t", "2", "--no-webui"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "LD_LIBRARY_PATH": str(binary.parent)},
        )  # fmt: skip
        wait_until_healthy(self.url, self.process, "llama-server")

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


class FaultyUpstream:
    """A socket on 127.0.0.1 that answers every request with bytes that are not an OpenAI stream (``garbage``), or
    takes the connection and never answers (``hang``)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "hang":
                self.held.append(connection)
                continue
            connection.recv(65536)
            body = b"data: this is not json\n\n"
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: "
                               + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
            connection.close()

    def stop(self) -> None:
        self.listener.close()
        for connection in self.held:
            connection.close()


@pytest.fixture(scope="module")
def store_cli(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Cli:
    cli = Cli(tmp_path_factory.mktemp("upstream-home"))
    assert cli("import", str(smollm2), "--name", "smollm2", "--link").returncode == 0
    return cli


@pytest.fixture(scope="module")
def native(smollm2: Path) -> Iterator[NativeServer]:
    binary = native_server_binary()
    if binary is None:
        pytest.skip("native llama-server is not built: run TARGETS=llama-server scripts/build_native.sh")
    running = NativeServer(binary, smollm2, "smol-native")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def replicas(store_cli: Cli) -> Iterator[list[Server]]:
    # One thread each: two OpenMP teams spinning on two cores would slow both down many times over.
    running = [Server(store_cli, "--parallel", "2", "--ctx", "1024", "--no-log", "--threads", "1") for _ in range(2)]
    yield running
    for server in running:
        server.stop()


def write_config(path: Path, upstreams: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for name, table in upstreams.items():
        lines.append(f"[upstreams.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def faulty() -> Iterator[tuple[FaultyUpstream, FaultyUpstream]]:
    garbage, hang = FaultyUpstream("garbage"), FaultyUpstream("hang")
    yield garbage, hang
    garbage.stop()
    hang.stop()


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, store_cli: Cli, native: NativeServer, replicas: list[Server],
    faulty: tuple[FaultyUpstream, FaultyUpstream],
) -> Iterator[Server]:  # fmt: skip
    """llmrun serving its own smollm2, and routing to llama-server (models discovered), two llmrun replicas
    (``twin``), and two broken upstreams."""
    garbage, hang = faulty
    config = write_config(tmp_path_factory.mktemp("config") / "upstreams.toml", {
        "native": {"urls": [native.url]},
        "twin": {"urls": [replica.url for replica in replicas], "models": ["twin"], "health_interval_s": 1},
        "garbage": {"urls": [garbage.url], "models": ["garbage"]},
        "stuck": {"urls": [hang.url], "models": ["stuck"], "read_timeout_s": 2, "health_interval_s": 30},
    })  # fmt: skip
    # The replicas know the model as smollm2; the twin upstream sends "twin" on unchanged, so give it that name.
    assert store_cli("cp", "smollm2", "twin").returncode == 0
    running = Server(store_cli, "--config", str(config), "--ctx", "1024")
    yield running
    running.stop()


def chat(client: openai.OpenAI, model: str, max_tokens: int = 16, **extra: Any) -> str:
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=max_tokens, temperature=0, **extra
    )
    return answer.choices[0].message.content or ""


def test_openai_client_reaches_llama_server_and_llmrun_upstreams(
    proxy: Server, native: NativeServer, replicas: list[Server]
) -> None:
    client = proxy.openai()
    direct_native = openai.OpenAI(base_url=f"{native.url}/v1", api_key="none", max_retries=0)
    assert chat(client, "smol-native") == chat(direct_native, "smol-native")
    assert chat(client, "twin") == chat(replicas[0].openai(), "twin")
    streamed = client.chat.completions.create(
        model="smol-native", messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(streamed)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == chat(
        direct_native, "smol-native"
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    completion = client.completions.create(model="smol-native", prompt="The capital of France is", max_tokens=8,
                                           temperature=0)  # fmt: skip
    assert completion.choices[0].text
    assert chat(client, "smollm2")  # the proxy's own model beside them


def test_ollama_and_anthropic_apps_reach_an_upstream_through_llmrun(proxy: Server) -> None:
    client = ollama.Client(host=proxy.url)
    answer = client.chat(model="smol-native", messages=[{"role": "user", "content": QUESTION}],
                         options={"num_predict": 16, "temperature": 0})  # fmt: skip
    assert answer.message.content and answer.done
    pieces = list(client.generate(model="smol-native", prompt=QUESTION, stream=True, options={"num_predict": 8}))
    assert pieces[-1].done and "".join(piece.response for piece in pieces)
    assert client.embed(model="twin", input="hello").embeddings[0]
    message = anthropic.Anthropic(base_url=proxy.url, api_key="none", max_retries=0).messages.create(
        model="smol-native", max_tokens=16, messages=[{"role": "user", "content": QUESTION}]
    )
    assert message.content[0].type == "text" and message.content[0].text and message.usage.output_tokens > 0


def test_a_forced_tool_call_through_an_upstream_llmrun_is_valid_in_every_shape(proxy: Server) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
    answer = proxy.openai().chat.completions.create(
        model="twin", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[tool],  # type: ignore[list-item]
        tool_choice="required", parallel_tool_calls=False, max_tokens=60, temperature=0,
    )  # fmt: skip
    [call] = answer.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
    assert answer.choices[0].finish_reason == "tool_calls"
    messages = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    reply = ollama.Client(host=proxy.url).chat(model="twin", messages=messages, tools=[tool],
                                               options={"num_predict": 60, "temperature": 0})  # fmt: skip
    calls = reply.message.tool_calls or []
    assert calls and all(call.function.name == "get_weather" for call in calls)
    assert all(isinstance(call.function.arguments["city"], str) for call in calls)  # objects, as Ollama's


def test_local_and_upstream_models_are_listed_together(proxy: Server, store_cli: Cli) -> None:
    listed = {model.id: model.owned_by for model in proxy.openai().models.list()}
    assert listed["smol-native"] == "native" and listed["twin"] == "twin" and listed["smollm2"] == "llmrun"
    tags = [model.model for model in ollama.Client(host=proxy.url).list().models]
    assert {"smol-native", "twin", "smollm2"} <= set(tags)
    chat(proxy.openai(), "smol-native", 2)
    ps = store_cli("ps", "--server", proxy.url)
    assert ps.returncode == 0, ps.stderr
    row = next(line for line in ps.stdout.splitlines() if line.startswith("smol-native"))
    assert "upstream native (1/1 up)" in row
    metrics = httpx.get(f"{proxy.url}/metrics").text
    assert f'llmrun_upstream_healthy{{upstream="twin",url="{proxy_twin_url(proxy)}"}} 1.0' in metrics
    assert 'llmrun_generated_tokens_total{model="smol-native"}' in metrics
    stopped = store_cli("stop", "smol-native", "--server", proxy.url)
    assert stopped.returncode == 1
    assert_one_line_error(stopped.stderr, "served by upstream native")


def proxy_twin_url(proxy: Server) -> str:
    records = httpx.get(f"{proxy.url}/api/ps").json()["models"]
    twin = next(record for record in records if record["name"] == "twin")
    return str(twin["replicas"][0]["url"])


def test_requests_spread_over_replicas_by_load(proxy: Server) -> None:
    before = replica_requests(proxy)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: chat(proxy.openai(), "twin", 24), range(8)))
    assert all(answers)
    after = replica_requests(proxy)
    sent = [after[url] - before.get(url, 0) for url in after]
    assert sum(sent) == 8 and min(sent) >= 2, sent


def replica_in_flight(proxy: Server) -> dict[str, int]:
    records = httpx.get(f"{proxy.url}/api/ps").json()["models"]
    twin = next(record for record in records if record["name"] == "twin")
    return {replica["url"]: replica["in_flight"] for replica in twin["replicas"]}


def replica_requests(proxy: Server) -> dict[str, int]:
    records = httpx.get(f"{proxy.url}/api/ps").json()["models"]
    twin = next(record for record in records if record["name"] == "twin")
    return {replica["url"]: replica["requests"] for replica in twin["replicas"]}


def test_a_replica_killed_under_load_fails_no_request_that_had_not_streamed(
    proxy: Server, replicas: list[Server], store_cli: Cli
) -> None:
    victim = replicas[1]
    outcomes: list[tuple[int, bool]] = []  # (tokens received, finished cleanly)
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop() -> None:
        client = proxy.openai(timeout=60)
        while not stop.is_set():
            tokens, clean = 0, False
            try:
                for chunk in client.chat.completions.create(
                    model="twin", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=48,
                    stream=True,
                ):  # fmt: skip
                    if chunk.choices and chunk.choices[0].delta.content:
                        tokens += 1
                clean = True
            except (openai.APIError, httpx.HTTPError):
                pass
            with lock:
                outcomes.append((tokens, clean))

    threads = [threading.Thread(target=client_loop) for _ in range(6)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not replica_in_flight(proxy).get(victim.url):
        time.sleep(0.05)
    assert replica_in_flight(proxy).get(victim.url), "the victim had no request to lose"
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait()
    # At least 4 s and a dozen answers of load on the survivor: on a slow machine a fixed time gave fewer.
    killed = time.monotonic()
    while time.monotonic() - killed < 60 and (time.monotonic() - killed < 4 or len(outcomes) < 12):
        time.sleep(0.1)
    stop.set()
    for thread in threads:
        thread.join(timeout=90)
    failed = [tokens for tokens, clean in outcomes if not clean]
    assert len(outcomes) >= 12 and len(failed) < len(outcomes), outcomes
    assert all(tokens > 0 for tokens in failed), outcomes  # only answers cut mid-stream may fail
    # Back on its port: taken in again by the health check, and used.
    replicas[1] = revived = Server(store_cli, "--parallel", "2", "--ctx", "1024", "--no-log", "--threads", "1",
                                   port=victim.port)  # fmt: skip
    assert revived.url == victim.url
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        records = httpx.get(f"{proxy.url}/api/ps").json()["models"]
        twin = next(record for record in records if record["name"] == "twin")
        if all(replica["healthy"] for replica in twin["replicas"]):
            break
        time.sleep(0.5)
    before = replica_requests(proxy)
    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(lambda _: chat(proxy.openai(), "twin", 24), range(4)))
    assert replica_requests(proxy)[victim.url] > before[victim.url]


def test_an_upstream_that_sends_garbage_or_hangs_gets_a_clean_502_or_504(proxy: Server) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    garbage = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "garbage", **body}, timeout=30)
    assert garbage.status_code == 502
    assert "not JSON" in garbage.json()["error"]["message"]
    began = time.monotonic()
    stuck = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "stuck", **body, "stream": True}, timeout=30)
    assert stuck.status_code == 504 and time.monotonic() - began < 10
    assert stuck.json()["error"]["type"] == "server_error"
    ollama_stuck = httpx.post(f"{proxy.url}/api/chat", json={"model": "stuck", **body}, timeout=30)
    assert ollama_stuck.status_code == 504 and "error" in ollama_stuck.json()
    assert chat(proxy.openai(), "smol-native", 2)  # still serving


def test_a_bad_config_is_one_line_before_the_server_starts(store_cli: Cli, tmp_path: Path) -> None:
    cases = {
        "unknown key": ({"a": {"urls": ["http://127.0.0.1:1"], "modles": ["x"]}}, "unknown key 'modles'"),
        "no urls": ({"a": {"models": ["x"]}}, "needs urls"),
        "not http": ({"a": {"urls": ["127.0.0.1:8000"]}}, "needs urls"),
        "key unset": ({"a": {"urls": ["http://127.0.0.1:1"], "api_key_env": "LLMRUN_TEST_UNSET_KEY"}},
                      "LLMRUN_TEST_UNSET_KEY is not set"),
    }  # fmt: skip
    for name, (upstreams, fragment) in cases.items():
        config = write_config(tmp_path / f"{name}.toml", upstreams)
        result = store_cli("serve", "--config", str(config), "--port", str(free_port()))
        assert result.returncode == 2, (name, result.stderr)
        assert_one_line_error(result.stderr, fragment)
    (tmp_path / "broken.toml").write_text("[upstreams.a\n", encoding="utf-8")
    broken = store_cli("serve", "--config", str(tmp_path / "broken.toml"))
    assert broken.returncode == 2
    assert_one_line_error(broken.stderr, "is not valid TOML")


def test_an_upstream_key_comes_from_the_environment(store_cli: Cli, tmp_path: Path) -> None:
    guarded = Server(store_cli, "--ctx", "512", "--api-key", "sesame", "--no-log")
    config = write_config(tmp_path / "keyed.toml", {
        "keyed": {"urls": [guarded.url], "models": ["smollm2"], "api_key_env": "LLMRUN_TEST_UPSTREAM_KEY"},
    })  # fmt: skip
    proxy_home = Cli(tmp_path / "proxy-home")
    front = Server.bare(proxy_home, "--config", str(config), "--no-log", env={"LLMRUN_TEST_UPSTREAM_KEY": "sesame"})
    wrong = Server.bare(proxy_home, "--config", str(config), "--no-log", env={"LLMRUN_TEST_UPSTREAM_KEY": "wrong"})
    try:
        assert chat(front.openai(), "smollm2", 2)
        with pytest.raises(openai.InternalServerError) as refused:  # the upstream refused llmrun, not the client
            chat(wrong.openai(), "smollm2", 2)
        assert refused.value.status_code == 502 and "refused llmrun's key" in str(refused.value)
    finally:
        front.stop()
        wrong.stop()
        guarded.stop()
