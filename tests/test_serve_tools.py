"""Tool calling through the real server and the real `openai` client: calls valid by construction."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from conftest import Cli
from serving import Server
from synthetic_gguf import write_model
from test_templates import llama_cpp_templates

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
FORECAST = {
    "type": "object",
    "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 9}, "unit": {"enum": ["c", "f"]}},
    "required": ["days", "unit"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_forecast", "description": "Forecast", "parameters": FORECAST}},
]
SCHEMAS = {"get_weather": WEATHER, "get_forecast": FORECAST}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HARMONY_TOKENS = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>")

# A template written the way Qwen 2.5 and Hermes write theirs: tools in the system turn, calls in <tool_call>.
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call functions. <tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>
Return calls as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}{%- for message in messages %}<|im_start|>{{ message.role }}
{% if message.tool_calls %}{% for call in message.tool_calls %}<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>{% endfor %}{% else %}{{ message.content }}{% endif %}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


# Mistral Small 3.2 / Devstral's way (v11 tokenizer): each call as [TOOL_CALLS]name[ARGS]{arguments}.
MISTRAL_V11_TEMPLATE = """{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}\
{%- for message in messages %}{% if message.role == 'user' %}[INST]{{ message.content }}[/INST]\
{% elif message.tool_calls %}{% for call in message.tool_calls %}[TOOL_CALLS]{{ call.function.name }}[ARGS]\
{{ call.function.arguments | tojson }}{% endfor %}</s>{% elif message.role == 'tool' %}[TOOL_RESULTS]\
{{ message.content }}[/TOOL_RESULTS]{% else %}{{ message.content }}</s>{% endif %}{% endfor %}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Iterator[Server]:
    cli = Cli(tmp_path_factory.mktemp("tools-home"))
    hermes = write_model(tmp_path_factory.mktemp("models") / "hermes-tiny.gguf", chat_template=HERMES_TEMPLATE)
    assert cli("import", str(smollm2), "--name", "smollm2", "--link").returncode == 0
    assert cli("import", str(hermes), "--name", "hermes-tiny").returncode == 0
    # Its markers are control tokens, as in Mistral's real vocabularies: they must still reach the parser.
    mistral = write_model(
        tmp_path_factory.mktemp("models") / "mistral-tiny.gguf",
        chat_template=MISTRAL_V11_TEMPLATE,
        special_tokens=("[TOOL_CALLS]", "[ARGS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"),
    )
    assert cli("import", str(mistral), "--name", "mistral-tiny").returncode == 0
    # gpt-oss's own template and harmony's control tokens (<|call|> and <|return|> end a turn, <|end|> a message).
    harmony = write_model(
        tmp_path_factory.mktemp("models") / "harmony-tiny.gguf",
        chat_template=llama_cpp_templates()["openai-gpt-oss-120b.jinja"],
        special_tokens=HARMONY_TOKENS,
        eos_token="<|return|>",
    )
    assert cli("import", str(harmony), "--name", "harmony-tiny").returncode == 0
    running = Server(cli, "hermes-tiny", "--parallel", "2", "--ctx", "2048", "--no-log")
    yield running
    running.stop()


def check_call(call: object) -> dict[str, object]:
    function = call.function  # type: ignore[attr-defined]
    arguments = json.loads(function.arguments)
    jsonschema.validate(arguments, SCHEMAS[function.name])
    assert call.id and call.type == "function"  # type: ignore[attr-defined]
    return {"name": function.name, "arguments": arguments}


@pytest.mark.parametrize("model", ["smollm2", "hermes-tiny", "mistral-tiny", "harmony-tiny"])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_forecast"}}])
def test_forced_calls_parse_and_match_their_schema_streamed_or_not(server: Server, model: str, choice: object) -> None:
    client = server.openai(timeout=120)
    # The synthetic model's text is noise (its strings are bytes that need not be UTF-8): one call at a time, of
    # the tool without strings, with room for its byte-sized tokens.
    options = {"max_tokens": 120, "tools": TOOLS}
    if model != "smollm2":
        options = {"max_tokens": 400, "parallel_tool_calls": False, "tools": TOOLS[1:]}
    answer = client.chat.completions.create(
        model=model,
        messages=ASK,
        tool_choice=choice,
        temperature=0,
        **options,  # type: ignore[arg-type]
    )
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls" and message.tool_calls, message
    calls = [check_call(call) for call in message.tool_calls]
    if isinstance(choice, dict):
        assert {call["name"] for call in calls} == {"get_forecast"}

    chunks = client.chat.completions.create(
        model=model,
        messages=ASK,
        tool_choice=choice,
        temperature=0,
        stream=True,
        **options,  # type: ignore[arg-type]
    )
    streamed: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in chunks:
        for delta_choice in chunk.choices:
            reasons.append(delta_choice.finish_reason)
            for delta in delta_choice.delta.tool_calls or []:
                if delta.id is not None:
                    assert delta.index not in streamed and delta.function and delta.function.name
                    streamed[delta.index] = {"name": delta.function.name, "arguments": "", "id": delta.id}
                streamed[delta.index]["arguments"] += (delta.function and delta.function.arguments) or ""
    assert reasons[-1] == "tool_calls"
    # The same calls (as JSON values: the second request reuses the first's cached prompt, which may change
    # a greedy pick between equally likely spellings, such as a space after a colon).
    assert [
        {"name": call["name"], "arguments": json.loads(call["arguments"])} for _, call in sorted(streamed.items())
    ] == calls


