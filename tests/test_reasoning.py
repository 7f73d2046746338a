"""Reasoning models' thinking apart from their answer: the splitter on recorded outputs cut at random, and
every API on a real model whose template thinks (SmolLM2 with a Qwen3-style template that opens <think>)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import pytest
from conftest import Cli
from serving import Server
from synthetic_gguf import write_model
from test_templates import llama_cpp_templates

from llmrun.engine.model import Model
from llmrun.reasoning import (
    CONTENT,
    HARMONY,
    REASONING,
    THINK,
    ReasoningFormat,
    reasoning_format,
)
from llmrun.tools import Tool, ToolCallParser, ToolFormat, ToolPlan

# Written as Qwen3's: the generation prompt opens the think block, or writes an empty one when thinking is off;
# earlier answers lose their thinking.
THINKING_TEMPLATE = """{%- for message in messages %}<|im_start|>{{ message.role }}
{% if message.role == 'assistant' and '</think>' in (message.content or '') %}\
{{ message.content.split('</think>')[-1].lstrip('\\n') }}{% else %}{{ message.content }}{% endif %}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"""

# Outputs as reasoning models write them, and how they split.
RECORDED = [
    ("<think>\nThe user greets me.\n</think>\n\nHello! How can I help?", False,
     "The user greets me.", "Hello! How can I help?"),
    ("Okay, 2+2 is 4, since </th is not a tag.\n</think>\n\nThe answer is 4.", True,
     "Okay, 2+2 is 4, since </th is not a tag.", "The answer is 4."),
    ("Plain answer, no thinking.", False, "", "Plain answer, no thinking."),
    ("  <think>cut off in the mid", False, "cut off in the mid", ""),
    ("Still thinking when max_tokens came", True, "Still thinking when max_tokens came", ""),
    ("</think>\n\nOnly an answer.", True, "", "Only an answer."),
    ("Answer that mentions <think> later", False, "", "Answer that mentions <think> later"),
]  # fmt: skip


MAGISTRAL = ReasoningFormat("[THINK]", "[/THINK]")
# Other families' formats, as their models write them. gpt-oss's harmony: <|end|> closes a message (rendered
# where the vocabulary has it), the next starts with <|start|>assistant; a call is a message to a function.
RECORDED_FORMATS = [
    (MAGISTRAL, "[THINK]The user greets me.[/THINK]Hello! How can I help?", False,
     "The user greets me.", "Hello! How can I help?"),
    (ReasoningFormat("<seed:think>", "</seed:think>"), "<seed:think>\nSum it.\n</seed:think>\n4", False,
     "Sum it.", "4"),
    (HARMONY, "<|channel|>analysis<|message|>User asks 2+2. Simple.<|end|><|start|>assistant<|channel|>final"
     "<|message|>2 + 2 = 4.", False, "User asks 2+2. Simple.", "2 + 2 = 4."),
    (HARMONY, "<|channel|>analysis<|message|>No end token in sight<|start|>assistant<|channel|>final<|message|>Ok",
     False, "No end token in sight", "Ok"),
    (HARMONY, "<|channel|>analysis<|message|>Cut off while thinking", False, "Cut off while thinking", ""),
    (HARMONY, "A model that ignores its format <| entirely", False, "", "A model that ignores its format <| entirely"),
    (HARMONY, "<|channel|>final<|message|>a < b, and <|x|> is text", False, "", "a < b, and <|x|> is text"),
    (HARMONY, "<|channel|>" + "no marker ever " * 20, False, "", "<|channel|>" + "no marker ever " * 20),
    (HARMONY, "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
     'to=functions.get_weather <|constrain|>json<|message|>{"location":"Tokyo"}', False,
     "Need the weather.", 'to=functions.get_weather<|message|>{"location":"Tokyo"}'),
    (HARMONY, ' to=functions.get_weather<|channel|>commentary json<|message|>{"location":"Oslo"}', False,
     "", 'to=functions.get_weather<|message|>{"location":"Oslo"}'),
    (HARMONY, "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>commentary "
     'to=functions.get_weather <|constrain|>json<|message|>{"location":"Rome"}', False,
     "", 'Checking.to=functions.get_weather<|message|>{"location":"Rome"}'),
]  # fmt: skip


def split(text: str, inside: bool, cuts: list[int], fmt: ReasoningFormat = THINK) -> tuple[str, str]:
    splitter = fmt.splitter(inside)
    pieces: list[tuple[str, str]] = []
    for begin, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        pieces += splitter.feed(text[begin:end])
    pieces += splitter.finish()
    assert all(kind in (REASONING, CONTENT) and piece for kind, piece in pieces)
    return "".join(p for k, p in pieces if k == REASONING), "".join(p for k, p in pieces if k == CONTENT)


@pytest.mark.parametrize(("text", "inside", "reasoning", "content"), RECORDED)
def test_thinking_splits_from_the_answer_however_the_stream_is_cut(
    text: str, inside: bool, reasoning: str, content: str
) -> None:
    rng = random.Random(text)
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(12, len(text) - 1))))
        assert split(text, inside, cuts) == (reasoning, content), cuts


@pytest.mark.parametrize(("fmt", "text", "inside", "reasoning", "content"), RECORDED_FORMATS)
def test_other_families_formats_split_however_the_stream_is_cut(
    fmt: ReasoningFormat, text: str, inside: bool, reasoning: str, content: str
) -> None:
    rng = random.Random(text)
    for _ in range(100):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(12, len(text) - 1))))
        assert split(text, inside, cuts, fmt) == (reasoning, content), cuts


def test_a_gpt_oss_call_reaches_the_tool_parser_through_the_splitter() -> None:
    weather = Tool("get_weather", "", {"type": "object", "properties": {"location": {"type": "string"}}})
    parser = ToolCallParser(ToolPlan(ToolFormat.HARMONY, (weather,), "root ::= x", (), True, False))
    _, content = split(RECORDED_FORMATS[-1][1], False, [7, 40, 95], HARMONY)
    parser.feed(content)
    parser.finish()
    assert parser.final_content() == "Checking."
    assert [(call.name, json.loads(call.arguments)) for call in parser.tool_calls] == [
        ("get_weather", {"location": "Rome"})
    ]


def test_formats_are_read_off_the_real_templates() -> None:
    templates = llama_cpp_templates()
    assert reasoning_format(templates["openai-gpt-oss-120b.jinja"]) == HARMONY
    assert reasoning_format(templates["mistralai-Ministral-3-14B-Reasoning-2512.jinja"]) == MAGISTRAL
    assert reasoning_format(templates["Qwen-Qwen3-0.6B.jinja"]) == THINK
    assert reasoning_format(templates["ByteDance-Seed-OSS.jinja"]).open == "<seed:think>"  # type: ignore[union-attr]
    assert reasoning_format(templates["Cohere2MoE.jinja"]).close == "<|END_THINKING|>"  # type: ignore[union-attr]
    assert reasoning_format(templates["meta-llama-Llama-3.1-8B-Instruct.jinja"]) is None
    # gpt-oss cannot stop thinking: "no" asks for its lowest effort; Qwen3-style templates get enable_thinking.
    assert HARMONY.template_options(False) == {"reasoning_effort": "low"}
    assert HARMONY.template_options(None, "high") == {"reasoning_effort": "high"}
    assert THINK.template_options(False) == {"enable_thinking": False} and THINK.template_options(None) == {}


def test_format_markers_that_are_control_tokens_are_rendered(tmp_path: Path) -> None:
    """Magistral's [THINK] and Mistral's [TOOL_CALLS] are control tokens: the parsers must still see them."""
    path = write_model(tmp_path / "markers.gguf", special_tokens=("[THINK]", "[/THINK]", "[TOOL_CALLS]", "[IMG]"))
    model = Model(path)
    try:

        def token(text: str) -> int:
            (only,) = model.tokenize(text, add_special=False, parse_special=True)
            return only

        assert model.token_bytes(token("[THINK]")) == b"[THINK]"
        assert model.token_bytes(token("[TOOL_CALLS]")) == b"[TOOL_CALLS]"
        assert model.token_bytes(token("<|im_end|>")) == b"" and model.token_bytes(token("[IMG]")) == b""
    finally:
        model.close()


def test_reasoning_templates_and_open_blocks_are_recognised() -> None:
    assert reasoning_format(THINKING_TEMPLATE) == THINK
    assert reasoning_format("{{ messages[0].content }}") is None and reasoning_format(None) is None
    assert THINK.opened_in_prompt("<|im_start|>assistant\n<think>\n")
    assert not THINK.opened_in_prompt("<think>\n\n</think>\n\n")


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Cli:
    """A store with SmolLM2 and "thinker", SmolLM2 under a template that thinks."""
    folder = tmp_path_factory.mktemp("thinker")

    def smollm2_with(template: str, name: str) -> Path:
        (folder / f"{name}.jinja").write_text(template)
        subprocess.run(
            [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(smollm2), str(folder / f"{name}.gguf"),
             "--chat-template-file", str(folder / f"{name}.jinja"), "--force"],
            check=True, capture_output=True,
        )  # fmt: skip
        return folder / f"{name}.gguf"

    thinker = smollm2_with(THINKING_TEMPLATE, "thinker")
    # Qwen3's own template: it keeps the thinking of the turns after the user's last question (a tool loop).
    qwen3 = smollm2_with(llama_cpp_templates()["Qwen-Qwen3-0.6B.jinja"], "qwen3")
    cli = Cli(tmp_path_factory.mktemp("thinker-home"))
    assert cli("import", str(smollm2), "--name", "smollm2", "--link").returncode == 0
    assert cli("import", str(thinker), "--name", "thinker").returncode == 0
    assert cli("import", str(qwen3), "--name", "qwen3ish").returncode == 0
    return cli


@pytest.fixture(scope="module")
def server(cli: Cli) -> Iterator[Server]:
    running = Server(cli, "thinker", "--parallel", "2", "--ctx", "1024", "--no-log")
    yield running
    running.stop()


ASK = [{"role": "user", "content": "What is 2+2?"}]


def test_openai_chat_gives_reasoning_content_apart_streamed_or_not(server: Server) -> None:
    """SmolLM2 never closes the think block its template opens: all it writes is thinking."""
    client = server.openai(timeout=120)
    answer = client.chat.completions.create(model="thinker", messages=ASK, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    message = answer.choices[0].message
    reasoning = message.model_extra["reasoning_content"]  # type: ignore[index]
    assert reasoning and not message.content
    assert "<think>" not in reasoning

    streamed = {"reasoning_content": "", "content": ""}
    for chunk in client.chat.completions.create(model="thinker", messages=ASK, max_tokens=12, temperature=0,
                                                stream=True):  # fmt: skip
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            streamed["reasoning_content"] += extra.get("reasoning_content") or ""
            streamed["content"] += choice.delta.content or ""
    assert streamed == {"reasoning_content": reasoning, "content": ""}

    # Thinking off (chat_template_kwargs, as llama-server and vLLM take it): the template closes the block.
    no_thinking = {"chat_template_kwargs": {"enable_thinking": False}}
    direct = client.chat.completions.create(model="thinker", messages=ASK, max_tokens=12, temperature=0,
                                            extra_body=no_thinking)  # fmt: skip
    assert direct.choices[0].message.content and "reasoning_content" not in (
        direct.choices[0].message.model_extra or {}
    )
    # A model that does not think is never split.
    plain = client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=12, temperature=0)
    assert plain.choices[0].message.content and "reasoning_content" not in (plain.choices[0].message.model_extra or {})


def test_json_output_leaves_no_room_to_think(server: Server) -> None:
    answer = server.openai(timeout=120).chat.completions.create(
        model="thinker", messages=ASK, max_tokens=40, temperature=0, response_format={"type": "json_object"}
    )
    message = answer.choices[0].message
    assert message.content and message.content.lstrip().startswith("{") and not (message.model_extra or {})


def test_ollama_thinking_field_and_think_false(server: Server) -> None:
    client = ollama.Client(host=server.url, timeout=120)
    options = {"temperature": 0, "num_predict": 12}
    answer = client.chat(model="thinker", messages=ASK, options=options)
    assert answer.message.thinking and not answer.message.content
    streamed = list(client.chat(model="thinker", messages=ASK, options=options, stream=True))
    assert "".join(chunk.message.thinking or "" for chunk in streamed) == answer.message.thinking
    direct = client.chat(model="thinker", messages=ASK, options=options, think=False)
    assert direct.message.content and not direct.message.thinking
    generated = client.generate(model="thinker", prompt="What is 2+2?", options=options)
    assert generated.thinking and not generated.response


def test_anthropic_thinking_blocks_streamed_or_not(server: Server) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    options: dict[str, Any] = {"model": "thinker", "max_tokens": 12, "messages": ASK,
                               "extra_body": {"temperature": 0}}  # fmt: skip
    message = client.messages.create(**options)
    assert [block.type for block in message.content] == ["thinking"]
    with client.messages.stream(**options) as stream:
        kinds = [event.type for event in stream]
        streamed = stream.get_final_message()
    assert "thinking" in kinds and streamed.content[0].thinking == message.content[0].thinking  # type: ignore[union-attr]
    off = client.messages.create(**options, thinking={"type": "disabled"})
    assert [block.type for block in off.content] == ["text"]


def test_responses_reasoning_items_streamed_or_not(server: Server) -> None:
    client = server.openai(timeout=120)
    response = client.responses.create(model="thinker", input="What is 2+2?", max_output_tokens=12, temperature=0,
                                       store=False)  # fmt: skip
    kinds = [item.type for item in response.output]
    assert kinds[0] == "reasoning" and response.output[0].content[0].text  # type: ignore[union-attr,index]
    deltas = [event.delta for event in client.responses.create(model="thinker", input="What is 2+2?",
                                                               max_output_tokens=12, temperature=0, store=False,
                                                               stream=True)
              if event.type == "response.reasoning_text.delta"]  # fmt: skip
    assert "".join(deltas) == response.output[0].content[0].text  # type: ignore[union-attr,index]
    off = client.responses.create(
        model="thinker",
        input="What is 2+2?",
        max_output_tokens=12,
        temperature=0,
        store=False,
        reasoning={"effort": "none"},
    )  # type: ignore[typeddict-item]
    assert [item.type for item in off.output] == ["message"] and off.output_text


THOUGHT = "The user wants the weather in Paris, so I call get_weather with city Paris before answering."
WEATHER_TOOL = {"name": "get_weather", "description": "Weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}  # fmt: skip


def test_thinking_sent_back_in_a_tool_loop_reaches_the_template(server: Server) -> None:
    """Each API's way of returning an earlier turn's thinking (reasoning_content, thinking blocks, reasoning
    items, Ollama's thinking) reaches the template, which keeps it in a tool loop: the prompt grows by it."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    tool_message = {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}
    client = server.openai(timeout=120)

    def openai_prompt(thinking: bool) -> int:
        assistant: dict[str, Any] = {"role": "assistant", "content": "", "tool_calls": [call]}
        if thinking:
            assistant["reasoning_content"] = THOUGHT
        answer = client.chat.completions.create(
            model="qwen3ish",
            messages=[{"role": "user", "content": "Weather in Paris?"}, assistant, tool_message],  # type: ignore[list-item]
            tools=[{"type": "function", "function": WEATHER_TOOL}],  # type: ignore[list-item]
            max_tokens=1,
        )
        return answer.usage.prompt_tokens  # type: ignore[union-attr]

    def anthropic_prompt(thinking: bool) -> int:
        blocks: list[dict[str, Any]] = [{"type": "thinking", "thinking": THOUGHT, "signature": ""}] if thinking else []
        blocks.append({"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}})
        body = {"model": "qwen3ish", "messages": [
            {"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": blocks},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C"}]}],
            "tools": [{"name": "get_weather", "input_schema": WEATHER_TOOL["parameters"]}]}  # fmt: skip
        counted = httpx.post(f"{server.url}/v1/messages/count_tokens", json=body, timeout=60)
        assert counted.status_code == 200, counted.text
        return int(counted.json()["input_tokens"])

    def responses_prompt(thinking: bool) -> int:
        items: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
        if thinking:
            items.append({"type": "reasoning", "id": "rs_1", "summary": [],
                          "content": [{"type": "reasoning_text", "text": THOUGHT}]})  # fmt: skip
        arguments = '{"city": "Paris"}'
        items += [{"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": arguments},
                  {"type": "function_call_output", "call_id": "call_1", "output": "18 C"}]  # fmt: skip
        response = client.responses.create(model="qwen3ish", input=items, max_output_tokens=1, store=False,  # type: ignore[arg-type]
                                           tools=[{"type": "function", **WEATHER_TOOL}])  # type: ignore[list-item]  # fmt: skip
        return response.usage.input_tokens  # type: ignore[union-attr]

    def ollama_prompt(thinking: bool) -> int:
        ollama_call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        assistant: dict[str, Any] = {"role": "assistant", "content": "", "tool_calls": [ollama_call]}
        if thinking:
            assistant["thinking"] = THOUGHT
        answer = ollama.Client(host=server.url, timeout=120).chat(
            model="qwen3ish",
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                assistant,
                {"role": "tool", "content": "18 C", "tool_name": "get_weather"},
            ],  # fmt: skip
            tools=[{"type": "function", "function": WEATHER_TOOL}],
            options={"num_predict": 1},
        )
        return int(answer.prompt_eval_count or 0)

    for prompt_tokens in (openai_prompt, anthropic_prompt, responses_prompt, ollama_prompt):
        assert prompt_tokens(True) > prompt_tokens(False) + 10, prompt_tokens.__name__


def test_bad_think_values_do_not_break_the_server(server: Server) -> None:
    body = {"model": "thinker", "messages": ASK, "think": {"nonsense": 1}, "stream": False}
    assert httpx.post(f"{server.url}/api/chat", json=body, timeout=60).status_code == 400
    ok = httpx.post(f"{server.url}/api/chat", json={**body, "think": "high", "options": {"num_predict": 2}}, timeout=60)
    assert ok.status_code == 200 and json.loads(ok.text)["message"]["thinking"]


def test_run_prints_the_answer_and_shows_thinking_only_when_asked(cli: Cli) -> None:
    asked = ("run", "thinker", "What is 2+2?", "-t", "0", "-n", "20", "--no-log")
    quiet = cli(*asked)
    assert quiet.returncode == 0 and quiet.stdout == "" and "only thought" in quiet.stderr
    shown = cli(*asked, "--think")
    record = cli(*asked, "--json").json()
    assert shown.returncode == 0 and record["reasoning"] and record["reasoning"] in shown.stderr
    assert record["text"] == "" and shown.stdout == ""
    direct = cli(*asked, "--no-think")
    assert direct.returncode == 0 and direct.stdout.strip() and "only thought" not in direct.stderr


def test_run_schema_and_format_hold_the_answer_to_json(cli: Cli, tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
              "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"]}  # fmt: skip
    (tmp_path / "person.json").write_text(json.dumps(schema))
    for given in (str(tmp_path / "person.json"), json.dumps(schema)):
        answer = cli("run", "thinker", "Describe a person.", "-t", "0", "-n", "80", "--schema", given, "--no-log")
        assert answer.returncode == 0, answer.stderr
        person = json.loads(answer.stdout)
        assert set(person) == {"name", "age"} and isinstance(person["age"], int)
    shaped = cli("run", "smollm2", "Name a color.", "-t", "0", "-n", "200", "--format", "json", "--no-log")
    assert shaped.returncode == 0 and isinstance(json.loads(shaped.stdout), dict)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--schema", "missing.json"), "neither a file nor a JSON object"),
        (("--schema", '{"type": '), "not valid JSON"),
        (("--schema", "[1, 2]"), "neither a file nor a JSON object"),
        (("--format", "yaml"), "--format 'yaml'"),
    ],
)
def test_run_refuses_bad_schemas_in_one_line(cli: Cli, args: tuple[str, ...], expected: str) -> None:
    refused = cli("run", "smollm2", "Hi", "--no-log", *args)
    assert refused.returncode == 2 and expected in refused.stderr and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
