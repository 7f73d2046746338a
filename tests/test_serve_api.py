"""`llmrun serve`: a real server on 127.0.0.1 with the real SmolLM2, driven by the real openai and ollama clients."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import llama_cpp
import ollama
import openai
import pytest
from conftest import Cli, hub_env
from hub_standin import Fault, HubStandIn
from serving import Server


@pytest.fixture(scope="module")
def store_cli(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Cli:
    cli = Cli(tmp_path_factory.mktemp("serve-home"))
    assert cli("import", str(smollm2), "--name", "smollm2", "--link").returncode == 0
    return cli


@pytest.fixture(scope="module")
def server(store_cli: Cli) -> Iterator[Server]:
    running = Server(store_cli, "--parallel", "4", "--ctx", "1024")
    yield running
    running.stop()


def greedy(client: openai.OpenAI, prompt: str, max_tokens: int = 24) -> str:
    answer = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
    )
    return answer.choices[0].message.content or ""


def test_openai_chat_streamed_and_not_agree(server: Server) -> None:
    client = server.openai()
    text = greedy(client, "What is the capital of France?", 40)
    assert "Paris" in text
    chunks = list(
        client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=40, temperature=0, stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_openai_completion_n_stop_length_and_logprobs(server: Server) -> None:
    client = server.openai()
    completion = client.completions.create(model="smollm2", prompt="One, two, three,", max_tokens=5, temperature=0)
    assert completion.choices[0].finish_reason == "length" and completion.usage.completion_tokens == 5
    answer = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=2, seed=7,
        logprobs=True, top_logprobs=3,
    )  # fmt: skip
    assert [choice.index for choice in answer.choices] == [0, 1]
    entries = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(entries) == 4 and all(e.logprob <= 0 and len(e.top_logprobs) == 3 for e in entries)
    stopped = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=["7"])
    assert "7" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_json_schema_output_parses_and_matches(server: Server) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}  # fmt: skip
    answer = server.openai().chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )  # fmt: skip
    person = json.loads(answer.choices[0].message.content or "")
    assert isinstance(person["name"], str) and isinstance(person["age"], int)


def test_json_schema_strings_never_hold_raw_control_characters(server: Server, smollm2: Path) -> None:
    """JSON forbids a raw newline or tab inside a string; push both up so only the grammar keeps them out."""
    vocab = llama_cpp.Llama(str(smollm2), vocab_only=True, verbose=False)
    controls = {str(token): 30.0 for text in (b"\n", b"\t") for token in vocab.tokenize(text, add_bos=False)}
    schema = {"type": "object", "properties": {"poem": {"type": "string"}}, "required": ["poem"]}
    answer = server.openai().chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Write a short poem, as JSON."}], max_tokens=40,
        logit_bias=controls, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "poem", "schema": schema}},
    )  # fmt: skip
    text = answer.choices[0].message.content or ""
    # Between tokens JSON may have newlines and tabs (the grammar lets a model lay it out); inside a string, never.
    inside, escaped, raw = False, False, []
    for char in text:
        if inside and not escaped and char == '"' or not inside and char == '"':
            inside = not inside
        elif inside and char < " ":
            raw.append(char)
        escaped = inside and char == "\\" and not escaped
    assert not raw and '"poem"' in text, text
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text)["poem"], str)


def test_embeddings_float_and_base64(server: Server) -> None:
    client = server.openai()
    floats = client.embeddings.create(model="smollm2", input=["hello", "world"])
    assert len(floats.data) == 2
    assert all(abs(sum(x * x for x in item.embedding) - 1) < 1e-4 for item in floats.data)
    raw = httpx.post(f"{server.url}/v1/embeddings", json={"model": "smollm2", "input": "hello",
                                                            "encoding_format": "base64"}).json()  # fmt: skip
    import base64
    import struct

    decoded = base64.b64decode(raw["data"][0]["embedding"])
    values = struct.unpack(f"<{len(decoded) // 4}f", decoded)
    assert max(abs(a - b) for a, b in zip(values, floats.data[0].embedding, strict=True)) < 1e-6


def test_ollama_client_chat_generate_and_models(server: Server) -> None:
    client = ollama.Client(host=server.url)
    assert "smollm2" in [model.model for model in client.list().models]
    reply = client.chat(model="smollm2", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 6})
    assert reply.done and reply.eval_count == 6 and reply.message.content
    streamed = "".join(
        part.message.content or ""
        for part in client.chat(
            model="smollm2", messages=[{"role": "user", "content": "Hi"}], stream=True, options={"num_predict": 6}
        )
    )
    assert streamed
    colour = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 12}}, "required": ["colour"]}
    generated = client.generate(
        model="smollm2:latest", prompt="Name a colour", format=colour, options={"num_predict": 60}
    )
    assert isinstance(json.loads(generated.response)["colour"], str)
    assert client.show("smollm2").details.family == "llama"  # type: ignore[union-attr]
    assert [model.model for model in client.ps().models] == ["smollm2"]
    assert len(client.embed(model="smollm2", input="hi").embeddings[0]) == 576
    with pytest.raises(ollama.ResponseError, match="images"):
        client.chat(model="smollm2", messages=[{"role": "user", "content": "what is this", "images": ["aGk="]}])


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", b'{"model": "smollm2", "messages": [], "temperature": "hot"}', 400, None),
        ("/v1/chat/completions", b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404,
         "model_not_found"),
        ("/v1/completions", json.dumps({"model": "smollm2", "prompt": "word " * 1200}).encode(), 400,
         "context_length_exceeded"),
        ("/api/chat", b"[1, 2]", 400, None),
        # Model names no file can have: a NUL byte (after "~", a user name), a name too long for a file.
        ("/v1/embeddings", json.dumps({"model": "~a\u0000b", "input": "x"}).encode(), 400, None),
        ("/api/show", json.dumps({"model": "x\u0000"}).encode(), 400, None),
        ("/v1/chat/completions", json.dumps({"model": "m" * 300, "messages": [{"role": "user", "content": "x"}]}
                                            ).encode(), 404, "model_not_found"),
    ],
)  # fmt: skip
def test_bad_requests_get_4xx_and_the_server_keeps_serving(
    server: Server, path: str, body: bytes, status: int, code: str | None
) -> None:
    response = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if path.startswith("/v1"):
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    else:
        assert isinstance(error, str)
    assert greedy(server.openai(), "Hi", 3)


def eight_concurrent_streams(server: Server) -> dict[int, tuple[int, str]]:
    """Stream 0 is greedy on a fixed prompt; streams 1-7 sample 32 tokens each, ignoring end-of-text."""
    client = server.openai(timeout=120)
    results: dict[int, tuple[int, str]] = {}

    def stream(index: int) -> None:
        prompt = "Tell me about the sea." if index == 0 else f"Write a line about the number {index}."
        chunks = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": prompt}], max_tokens=32,
            temperature=0 if index == 0 else 0.8, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": index != 0},
        )  # fmt: skip
        parts = [chunk for chunk in chunks]
        text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
        results[index] = (parts[-1].usage.completion_tokens if parts[-1].usage else 0, text)  # type: ignore[union-attr]

    threads = [threading.Thread(target=stream, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    return results


def test_eight_concurrent_streams_all_complete(server: Server) -> None:
    results = eight_concurrent_streams(server)
    assert len(results) == 8
    assert all(tokens == 32 for index, (tokens, _) in results.items() if index != 0)
    assert results[0][1]


SHARED_SYSTEM = "You are a careful assistant. " + " ".join(f"Rule {i}: be exact about item {i}." for i in range(40))


def test_greedy_answers_are_the_same_alone_and_among_eight(store_cli: Cli) -> None:
    """With --deterministic, company must not change a greedy answer: plain prompts, and ones whose prefix is copied."""
    crowded = Server(store_cli, "--parallel", "8", "--ctx", "2048", "--no-log", "--deterministic")
    prompts = ["Tell me about the sea.", "Write a poem about cats.", "What is 2+2?", "Explain gravity."]
    requests = [([], prompt) for prompt in prompts] + [([SHARED_SYSTEM], prompt) for prompt in prompts]

    def ask(system: list[str], prompt: str, delay: float = 0.0) -> str:
        time.sleep(delay)
        messages = [{"role": "system", "content": text} for text in system] + [{"role": "user", "content": prompt}]
        chunks = crowded.openai(timeout=180).chat.completions.create(
            model="smollm2",
            messages=messages,
            max_tokens=48,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
        )
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)

    try:
        alone = [ask(system, prompt) for system, prompt in requests]
        together: dict[int, str] = {}

        def run(index: int) -> None:
            together[index] = ask(*requests[index], delay=0.15 * (index % 4))  # join at different steps

        threads = [threading.Thread(target=run, args=(index,)) for index in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
        assert [together.get(index) for index in range(len(requests))] == alone
    finally:
        crowded.stop()


def test_a_prefix_shared_by_requests_arriving_together_is_evaluated_once(store_cli: Cli) -> None:
    sharing = Server(store_cli, "--parallel", "4", "--ctx", "2048")
    questions = ["Who are you?", "What is 2+2?", "Name a color.", "Say hello."]
    try:
        prompt_tokens: dict[int, int] = {}

        def ask(index: int) -> None:
            answer = sharing.openai(timeout=240).chat.completions.create(
                model="smollm2", max_tokens=4, temperature=0,
                messages=[{"role": "system", "content": SHARED_SYSTEM}, {"role": "user", "content": questions[index]}],
            )  # fmt: skip
            prompt_tokens[index] = answer.usage.prompt_tokens  # type: ignore[union-attr]

        threads = [threading.Thread(target=ask, args=(index,)) for index in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        metrics = httpx.get(f"{sharing.url}/metrics").text
        hits = next(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("llmrun_prefix_cache_hit_tokens"))  # fmt: skip
        shared = min(prompt_tokens.values()) - 20  # the system prompt, less the question and the template around it
        assert shared > 300 and hits >= 3 * shared, (hits, prompt_tokens)

        def logged() -> int:
            entries = store_cli("logs", "--json", "-n", "0").json()
            return sum(entry["model"] == "smollm2" and entry["prompt"] in questions for entry in entries)

        deadline = time.monotonic() + 20  # the log is written off the event loop, just after each answer
        while (count := logged()) < 4 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert count == 4
    finally:
        sharing.stop()


def test_disconnecting_client_frees_its_slot(server: Server) -> None:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Count"}], "max_tokens": 2000,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert server.busy_slots() == 1
    deadline = time.monotonic() + 10
    while server.busy_slots() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.busy_slots() == 0


def test_client_leaving_a_non_streamed_request_frees_its_slot(server: Server) -> None:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Count"}], "max_tokens": 2000,
            "ignore_eos": True, "stream": False}  # fmt: skip
    for route in ("/v1/chat/completions", "/api/chat"):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                f"{server.url}{route}", json={**body, "options": {"num_predict": 2000, "ignore_eos": True}}, timeout=1.5
            )
        deadline = time.monotonic() + 10
        while server.busy_slots() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.busy_slots() == 0, route


def test_metrics_count_requests_tokens_and_cache(server: Server) -> None:
    greedy(server.openai(), "Hi", 2)
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "llmrun_requests_total",
        "llmrun_prompt_tokens_total",
        "llmrun_time_to_first_token_seconds_bucket",
        "llmrun_inter_token_latency_seconds_bucket",
        "llmrun_prefix_cache_hit_tokens",
        "llmrun_queue_depth",
    ):
        assert name in text, name  # fmt: skip


def test_metrics_show_the_kv_caches_saved_in_host_memory(store_cli: Cli) -> None:
    one_slot = Server(store_cli, "--parallel", "1", "--ctx", "2048", "--no-log")
    try:
        # Two conversations that start differently: the second takes the first one's slot, which is saved.
        for prompt in (f"{SHARED_SYSTEM} Write about the sea.", f"Write about the mountains. {SHARED_SYSTEM}"):
            greedy(one_slot.openai(), prompt, 2)
        text = httpx.get(f"{one_slot.url}/metrics").text
        samples = {
            line.split()[0]: float(line.split()[-1]) for line in text.splitlines() if line.startswith("llmrun_host")
        }
        assert samples['llmrun_host_cache_entries{model="smollm2"}'] == 1
        assert samples['llmrun_host_cache_bytes{model="smollm2"}'] > 1 << 20
    finally:
        one_slot.stop()


def test_api_key_guards_every_route_but_health(store_cli: Cli) -> None:
    guarded = Server(store_cli, "--api-key", "secret", "--ctx", "512", "--no-log")
    try:
        assert httpx.get(f"{guarded.url}/health").status_code == 200
        missing = httpx.get(f"{guarded.url}/v1/models")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{guarded.url}/api/tags", headers={"x-api-key": "wrong"}).status_code == 401
        assert httpx.get(f"{guarded.url}/api/tags", headers={"x-api-key": "secret"}).status_code == 200
        client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="secret", max_retries=0)
        assert greedy(client, "Hi", 2)
    finally:
        assert guarded.stop() == 0


def test_full_queue_answers_503_with_retry_after(store_cli: Cli) -> None:
    busy = Server(store_cli, "--parallel", "1", "--queue", "0", "--ctx", "4096", "--no-log")
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Go"}], "max_tokens": 3000,
            "ignore_eos": True, "stream": True}  # fmt: skip
    try:
        with httpx.stream("POST", f"{busy.url}/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()  # kept: dropping the iterator would close the stream
            next(lines)
            refused = httpx.post(f"{busy.url}/v1/chat/completions", json={**body, "stream": False})
            assert refused.status_code == 503 and refused.headers["retry-after"]
    finally:
        busy.stop()


def test_keep_alive_unloads_and_ps_stop_see_the_server(store_cli: Cli) -> None:
    short = Server(store_cli, "--keep-alive", "2s", "--ctx", "512", "--no-log")
    try:
        assert greedy(short.openai(), "Hi", 2)
        listed = store_cli("ps", "--server", short.url, "--json")
        assert [model["name"] for model in listed.json()] == ["smollm2"]
        deadline = time.monotonic() + 8
        while httpx.get(f"{short.url}/api/ps").json()["models"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(f"{short.url}/api/ps").json()["models"] == []
        assert greedy(short.openai(), "Hi", 2)  # loads again on demand
        stopped = store_cli("stop", "smollm2", "--server", short.url)
        assert stopped.returncode == 0, stopped.stderr
        assert httpx.get(f"{short.url}/api/ps").json()["models"] == []
    finally:
        short.stop()


def test_sigterm_ends_open_streams_and_exits_0(store_cli: Cli) -> None:
    ending = Server(store_cli, "--ctx", "4096")
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Go"}], "max_tokens": 4000,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{ending.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        next(lines)
        began = time.monotonic()
        ending.process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert time.monotonic() - began < 25
    assert any('"error"' in line for line in rest) and rest[-1] == "data: [DONE]"
    assert ending.process.wait(timeout=30) == 0
    logged = store_cli("logs", "--json", "-n", "0").json()
    assert isinstance(logged, list)


def test_ollama_client_pulls_from_the_hub_and_deletes(cli: Cli, hub: HubStandIn, home: Path, smollm2: Path) -> None:
    """/api/pull and /api/delete through the real ollama client, on the same store as the CLI."""
    env, base_env = hub_env(hub, home), cli.env
    cli.env = lambda **extra: base_env(**{**env, **extra})  # type: ignore[method-assign]
    assert cli("import", str(smollm2), "--name", "smollm2", "--link").returncode == 0
    hub.add_file("someone/Broken-GGUF", "Broken-Q4_K_M.gguf", smollm2)
    hub.fault("someone/Broken-GGUF", "Broken-Q4_K_M.gguf", Fault(corrupt=True))
    serving = Server(cli, "--ctx", "512", "--no-log")
    client = ollama.Client(host=serving.url)
    pulled = "bartowski/Tiny-GGUF:Q4_K_M"
    try:
        records = list(client.pull("bartowski/Tiny-GGUF", stream=True))
        assert records[-1].status == "success" and any(record.total for record in records), records
        assert pulled in [model.model for model in client.list().models]
        assert client.generate(model=pulled, prompt="Hi", options={"num_predict": 3}).done
        for missing in ("someone/missing-GGUF", "someone/Broken-GGUF"):
            with pytest.raises(ollama.ResponseError) as refused:
                client.pull(missing, stream=False)
            assert 400 <= refused.value.status_code < 600, missing
        listed = [entry["name"] for entry in cli("list", "--json").json()]
        assert not any("Broken" in name for name in listed), listed
        assert pulled in [model.model for model in client.ps().models]
        client.delete(pulled)  # loaded: unloaded, then removed
        assert pulled not in [model.model for model in client.list().models]
        assert pulled not in [model.model for model in client.ps().models]
        assert pulled not in [entry["name"] for entry in cli("list", "--json").json()]
        with pytest.raises(ollama.ResponseError) as unknown:
            client.delete("nothing-here")
        assert unknown.value.status_code == 404
        assert client.generate(model="smollm2", prompt="Hi", options={"num_predict": 2}).done  # still serving
    finally:
        serving.stop()


def test_ollama_copy_and_a_curl_delete_as_ollamas_docs_send_it(
    cli: Cli, smollm2: Path, tiny_model: Path, home: Path
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    assert cli("import", str(smollm2), "--name", "smollm2", "--link").returncode == 0
    assert cli("import", str(tiny_model), "--name", "tiny").returncode == 0
    serving = Server(cli, "--ctx", "512", "--no-log")
    client = ollama.Client(host=serving.url)
    try:
        assert client.copy("tiny", "tiny-copy").status == "success"
        assert {model.model for model in client.list().models} == {"smollm2", "tiny", "tiny-copy"}
        # Form-encoded, as `curl -d` sends it: read as JSON all the same.
        deleted = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE", f"{serving.url}/api/delete",
             "-d", '{"model": "tiny"}'],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert deleted.stdout == "200", deleted
        assert len(list((home / "files").rglob("*.gguf"))) == 1  # the copy's name still uses the file
        assert client.generate(model="tiny-copy", prompt="Hi", options={"num_predict": 2}).done
        with pytest.raises(ollama.ResponseError) as missing:
            client.copy("nothing-here", "other")
        assert missing.value.status_code == 404
        client.delete("tiny-copy")
        assert [entry["name"] for entry in cli("list", "--json").json()] == ["smollm2"]
        assert not list((home / "files").rglob("*.gguf"))
    finally:
        serving.stop()


def test_a_long_prompt_does_not_stall_running_streams(store_cli: Cli) -> None:
    """A 1,200-token prompt is fed in chunks between decode steps: a running stream keeps getting tokens."""
    serving = Server(store_cli, "--parallel", "2", "--ctx", "1536", "--no-log")
    long_prompt = " ".join(f"Item {i} is on shelf {i % 7}." for i in range(130)) + " Which shelf holds item 3?"
    # Greedy, so the stream's text is the same each run (sampled text may hold a partial marker back a while).
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Count to a thousand."}],
            "max_tokens": 400, "ignore_eos": True, "stream": True, "temperature": 0}  # fmt: skip
    arrivals: list[float] = []
    timing: dict[str, float] = {}

    def ask_long() -> None:
        began = time.monotonic()
        answer = serving.openai(timeout=300).completions.create(model="smollm2", prompt=long_prompt, max_tokens=1)
        timing.update(began=began, ended=time.monotonic(), tokens=answer.usage.prompt_tokens)  # type: ignore[union-attr]

    try:
        with httpx.stream("POST", f"{serving.url}/v1/chat/completions", json=body, timeout=300) as response:
            lines = response.iter_lines()
            for _ in range(5):
                next(lines)
            long_request = threading.Thread(target=ask_long)
            long_request.start()
            for _line in lines:
                arrivals.append(time.monotonic())
                if not long_request.is_alive() and "ended" in timing and arrivals[-1] > timing["ended"] + 1:
                    break
            long_request.join(timeout=300)
        during = [at for at in arrivals if timing["began"] <= at <= timing["ended"]]
        gaps = [later - earlier for earlier, later in zip(during, during[1:], strict=False)]
        prefill_s = timing["ended"] - timing["began"]
        assert timing["tokens"] > 1024 and len(during) >= 3, (timing, len(during))
        # Fed in three chunks, the longest wait is about 0.4 of the prefill (a loaded machine stretches one chunk
        # more than others); a stream stalled for the whole prompt would wait all of it.
        assert max(gaps) < 0.75 * prefill_s, (max(gaps), prefill_s)
    finally:
        serving.stop()
