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

from llmrun.reasoning import CONTENT, REASONING, ReasoningSplitter, opened_in_prompt, thinks

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


def split(text: str, inside: bool, cuts: list[int]) -> tuple[str, str]:
    splitter = ReasoningSplitter(inside)
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


def test_reasoning_templates_and_open_blocks_are_recognised() -> None:
    assert thinks(THINKING_TEMPLATE) and not thinks("{{ messages[0].content }}") and not thinks(None)
    assert opened_in_prompt("<|im_start|>assistant\n<think>\n") and not opened_in_prompt("<think>\n\n</think>\n\n")


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Cli:
    """A store with SmolLM2 and "thinker", SmolLM2 under a template that thinks."""
    folder = tmp_path_factory.mktemp("thinker")
    (folder / "template.jinja").write_text(THINKING_TEMPLATE)
    thinker = folder / "thinker.gguf"
    subprocess.run(
        [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(smollm2), str(thinker),
         "--chat-template-file", str(folder / "template.jinja"), "--force"],
        check=True, capture_output=True,
    )  # fmt: skip
    cli = Cli(tmp_path_factory.mktemp("thinker-home"))
    assert cli("import", str(smollm2), "--name", "smollm2", "--link").returncode == 0
    assert cli("import", str(thinker), "--name", "thinker").returncode == 0
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
