"""Tool calls out of what models of each family write, streamed in any cut, and the grammars that force them."""

from __future__ import annotations

import json
import random

import pytest

from llmrun.errors import UsageError
from llmrun.reasoning import CONTENT, HARMONY
from llmrun.tools import (
    ArgumentsPiece,
    CallStart,
    ContentPiece,
    Tool,
    ToolCallParser,
    ToolChoice,
    ToolFormat,
    ToolPlan,
    check_tools,
    grammar_schema,
    plan,
    prompt_messages,
)

WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
)
ADD = Tool("add", "", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}})
TOOLS = (WEATHER, ADD)

# What models of each family write, as recorded from them (ids differ per run and are not compared).
RECORDED = {
    "qwen2.5 one call": (
        ToolFormat.HERMES,
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris, France"}}\n</tool_call>',
        "",
        [("get_weather", {"location": "Paris, France"})],
    ),
    "qwen2.5 two calls": (
        ToolFormat.HERMES,
        '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>',
        "",
        [("get_weather", {"location": "Paris"}), ("add", {"a": 2, "b": 3})],
    ),
    "hermes-3 text then call": (
        ToolFormat.HERMES,
        'I will look it up.\n<tool_call>\n{"arguments": {"location": "Oslo"}, "name": "get_weather"}\n</tool_call>',
        "I will look it up.",
        [("get_weather", {"location": "Oslo"})],
    ),
    "qwen2.5 plain answer": (ToolFormat.HERMES, "Paris is sunny today <3", "Paris is sunny today <3", []),
    "llama3.1 call": (
        ToolFormat.LLAMA3,
        '{"name": "get_weather", "parameters": {"location": "Paris"}}',
        "",
        [("get_weather", {"location": "Paris"})],
    ),
    "llama3.1 python tag": (
        ToolFormat.LLAMA3,
        '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}',
        "",
        [("add", {"a": 1, "b": 2})],
    ),
    "llama3.1 answer with JSON inside": (
        ToolFormat.LLAMA3,
        'The object is {"name": "x"}.',
        'The object is {"name": "x"}.',
        [],
    ),
    "mistral nemo calls": (
        ToolFormat.MISTRAL,
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"location": "Rome"}}, '
        '{"name": "add", "arguments": {"a": 5, "b": 6}}]',
        "",
        [("get_weather", {"location": "Rome"}), ("add", {"a": 5, "b": 6})],
    ),
    "mistral v11 calls after text": (
        ToolFormat.MISTRAL_V11,
        'Let me look.[TOOL_CALLS]get_weather[ARGS]{"location": "Rome"}[TOOL_CALLS]add[ARGS]{"a": 5, "b": 6}',
        "Let me look.",
        [("get_weather", {"location": "Rome"}), ("add", {"a": 5, "b": 6})],
    ),
    "generic call": (
        ToolFormat.GENERIC,
        '{"tool_calls": [{"name": "get_weather", "arguments": {"location": "Caf\\u00e9 \\"Z\\""}}]}',
        "",
        [("get_weather", {"location": 'Café "Z"'})],
    ),
    "generic answer": (
        ToolFormat.GENERIC,
        '{"response": "Line one\\nline \\"two\\" \\u00e9\\\\"}',
        'Line one\nline "two" é\\',
        [],
    ),
}


# A template that makes plan() pick each format (the marker it looks for, or none: generic).
FORMAT_TEMPLATES = {
    ToolFormat.HERMES: "<tool_call>{{ tools }}",
    ToolFormat.MISTRAL: "[TOOL_CALLS]{{ tools }}",
    ToolFormat.MISTRAL_V11: "[TOOL_CALLS]{{ tools }}[ARGS]",
    ToolFormat.HARMONY: "<|channel|>commentary to=functions.{{ tools }}",
    ToolFormat.LLAMA3: "<|python_tag|>{{ tools }}",
    ToolFormat.GENERIC: None,
}