@pytest.mark.parametrize("model", ["smollm2", "hermes-tiny"])
def test_a_call_forced_to_one_tool_opens_in_the_prompt(server: Server, model: str) -> None:
    """Its opening (up to the arguments) is evaluated with the prompt, not generated: the same call takes fewer
    generated tokens than when it is written whole (as with log-probabilities asked, which every token needs)."""
    client = server.openai(timeout=120)
    options = {"model": model, "messages": ASK, "tools": TOOLS[1:], "tool_choice": "required", "temperature": 0,
               "max_tokens": 400, "parallel_tool_calls": False}  # fmt: skip
    led = client.chat.completions.create(**options)  # type: ignore[call-overload]
    whole = client.chat.completions.create(**options, logprobs=True)  # type: ignore[call-overload]
    for answer in (led, whole):
        assert answer.choices[0].finish_reason == "tool_calls", answer
        assert [check_call(call)["name"] for call in answer.choices[0].message.tool_calls] == ["get_forecast"]
    assert whole.usage.completion_tokens > led.usage.completion_tokens
    assert led.usage.prompt_tokens > whole.usage.prompt_tokens  # the opening counts as prompt
    # max_tokens bounds what is generated: a call it cuts short is text, never a broken call.
    short = client.chat.completions.create(**{**options, "max_tokens": 3})  # type: ignore[call-overload]
    assert short.usage.completion_tokens <= 3 and short.choices[0].finish_reason == "length"
    assert not short.choices[0].message.tool_calls and short.choices[0].message.content


def test_a_tool_result_fed_back_yields_an_answer(server: Server) -> None:
    client = server.openai(timeout=120)
    first = client.chat.completions.create(
        model="smollm2",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=120,
        temperature=0,  # type: ignore[arg-type]
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]  # fmt: skip
    answer = client.chat.completions.create(
        model="smollm2",
        messages=history,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=40,
        temperature=0,  # type: ignore[arg-type]
    )
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    # With auto, the model may answer or call again; either way what comes back is valid.
    auto = client.chat.completions.create(
        model="smollm2",
        messages=history,
        tools=TOOLS,
        max_tokens=120,
        temperature=0,  # type: ignore[arg-type]
    )
    message = auto.choices[0].message
    if auto.choices[0].finish_reason == "tool_calls":
        for made in message.tool_calls or []:
            check_call(made)
    else:
        assert message.content and not message.tool_calls


@pytest.mark.parametrize(
    ("change", "expected", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools", "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
         "not a valid JSON schema", "tools"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot be combined", None),
        ({"tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "not valid", "tools"),
        ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_nope", "content": "1"}]},
         "no earlier assistant message made", "messages"),
    ],
)  # fmt: skip
def test_bad_tool_requests_get_openai_400s_and_the_server_keeps_serving(
    server: Server, change: dict[str, object], expected: str, param: str | None
) -> None:
    body = {"model": "smollm2", "messages": ASK, "tools": TOOLS, "max_tokens": 8, **change}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert expected in error["message"] and error["type"] == "invalid_request_error"
    if param is not None:  # the field at fault, as OpenAI names it
        assert error["param"] is not None and error["param"].startswith(param), error
    assert server.openai().chat.completions.create(model="smollm2", messages=ASK, max_tokens=4).choices


def test_tool_calls_in_history_without_tools_still_render(server: Server) -> None:
    """A conversation that used tools earlier goes on without them (the client dropped the tools)."""
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_9", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "18 degrees"}]  # fmt: skip
    for model in ("smollm2", "hermes-tiny"):
        answer = server.openai(timeout=120).chat.completions.create(model=model, messages=history, max_tokens=8)
        assert answer.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError):
        server.openai().chat.completions.create(model="smollm2", messages=history, tools=TOOLS, tool_choice="any")  # type: ignore[arg-type]
