"""Agents' APIs through the real server and real clients: Ollama tools (`ollama`), the Anthropic Messages API
(`anthropic`) and the OpenAI Responses API (`openai`'s `client.responses`)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import ollama
import openai
import pytest
from conftest import Cli
from serving import Server
from test_serve_tools import ASK, SCHEMAS, TOOLS, WEATHER

ANTHROPIC_TOOLS = [
    {"name": tool["function"]["name"], "description": tool["function"]["description"],  # type: ignore[index]
     "input_schema": tool["function"]["parameters"]}  # type: ignore[index]
    for tool in TOOLS
]  # fmt: skip
GREEDY = {"temperature": 0}  # the anthropic SDK no longer has sampling arguments; the API still takes them
RESPONSES_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]  # type: ignore[dict-item]


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Cli:
    cli = Cli(tmp_path_factory.mktemp("agents-home"))
    assert cli("import", str(smollm2), "--name", "smollm2", "--link").returncode == 0
    return cli


@pytest.fixture(scope="module")
def server(cli: Cli) -> Iterator[Server]:
    running = Server(cli, "--parallel", "2", "--ctx", "2048")
    yield running
    running.stop()


def claude(server: Server, api_key: str = "none") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=api_key, max_retries=0, timeout=120)


# -- Ollama -----------------------------------------------------------------------------------


def test_ollama_tools_come_back_as_objects_streamed_or_not(server: Server, cli: Cli) -> None:
    client = ollama.Client(host=server.url, timeout=120)
    options = {"temperature": 0, "num_predict": 120}
    asked = [{"role": "user", "content": "Call get_weather for Paris in celsius."}]
    answer = client.chat(model="smollm2", messages=asked, tools=TOOLS, options=options)
    calls = answer.message.tool_calls or []
    assert calls, answer.message  # SmolLM2 calls the tool when told to, and the grammar keeps the call valid
    for call in calls:
        assert isinstance(call.function.arguments, dict)
        jsonschema.validate(dict(call.function.arguments), SCHEMAS[call.function.name])
    streamed = list(client.chat(model="smollm2", messages=asked, tools=TOOLS, options=options, stream=True))
    assert streamed[-1].done and streamed[-1].done_reason == "stop"
    streamed_calls = [call for chunk in streamed for call in chunk.message.tool_calls or []]
    assert [(c.function.name, dict(c.function.arguments)) for c in streamed_calls] == [
        (c.function.name, dict(c.function.arguments)) for c in calls
    ]

    # The call and its result go back in Ollama's shape (object arguments, tool_name), and the model answers.
    history = [*asked, {"role": "assistant", "content": "", "tool_calls": [c.model_dump() for c in calls]},
               {"role": "tool", "tool_name": calls[0].function.name, "content": "18 degrees and sunny"}]  # fmt: skip
    final = client.chat(model="smollm2", messages=history, options={"temperature": 0, "num_predict": 30})
    assert final.message.content and not final.message.tool_calls

    # The log keeps the calls, as the JSON the client got (written just after the answer).
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        logged = [entry for entry in cli("logs", "--json", "-n", "0").json() if entry["prompt"] == asked[0]["content"]]
        if len(logged) >= 3:
            break
        time.sleep(0.5)
    *calls, last = sorted(logged, key=lambda entry: entry["id"])  # the two calls, then the answer to their result
    assert len(logged) == 3 and all(json.loads(entry["response"])["tool_calls"] for entry in calls)
    assert last["response"] == final.message.content


# -- Anthropic Messages -----------------------------------------------------------------------


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_forecast"}])
def test_anthropic_forced_tool_use_is_valid_streamed_or_not(server: Server, choice: dict[str, str]) -> None:
    client = claude(server)
    options: dict[str, Any] = {"model": "smollm2", "max_tokens": 120, "messages": ASK, "tools": ANTHROPIC_TOOLS,
                               "tool_choice": choice, "extra_body": GREEDY}  # fmt: skip
    message = client.messages.create(**options)
    assert message.stop_reason == "tool_use" and message.role == "assistant" and message.id.startswith("msg_")
    uses = [block for block in message.content if block.type == "tool_use"]
    assert uses
    for use in uses:
        jsonschema.validate(use.input, SCHEMAS[use.name])
        assert use.id.startswith("toolu_")
    if choice["type"] == "tool":
        assert {use.name for use in uses} == {"get_forecast"}
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) > 20
    assert message.usage.output_tokens > 0

    with client.messages.stream(**options) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_start" in kinds
    assert streamed.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in streamed.content if b.type == "tool_use"] == [(u.name, u.input) for u in uses]


def test_anthropic_tool_result_text_stop_sequences_and_prefill(server: Server) -> None:
    client = claude(server)
    history = [*ASK, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "unit": "celsius"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "18 degrees"}]}]  # fmt: skip
    answer = client.messages.create(model="smollm2", max_tokens=40, messages=history, tools=ANTHROPIC_TOOLS,
                                    tool_choice={"type": "none"}, extra_body=GREEDY, system="Be brief.")  # fmt: skip
    assert answer.stop_reason in ("end_turn", "max_tokens") and answer.content[0].type == "text"
    text = answer.content[0].text
    assert text

    # A stop sequence taken from that answer ends the same answer there, and is reported.
    words = [word for word in text.split() if len(word) > 2]
    stop = words[min(2, len(words) - 1)]
    stopped = client.messages.create(model="smollm2", max_tokens=40, messages=history, tools=ANTHROPIC_TOOLS,
                                     tool_choice={"type": "none"}, extra_body=GREEDY, system="Be brief.",
                                     stop_sequences=[stop, "zzqx"])  # fmt: skip
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert stopped.content[0].text == text[: text.index(stop)]  # type: ignore[union-attr]

    # A last assistant turn is a prefill: the answer continues it and does not repeat it.
    asked = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "The fruit is"}]
    plain = client.messages.create(model="smollm2", max_tokens=8, messages=asked[:1], extra_body=GREEDY)
    prefilled = client.messages.create(model="smollm2", max_tokens=8, messages=asked, extra_body=GREEDY)
    assert prefilled.usage.input_tokens + prefilled.usage.cache_read_input_tokens > (  # type: ignore[operator]
        plain.usage.input_tokens + plain.usage.cache_read_input_tokens  # type: ignore[operator]
    )
    assert not prefilled.content or not prefilled.content[0].text.startswith("The fruit is")  # type: ignore[union-attr]


def test_anthropic_output_config_format_holds_the_answer_to_the_schema(server: Server) -> None:
    answer = claude(server).messages.create(
        model="smollm2", max_tokens=80, messages=[{"role": "user", "content": "Weather in Paris as JSON."}],
        output_config={"format": {"type": "json_schema", "schema": WEATHER}}, extra_body=GREEDY,
    )  # fmt: skip
    jsonschema.validate(json.loads(answer.content[0].text), WEATHER)  # type: ignore[union-attr]


def test_anthropic_sdk_lists_and_gets_models_in_its_shape(server: Server) -> None:
    client = claude(server)
    names = [model.id for model in client.models.list()]
    assert "smollm2" in names and client.models.retrieve("smollm2").display_name == "smollm2"
    assert [model.id for model in server.openai().models.list()] == names  # the OpenAI shape, for OpenAI clients
    with pytest.raises(anthropic.NotFoundError) as raised:
        client.models.retrieve("no-such-model")
    assert raised.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_anthropic_count_tokens_matches_what_a_message_uses(server: Server) -> None:
    client = claude(server)
    options: dict[str, Any] = {"model": "smollm2", "messages": ASK, "tools": ANTHROPIC_TOOLS, "system": "Be brief."}
    counted = client.messages.count_tokens(**options)
    message = client.messages.create(max_tokens=4, **options)
    used = message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
    assert counted.input_tokens == used > 40


def test_anthropic_stream_event_sequence_on_the_wire(server: Server) -> None:
    body = {"model": "smollm2", "max_tokens": 6, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [record["type"] for record in data] == events
    assert events[:2] == ["message_start", "ping"] and events[-2:] == ["message_delta", "message_stop"]
    assert events.count("content_block_start") == events.count("content_block_stop") == 1
    assert data[-2]["delta"]["stop_reason"] == "max_tokens" and data[-2]["usage"]["output_tokens"] == 6
    assert data[0]["message"]["usage"]["input_tokens"] > 0


@pytest.mark.parametrize(
    ("body", "status", "kind", "expected"),
    [
        ({"messages": ASK}, 400, "invalid_request_error", "max_tokens"),
        ({"max_tokens": 8, "messages": ASK, "model": "no-such-model"}, 404, "not_found_error", "llmrun pull"),
        ({"max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]},
         400, "invalid_request_error", "text-only"),
        ({"max_tokens": 8, "messages": ASK, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
         400, "invalid_request_error", "Anthropic's own tools"),
        ({"max_tokens": 8, "messages": ASK, "tools": ANTHROPIC_TOOLS, "tool_choice": {"type": "tool", "name": "x"}},
         400, "invalid_request_error", "not among the tools"),
        ({"max_tokens": 8, "messages": [*ASK, {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_nope", "content": "18 degrees"}]}]},
         400, "invalid_request_error", "no earlier assistant message made"),
    ],
)  # fmt: skip
def test_anthropic_errors_have_anthropics_shape(
    server: Server, body: dict[str, Any], status: int, kind: str, expected: str
) -> None:
    response = httpx.post(f"{server.url}/v1/messages", json={"model": "smollm2", **body}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == kind and expected in error["error"]["message"]
    if "max_tokens" in body:  # (the SDK itself refuses a request without it)
        with pytest.raises(anthropic.APIStatusError) as raised:
            claude(server).messages.create(**{"model": "smollm2", **body})
        assert raised.value.status_code == status and raised.value.body["error"]["type"] == kind  # type: ignore[index]
    assert claude(server).messages.create(model="smollm2", max_tokens=2, messages=ASK).content is not None


def test_anthropic_sdk_sends_its_key_as_x_api_key(cli: Cli) -> None:
    guarded = Server(cli, "--api-key", "sekret", "--parallel", "1")
    try:
        answer = claude(guarded, api_key="sekret").messages.create(model="smollm2", max_tokens=2, messages=ASK)
        assert answer.usage.output_tokens == 2
        with pytest.raises(anthropic.AuthenticationError) as raised:
            claude(guarded, api_key="wrong").messages.create(model="smollm2", max_tokens=2, messages=ASK)
        assert raised.value.body["type"] == "error"  # type: ignore[index]
    finally:
        guarded.stop()


# -- OpenAI Responses -------------------------------------------------------------------------


def test_responses_chain_survives_a_restart_and_can_be_fetched_and_deleted(cli: Cli) -> None:
    first_server = Server(cli, "--parallel", "1")
    try:
        client = first_server.openai(timeout=120)
        first = client.responses.create(model="smollm2", input="My name is Ada. Say hi.", max_output_tokens=12,
                                        temperature=0, instructions="Be brief.")  # fmt: skip
        assert first.id.startswith("resp_") and first.output_text and first.status in ("completed", "incomplete")
        assert first.usage is not None and first.usage.input_tokens > 0
    finally:
        first_server.stop()
    second_server = Server(cli, "--parallel", "1")
    try:
        client = second_server.openai(timeout=120)
        assert client.responses.retrieve(first.id).output_text == first.output_text
        second = client.responses.create(model="smollm2", input="What is my name?", previous_response_id=first.id,
                                         max_output_tokens=8, temperature=0)  # fmt: skip
        alone = client.responses.create(model="smollm2", input="What is my name?", max_output_tokens=8,
                                        temperature=0, store=False)  # fmt: skip
        assert second.previous_response_id == first.id
        assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens  # type: ignore[union-attr]
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(alone.id)  # store false: not kept
        client.responses.delete(second.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(second.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="smollm2", input="Hi", previous_response_id=second.id)
    finally:
        second_server.stop()


def test_responses_function_calls_streamed_or_not_and_their_output(server: Server) -> None:
    client = server.openai(timeout=120)
    options: dict[str, Any] = {"model": "smollm2", "input": "What is the weather in Paris?", "tools": RESPONSES_TOOLS,
                               "tool_choice": "required", "max_output_tokens": 120, "temperature": 0}  # fmt: skip
    response = client.responses.create(**options)
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and response.status == "completed"
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        assert call.call_id and call.id.startswith("fc_")

    events = list(client.responses.create(stream=True, **options))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds and "response.output_item.done" in kinds
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1].response  # type: ignore[union-attr]
    assert [(i.name, i.arguments) for i in final.output if i.type == "function_call"] == [
        (c.name, c.arguments) for c in calls
    ]

    # The call's output continues the stored conversation; the model answers in text.
    answer = client.responses.create(
        model="smollm2", previous_response_id=response.id, tools=RESPONSES_TOOLS, tool_choice="none",
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 degrees and sunny"}],
        max_output_tokens=30, temperature=0,
    )  # fmt: skip
    assert answer.output_text and not [item for item in answer.output if item.type == "function_call"]


def test_responses_text_format_and_streamed_text(server: Server) -> None:
    client = server.openai(timeout=120)
    text_format = {"format": {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}}
    shaped = client.responses.create(model="smollm2", input="Weather in Paris as JSON.", text=text_format,  # type: ignore[arg-type]
                                     max_output_tokens=60, temperature=0)  # fmt: skip
    jsonschema.validate(json.loads(shaped.output_text), WEATHER)

    options: dict[str, Any] = {"model": "smollm2", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "Say hello."}]}], "max_output_tokens": 10, "temperature": 0}  # fmt: skip
    whole = client.responses.create(**options)
    deltas, final = [], None
    for event in client.responses.create(stream=True, **options):
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert final is not None and "".join(deltas) == whole.output_text == final.output_text
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ({"input": [{"type": "input_image", "image_url": "x"}]}, 400, "input_image"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "text-only"),
        ({"input": "Hi", "tools": [{"type": "web_search"}]}, 400, "hosted"),
        ({"input": "Hi", "previous_response_id": "resp_nope"}, 404, "no stored response"),
        ({"input": [{"type": "function_call_output", "call_id": "call_nope", "output": "1"}]}, 400,
         "no earlier assistant message made"),
        ({"input": "", "model": "smollm2"}, 400, "input is empty"),
        ({"input": "Hi", "model": "no-such-model"}, 404, "llmrun pull"),
    ],
)  # fmt: skip
def test_responses_errors_are_openai_shaped(server: Server, body: dict[str, Any], status: int, expected: str) -> None:
    response = httpx.post(f"{server.url}/v1/responses", json={"model": "smollm2", **body}, timeout=60)
    assert response.status_code == status, response.text
    assert expected in response.json()["error"]["message"]
    assert server.openai().responses.create(model="smollm2", input="Hi", max_output_tokens=2).output