def parse(fmt: ToolFormat, output: str, cuts: random.Random | None) -> tuple[list[object], ToolCallParser]:
    parser = ToolCallParser(ToolPlan(fmt, TOOLS, "root ::= x", (), True, True))
    pieces: list[object] = []
    position = 0
    while position < len(output):
        size = cuts.randint(1, 5) if cuts else len(output)
        pieces += parser.feed(output[position : position + size])
        position += size
    pieces += parser.finish()
    return pieces, parser


@pytest.mark.parametrize("case", RECORDED, ids=list(RECORDED))
def test_recorded_outputs_parse_the_same_in_any_cut(case: str) -> None:
    fmt, output, content, calls = RECORDED[case]
    for seed in [None, *range(25)]:
        pieces, parser = parse(fmt, output, random.Random(seed) if seed is not None else None)
        assert not parser.failed
        assert parser.final_content() == content
        assert [(call.name, json.loads(call.arguments)) for call in parser.tool_calls] == calls
        # What a streaming client sees adds up to the same: text, names first, argument pieces.
        assert "".join(piece.text for piece in pieces if isinstance(piece, ContentPiece)).strip() == content
        starts = [(piece.index, piece.name) for piece in pieces if isinstance(piece, CallStart)]
        assert starts == [(index, name) for index, (name, _) in enumerate(calls)]
        for index, (_, arguments) in enumerate(calls):
            streamed = "".join(p.text for p in pieces if isinstance(p, ArgumentsPiece) and p.index == index)
            assert json.loads(streamed) == arguments
            assert streamed == parser.tool_calls[index].arguments
        ids = [piece.id for piece in pieces if isinstance(piece, CallStart)]
        assert ids == [call.id for call in parser.tool_calls] and len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("fmt", "output"),
    [
        (ToolFormat.HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Par'),  # cut short
        (ToolFormat.HERMES, '<tool_call>\n{"name": "unknown_tool", "arguments": {}}\n</tool_call>'),
        (ToolFormat.HERMES, "<tool_call>\nnot json at all\n</tool_call>"),
        (ToolFormat.HERMES, '<tool_call>\n{"name": "add", "arguments": [1, 2]}\n</tool_call>'),
        (ToolFormat.MISTRAL, '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}'),
        (ToolFormat.MISTRAL_V11, '[TOOL_CALLS]add[ARGS]{"a": 1'),
        (ToolFormat.MISTRAL_V11, "[TOOL_CALLS]not a name, just words"),
        (ToolFormat.MISTRAL_V11, '[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}[TOOL_CALLS]nope[ARGS]{}'),
        (ToolFormat.LLAMA3, '{"name": "get_weather", "parameters": {"location": }}'),
        (
            ToolFormat.HERMES,
            '<tool_call>\n{"name": "add", "arguments": {"a": "two"}}\n</tool_call>',
        ),  # fails its schema
        (ToolFormat.LLAMA3, '{"name": "get_weather", "parameters": {}}'),  # a required argument is missing
    ],
)
def test_unparseable_output_is_text_never_a_broken_call(fmt: ToolFormat, output: str) -> None:
    for seed in [None, 1, 2, 3]:
        _, parser = parse(fmt, output, random.Random(seed) if seed is not None else None)
        assert parser.tool_calls == []
        assert parser.final_content() == output


def test_integer_bounds_the_converter_ignores_become_an_enum_the_grammar_holds() -> None:
    schema = {"type": "object", "properties": {
        "day": {"type": "integer", "minimum": 1, "maximum": 7},
        "list": {"type": "array", "items": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 4}},
        "wide": {"type": "integer", "minimum": 0, "maximum": 10**9},
    }}  # fmt: skip
    converted = grammar_schema(schema)
    assert converted["properties"]["day"] == {"enum": [1, 2, 3, 4, 5, 6, 7]}
    assert converted["properties"]["list"]["items"] == {"enum": [1, 2, 3]}
    assert converted["properties"]["wide"] == schema["properties"]["wide"]  # checked when the call is complete


def test_bad_tools_and_choices_are_refused_with_what_to_do() -> None:
    with pytest.raises(UsageError, match="'nope', which is not among the tools"):
        check_tools(list(TOOLS), ToolChoice("function", "nope"))
    with pytest.raises(UsageError, match="not a valid JSON schema"):
        check_tools([Tool("f", "", {"type": "nonsense"})], ToolChoice())
    with pytest.raises(UsageError, match="same name"):
        check_tools([WEATHER, WEATHER], ToolChoice())
    with pytest.raises(UsageError, match="needs tools"):
        check_tools([], ToolChoice("required"))
    with pytest.raises(UsageError, match="is not valid"):
        check_tools([Tool("has space")], ToolChoice())


def test_grammars_for_each_format_are_accepted_by_llama_cpp(tiny_model: object) -> None:
    from llmrun.engine.model import Model
    from llmrun.engine.native import init_native
    from llmrun.engine.sampling import check_grammar

    init_native()
    model = Model(tiny_model, 0)  # type: ignore[arg-type]
    try:
        for fmt in ToolFormat:
            template = FORMAT_TEMPLATES[fmt]
            for choice in (ToolChoice("auto"), ToolChoice("required"), ToolChoice("function", "add")):
                for parallel in (True, False):
                    made = plan(list(TOOLS), choice, parallel, template, template is not None)
                    assert made.format is fmt and made.grammar is not None
                    assert bool(made.triggers) == (choice.mode == "auto" and fmt is not ToolFormat.GENERIC)
                    check_grammar(model.vocab, made.grammar, made.triggers)
    finally:
        model.close()


@pytest.mark.parametrize("template", ["<tool_call>{{ tools }}", "[TOOL_CALLS]{{ tools }}[ARGS]", None])
def test_parallel_calls_stop_at_the_bound(tiny_model: object, template: str | None) -> None:
    """A model repeating a call cannot write calls until max_tokens: the grammar ends the answer after 16."""
    from llmrun.engine.model import Model
    from llmrun.engine.native import init_native, llama_cpp
    from llmrun.engine.sampling import _Candidates, grammar_sampler
    from llmrun.tools import MAX_PARALLEL_CALLS

    init_native()
    model = Model(tiny_model, 0)  # type: ignore[arg-type]
    made = plan(list(TOOLS), ToolChoice("required"), True, template, template is not None)
    one = {
        ToolFormat.HERMES: '<tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>',
        ToolFormat.MISTRAL_V11: '[TOOL_CALLS]add[ARGS]{"a":1,"b":2}',
        ToolFormat.GENERIC: '{"name":"add","arguments":{"a":1,"b":2}}',
    }[made.format]
    calls = [one] * (MAX_PARALLEL_CALLS + 1)
    text = '{"tool_calls":[' + ",".join(calls) + "]}" if made.format is ToolFormat.GENERIC else "".join(calls)
    grammar = grammar_sampler(model.vocab, made.grammar or "")
    candidates = _Candidates(model.n_vocab)
    try:
        written = ""
        for token in model.tokenize(text, add_special=False, parse_special=False):
            if not candidates.allows(grammar, token):
                break
            llama_cpp.llama_sampler_accept(grammar, token)
            written += model.token_bytes(token).decode()
        assert written.count('"add"' if made.format is not ToolFormat.MISTRAL_V11 else "add[") == MAX_PARALLEL_CALLS
    finally:
        llama_cpp.llama_sampler_free(grammar)
        model.close()


def test_history_reaches_the_template_with_objects_and_the_generic_format_with_instructions() -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]  # fmt: skip
    hermes = plan(list(TOOLS), ToolChoice(), True, "<tool_call>{{ tools }}", True)
    prepared = prompt_messages(history, hermes, ToolChoice())
    assert prepared[1]["tool_calls"][0]["function"]["arguments"] == {"location": "Paris"}
    assert prepared[2] == {"role": "tool", "tool_call_id": "call_1", "content": "18 C", "name": "get_weather"}

    generic = plan(list(TOOLS), ToolChoice("required"), True, "{{ messages }}", False)
    prepared = prompt_messages(history, generic, ToolChoice("required"))
    assert prepared[0]["role"] == "system" and "get_weather" in prepared[0]["content"]
    assert json.loads(prepared[2]["content"]) == {"tool_calls": [{"name": "get_weather",
                                                                   "arguments": {"location": "Paris"}}]}  # fmt: skip
    assert json.loads(prepared[3]["content"]) == {"tool_response": {"tool": "get_weather", "content": "18 C"}}


# A call forced to one tool: its opening is the lead (in the prompt), what the model writes after it, and a
# second call where calls may be parallel.
AFTER_LEAD = {
    ToolFormat.GENERIC: (' {"a": 1, "b": 2}}]}', ' {"a": 1, "b": 2}}, {"name": "add", "arguments": {"a": 3}}]}'),
    ToolFormat.HERMES: (
        ' {"a": 1, "b": 2}}\n</tool_call>',
        ' {"a": 1, "b": 2}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 3}}\n</tool_call>',
    ),
    ToolFormat.LLAMA3: (' {"a": 1, "b": 2}}', None),
    ToolFormat.MISTRAL: (' {"a": 1, "b": 2}}]', ' {"a": 1, "b": 2}}, {"name": "add", "arguments": {"a": 3}}]'),
    ToolFormat.MISTRAL_V11: ('{"a": 1, "b": 2}', '{"a": 1, "b": 2}[TOOL_CALLS]add[ARGS]{"a": 3}'),
    ToolFormat.HARMONY: ('{"a": 1, "b": 2}', None),
}


@pytest.mark.parametrize("fmt", list(ToolFormat), ids=[fmt.value for fmt in ToolFormat])
def test_a_call_forced_to_one_tool_starts_in_the_prompt_and_the_grammar_holds_the_rest(
    tiny_model: object, fmt: ToolFormat
) -> None:
    from llmrun.engine.model import Model
    from llmrun.engine.native import init_native, llama_cpp
    from llmrun.engine.sampling import _Candidates, grammar_sampler

    init_native()
    model = Model(tiny_model, 0)  # type: ignore[arg-type]
    candidates = _Candidates(model.n_vocab)

    def grammar_takes(grammar_text: str, text: str) -> bool:
        """The grammar allows every token of ``text`` and then the end of the answer."""
        grammar = grammar_sampler(model.vocab, grammar_text)
        try:
            for token in model.tokenize(text, add_special=False, parse_special=False):
                if not candidates.allows(grammar, token):
                    return False
                llama_cpp.llama_sampler_accept(grammar, token)
            return candidates.allows(grammar, model.eos_token)
        finally:
            llama_cpp.llama_sampler_free(grammar)

    template = FORMAT_TEMPLATES[fmt]
    one, two = AFTER_LEAD[fmt]
    try:
        for choice, parallel in ((ToolChoice("function", "add"), True), (ToolChoice("required"), True),
                                 (ToolChoice("required"), False)):  # fmt: skip
            offered = [ADD] if choice.mode == "required" else list(TOOLS)
            made = plan(offered, choice, parallel, template, template is not None)
            assert made.format is fmt and made.lead and not made.triggers
            assert grammar_takes(made.grammar or "", one)
            parser = ToolCallParser(made)
            if fmt is ToolFormat.HARMONY:  # its channels go through the reasoning splitter first, as in serve
                splitter = HARMONY.splitter(False)
                parts = splitter.feed(made.lead) + splitter.feed(one) + splitter.finish()
                parser.feed("".join(text for kind, text in parts if kind == CONTENT))
            else:
                parser.feed(made.lead)
                parser.feed(one)
            parser.finish()
            assert [(call.name, json.loads(call.arguments)) for call in parser.tool_calls] == [
                ("add", {"a": 1, "b": 2})
            ]
            assert parser.final_content() == ""
            if two is not None:
                parallel_calls = parallel and choice.mode == "required"
                assert grammar_takes(made.grammar or "", two) is parallel_calls
                assert not grammar_takes(made.grammar or "", one[:-1])  # a call cut short is not an answer
        # Not for several tools, nor when the lead is not wanted.
        assert not plan(list(TOOLS), ToolChoice("required"), True, template, template is not None).lead
        assert not plan([ADD], ToolChoice("required"), True, template, template is not None, may_lead=False).lead
    finally:
        model.close()
