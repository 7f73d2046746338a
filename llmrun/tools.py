"""Tool calling: how a model family writes a call, the grammar that makes every call valid, and the parser.

Every API (OpenAI chat, Ollama, Anthropic Messages, OpenAI Responses) turns its tools into
``Tool`` and its choice into ``ToolChoice``; ``plan()`` picks the model family's own call
format from its chat template and builds the grammar; ``ToolCallParser`` splits what the
model writes into answer text and calls, as it streams.

Formats:
  * hermes (Qwen 2.5/3, Hermes, SmolLM3 ...): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``;
  * llama3 (Llama 3.1-3.3): the whole answer is ``{"name": ..., "parameters": {...}}``;
  * mistral (Nemo and later): ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``;
  * mistral-v11 (Mistral Small 3.2, Devstral, Magistral, Ministral 3): ``[TOOL_CALLS]name[ARGS]{...}``, once per call;
  * generic, for templates that know nothing of tools: the tools are described in a system
    message and the whole answer is JSON, ``{"tool_calls": [...]}`` or ``{"response": "..."}``.

With ``tool_choice`` "required" or a named function the grammar holds from the first token,
so even a tiny model returns a call whose arguments match the schema; when that leaves one
tool, the call's opening is the plan's ``lead``, evaluated with the prompt, not generated. With "auto" the
grammar is lazy: text is free until the family's opening marker, and from there the call
is constrained. Output that still cannot be parsed (cut by ``max_tokens``) is answer text,
never a broken call.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import string
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from llmrun.errors import UsageError
from llmrun.jsonscan import JsonScanner, Path
from llmrun.reasoning import partial_suffix

NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}  # a function without arguments


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does, and its arguments' JSON schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: dict(NO_PARAMETERS))

    def as_template_tool(self) -> dict[str, Any]:
        """The shape chat templates are written for (OpenAI's)."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """auto: the model decides; none: no call; required: at least one call; function: that one."""

    mode: str = "auto"
    name: str | None = None


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the arguments object, as JSON text


class ToolFormat(str, Enum):
    GENERIC = "generic"
    HERMES = "hermes"
    LLAMA3 = "llama3"
    MISTRAL = "mistral"
    MISTRAL_V11 = "mistral-v11"
    HARMONY = "harmony"  # gpt-oss


@dataclass(frozen=True)
class ToolPlan:
    """How one request's tools reach the model and come back."""

    format: ToolFormat
    tools: tuple[Tool, ...]
    grammar: str | None  # GBNF for the calls (None: tool_choice none)
    triggers: tuple[str, ...]  # regexes that start a lazy grammar; empty: it holds from the first token
    template_tools: bool  # the template renders the tools itself; else a system message describes them
    parallel: bool
    # What every answer must start with (a forced call to one tool, up to its arguments): it is put at the end
    # of the prompt, evaluated with it instead of generated token by token, and the grammar holds what follows.
    lead: str = ""

    @property
    def constrained(self) -> bool:
        return self.grammar is not None


def check_tools(tools: list[Tool], choice: ToolChoice) -> None:
    """Refuse what cannot work, in words the client can act on."""
    names = [tool.name for tool in tools]
    for tool in tools:
        if not tool.name or not all(char.isalnum() or char in "_-." for char in tool.name):
            raise UsageError(
                f"tool name {tool.name!r} is not valid", "use letters, digits, _ - and . only", param="tools"
            )
        if not isinstance(tool.parameters, dict):
            raise UsageError(
                f"the parameters of tool {tool.name!r} are not a JSON schema object", "give an object", param="tools"
            )
        _check_schema(tool.name, tool.parameters)
    if len(set(names)) != len(names):
        raise UsageError("two tools have the same name", "give each tool its own name", param="tools")
    if choice.mode not in ("auto", "none", "required", "function"):
        raise UsageError(
            f"tool_choice {choice.mode!r} is not known", "use auto, none, required or a function", param="tool_choice"
        )
    if choice.mode == "function" and choice.name not in names:
        raise UsageError(
            f"tool_choice names {choice.name!r}, which is not among the tools",
            "name one of the tools",
            param="tool_choice",
        )
    if choice.mode in ("required", "function") and not tools:
        raise UsageError(
            f"tool_choice {choice.mode} needs tools", "give tools, or leave tool_choice out", param="tool_choice"
        )


def check_tool_results(messages: list[dict[str, Any]]) -> None:
    """Refuse a tool result that names a call no earlier assistant message made (a client's mistake that would
    otherwise reach the model as a result of nothing)."""
    made: set[str] = set()
    for message in messages:
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict) and call.get("id"):
                made.add(str(call["id"]))
        if message.get("role") == "tool" and "tool_call_id" in message and str(message["tool_call_id"]) not in made:
            raise UsageError(
                f"a tool result answers call {message['tool_call_id']!r}, which no earlier assistant message made",
                "send the assistant message with that call (tool_calls, tool_use, function_call) before its result",
                param="messages",
            )


def _check_schema(name: str, schema: dict[str, Any]) -> None:
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        raise UsageError(
            f"the parameters of tool {name!r} are not a valid JSON schema: {error.message}",
            "fix the schema",
            param="tools",
        ) from None


def detect_format(template: str | None, template_tools: bool) -> ToolFormat:
    """The call format a model was trained on, read off its chat template."""
    if not template or not template_tools:
        return ToolFormat.GENERIC
    if "<|channel|>commentary" in template and "functions." in template:
        return ToolFormat.HARMONY
    if "<tool_call>" in template:
        return ToolFormat.HERMES
    if "[TOOL_CALLS]" in template:
        return ToolFormat.MISTRAL_V11 if "[ARGS]" in template else ToolFormat.MISTRAL
    if "<|python_tag|>" in template or '"parameters": ' in template or "<|eom_id|>" in template:
        return ToolFormat.LLAMA3
    return ToolFormat.GENERIC


def plan(
    tools: list[Tool],
    choice: ToolChoice,
    parallel: bool,
    template: str | None,
    template_tools: bool,
    may_lead: bool = True,
) -> ToolPlan:
    """The format, grammar and prompt handling for a request with ``tools``; ``may_lead``: a call forced to one tool
    may start in the prompt (see ``ToolPlan.lead``)."""
    check_tools(tools, choice)
    fmt = detect_format(template, template_tools)
    if fmt is ToolFormat.GENERIC:
        template_tools = False
    offered = tuple(tool for tool in tools if choice.mode != "function" or tool.name == choice.name)
    if choice.mode == "none" or not offered:
        return ToolPlan(fmt, tuple(tools), None, (), template_tools, parallel)
    forced = choice.mode in ("required", "function")
    parallel_calls = parallel and choice.mode != "function"
    if forced and may_lead and len(offered) == 1:
        lead, grammar = _lead_and_grammar(fmt, offered[0], parallel_calls)
        return ToolPlan(fmt, tuple(tools), grammar, (), template_tools, parallel, lead)
    grammar, triggers = _grammar(fmt, offered, forced, parallel_calls)
    return ToolPlan(fmt, tuple(tools), grammar, triggers, template_tools, parallel)


def _call_schema(tools: tuple[Tool, ...], arguments_key: str) -> dict[str, Any]:
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, arguments_key: grammar_schema(tool.parameters)},
            "required": ["name", arguments_key],
        }
        for tool in tools
    ]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


_MAX_ENUMERATED = 1000
# Calls in one answer at most: a small model that repeats a call would otherwise write calls until max_tokens
# cuts the last one short (and the whole answer becomes text).
MAX_PARALLEL_CALLS = 16


def grammar_schema(schema: Any) -> Any:
    """``schema`` with what llama-cpp-python's converter ignores spelled in what it knows.

    Its converter drops an integer's ``minimum``/``maximum``; a bounded range of up to
    1,000 values becomes an ``enum``, so the grammar holds it. Wider bounds are checked when
    the call is complete (a call that fails its schema is returned as text).
    """
    if isinstance(schema, list):
        return [grammar_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {key: grammar_schema(value) for key, value in schema.items()}
    if schema.get("type") == "integer" and "enum" not in schema and "const" not in schema:
        low, high = schema.get("minimum"), schema.get("maximum")
        if isinstance(schema.get("exclusiveMinimum"), (int, float)) and not isinstance(
            schema["exclusiveMinimum"], bool
        ):
            low = schema["exclusiveMinimum"] + 1 if low is None else max(low, schema["exclusiveMinimum"] + 1)
        if isinstance(schema.get("exclusiveMaximum"), (int, float)) and not isinstance(
            schema["exclusiveMaximum"], bool
        ):
            high = schema["exclusiveMaximum"] - 1 if high is None else min(high, schema["exclusiveMaximum"] - 1)
        if isinstance(low, (int, float)) and isinstance(high, (int, float)):
            first, last = math.ceil(low), math.floor(high)
            if 0 <= last - first < _MAX_ENUMERATED:
                return {"enum": list(range(first, last + 1))}
    return converted


def _grammar(fmt: ToolFormat, tools: tuple[Tool, ...], forced: bool, parallel: bool) -> tuple[str, tuple[str, ...]]:
    from llmrun.engine.sampling import json_schema_rules

    if fmt is ToolFormat.GENERIC:
        calls: dict[str, Any] = {"type": "array", "items": _call_schema(tools, "arguments"), "minItems": 1}
        calls["maxItems"] = MAX_PARALLEL_CALLS if parallel else 1
        schema: dict[str, Any] = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"]}
        if not forced:
            answer = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}
            schema = {"anyOf": [schema, answer]}
        return json_schema_rules(schema, compact=True), ()
    if fmt is ToolFormat.LLAMA3:
        rules = json_schema_rules(_call_schema(tools, "parameters"), "call", compact=True)
        root = 'root ::= "<|python_tag|>"? call' if forced else "root ::= call"
        return f"{root}\n{rules}", () if forced else (r"\s*(\{\s*\"name\"|<\|python_tag\|>)[\s\S]*",)
    if fmt is ToolFormat.MISTRAL_V11:
        named, choices = _named_arguments(tools, '"[ARGS]"')
        call = 'call ::= "[TOOL_CALLS]" (' + " | ".join(choices) + ")"
        root = f"root ::= call{{1,{MAX_PARALLEL_CALLS}}}" if parallel else "root ::= call"
        return "\n".join([root, call, *named]), () if forced else (r"[\s\S]*?(\[TOOL_CALLS\])[\s\S]*",)
    if fmt is ToolFormat.HARMONY:
        # One call a message, ended by <|call|> (an end-of-generation token): never parallel. Forced, the
        # message is written whole; else a call starts where the model addresses a function.
        named, choices = _named_arguments(tools, "header")
        # What models write between the name and the arguments: " <|constrain|>json", or the channel when the
        # name came first ("<|channel|>commentary json").
        header = 'header ::= " "? ("<|channel|>commentary" " json"?)? " "? ("<|constrain|>" [a-z]{1,12})? "<|message|>"'
        if forced:
            header = 'header ::= " <|constrain|>json<|message|>"'
        root = 'root ::= "<|channel|>commentary to=functions." call' if forced else 'root ::= "to=functions." call'
        call = "call ::= " + " | ".join(choices)
        return "\n".join([root, call, header, *named]), () if forced else (r"[\s\S]*?(to=functions\.)[\s\S]*",)
    rules = json_schema_rules(_call_schema(tools, "arguments"), "call", compact=True)
    if fmt is ToolFormat.MISTRAL:
        more = f'("," space call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""
        root = f'root ::= "[TOOL_CALLS]" space "[" space call {more} "]" space'
        return f"{root}\n{rules}", () if forced else (r"[\s\S]*?(\[TOOL_CALLS\])[\s\S]*",)
    block = 'tool-call ::= "<tool_call>" "\\n"? call "\\n"? "</tool_call>"'
    root = f'root ::= tool-call ("\\n"? tool-call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else "root ::= tool-call"
    return f"{root}\n{block}\n{rules}", () if forced else (r"[\s\S]*?(<tool_call>)[\s\S]*",)


def _lead_and_grammar(fmt: ToolFormat, tool: Tool, parallel: bool) -> tuple[str, str]:
    """A forced call to ``tool``: the text every answer starts with, up to the arguments, and the grammar of the rest.

    The lead is the family's own call opening in the spacing its models write; the grammar
    takes the arguments (``args0``) from there, then the close of the call and, where calls
    may be parallel, further calls as ``_grammar`` writes them.
    """
    from llmrun.engine.sampling import json_schema_rules

    name = json.dumps(tool.name)
    args = json_schema_rules(grammar_schema(tool.parameters), "args0", compact=True).splitlines()
    if parallel and fmt in (ToolFormat.GENERIC, ToolFormat.HERMES, ToolFormat.MISTRAL):  # further calls, whole
        args += json_schema_rules(_call_schema((tool,), "arguments"), "call", compact=True).splitlines()
    more = ""
    if fmt is ToolFormat.GENERIC:
        lead = f'{{"tool_calls": [{{"name": {name}, "arguments":'
        if parallel:
            more = f' ("," space call){{0,{MAX_PARALLEL_CALLS - 1}}}'
        root = f'root ::= space args0 "}}" space{more} "]" space "}}" space'
    elif fmt is ToolFormat.HERMES:
        lead = f'<tool_call>\n{{"name": {name}, "arguments":'
        if parallel:
            args.append('tool-call ::= "<tool_call>" "\\n"? call "\\n"? "</tool_call>"')
            more = f' ("\\n"? tool-call){{0,{MAX_PARALLEL_CALLS - 1}}}'
        root = f'root ::= space args0 "}}" "\\n"? "</tool_call>"{more}'
    elif fmt is ToolFormat.LLAMA3:
        lead = f'{{"name": {name}, "parameters":'
        root = 'root ::= space args0 "}" space'
    elif fmt is ToolFormat.MISTRAL:
        lead = f'[TOOL_CALLS][{{"name": {name}, "arguments":'
        if parallel:
            more = f' ("," space call){{0,{MAX_PARALLEL_CALLS - 1}}}'
        root = f'root ::= space args0 "}}" space{more} "]" space'
    elif fmt is ToolFormat.MISTRAL_V11:
        lead = f"[TOOL_CALLS]{tool.name}[ARGS]"
        if parallel:
            args.append(f'call ::= "[TOOL_CALLS]" {name} "[ARGS]" args0')
            more = f" call{{0,{MAX_PARALLEL_CALLS - 1}}}"
        root = f"root ::= args0{more}"
    else:  # HARMONY: one call a message
        lead = f"<|channel|>commentary to=functions.{tool.name} <|constrain|>json<|message|>"
        root = "root ::= args0"
    return lead, "\n".join([root, *_merged(args)])


def _merged(lines: list[str]) -> list[str]:
    """GBNF rules from several conversions, each once: rules are named by path under their top rule (``args0``,
    ``call``), and helpers such as ``space`` come with every conversion."""
    rules: dict[str, str] = {}
    for line in lines:
        name, _, body = line.partition(" ::= ")
        if name in rules and rules[name] != body:
            raise UsageError(f"the tools' grammars clash on the rule {name!r}", "rename the tool")
        rules[name] = body
    return [f"{name} ::= {body}" for name, body in rules.items()]


def _named_arguments(tools: tuple[Tool, ...], between: str) -> tuple[list[str], list[str]]:
    """For formats that write a call's name outside its JSON (``name`` ``between`` ``{arguments}``): the rules
    of each tool's arguments (``args<N>``), and one choice per tool."""
    from llmrun.engine.sampling import json_schema_rules

    lines: list[str] = []
    choices = []
    for number, tool in enumerate(tools):
        lines += json_schema_rules(grammar_schema(tool.parameters), f"args{number}", compact=True).splitlines()
        choices.append(f"{json.dumps(tool.name)} {between} args{number}")
    return _merged(lines), choices


def system_prompt(plan: ToolPlan, choice: ToolChoice) -> str:
    """For a template that does not render tools: what the model must know, in a system message."""
    described = json.dumps([tool.as_template_tool()["function"] for tool in plan.tools], ensure_ascii=False)
    calls = '{"tool_calls": [{"name": "<tool name>", "arguments": {<its arguments>}}]}'
    if choice.mode in ("required", "function"):
        how = f"Answer only with a JSON object that calls the tools: {calls}"
    else:
        how = (
            f"To call tools, answer only with a JSON object: {calls}. "
            'To answer without a tool, answer only with {"response": "<your answer>"}.'
        )
    return f"You can use these tools:\n{described}\n{how}"


def new_call_id(fmt: ToolFormat) -> str:
    if fmt in (ToolFormat.MISTRAL, ToolFormat.MISTRAL_V11):  # Mistral's templates require 9 letters and digits
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return f"call_{secrets.token_hex(12)}"


# -- the prompt side --------------------------------------------------------------------------


def prompt_messages(messages: list[dict[str, Any]], plan: ToolPlan | None, choice: ToolChoice) -> list[dict[str, Any]]:
    """Messages ready for the chat template: call arguments as objects, tool results tied to their calls, an
    assistant turn's thinking as ``reasoning_content`` (Qwen3's templates) and ``thinking`` (gpt-oss's).

    With a template that does not render tools, the tools are described in a system message
    and past calls and results are written the way the generic format asks for them.
    """
    names_by_id: dict[str, str] = {}
    prepared: list[dict[str, Any]] = []
    generic = plan is not None and not plan.template_tools
    for message in messages:
        message = dict(message)
        if message.get("reasoning_content") and "thinking" not in message:
            message["thinking"] = message["reasoning_content"]  # gpt-oss's template reads it there
        calls = message.get("tool_calls")
        if calls:
            message["tool_calls"] = [_template_call(call) for call in calls]
            for call in message["tool_calls"]:
                names_by_id[call["id"]] = call["function"]["name"]
            if generic:
                written = [{"name": call["function"]["name"], "arguments": call["function"]["arguments"]}
                           for call in message.pop("tool_calls")]  # fmt: skip
                message["content"] = json.dumps({"tool_calls": written}, ensure_ascii=False)
        if message.get("role") == "tool":
            name = message.get("name") or names_by_id.get(str(message.get("tool_call_id")), "")
            message["name"] = name
            if generic:
                result = {"tool_response": {"tool": name, "content": message.get("content") or ""}}
                message = {"role": "user", "content": json.dumps(result, ensure_ascii=False)}
        prepared.append(message)
    if generic and plan is not None and plan.constrained:
        instructions = system_prompt(plan, choice)
        if prepared and prepared[0].get("role") == "system":
            prepared[0] = {**prepared[0], "content": f"{prepared[0].get('content') or ''}\n\n{instructions}"}
        else:
            prepared.insert(0, {"role": "system", "content": instructions})
    return prepared


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    arguments: Any = function.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):  # else left as the text it is
            arguments = json.loads(arguments) if arguments.strip() else {}
    return {"id": call.get("id") or "", "type": "function",
            "function": {"name": function.get("name") or "", "arguments": arguments}}  # fmt: skip


# -- the output side --------------------------------------------------------------------------


@dataclass(frozen=True)
class ContentPiece:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsPiece:
    index: int
    text: str


Piece = ContentPiece | CallStart | ArgumentsPiece

_MARKERS = {
    ToolFormat.HERMES: "<tool_call>", ToolFormat.MISTRAL: "[TOOL_CALLS]", ToolFormat.MISTRAL_V11: "[TOOL_CALLS]",
    ToolFormat.HARMONY: "to=functions.",  # as reasoning.HarmonySplitter passes a call on: to=functions.NAME<|message|>
}  # fmt: skip
# Formats that write the name before the arguments' JSON, and what separates them.
_ARGUMENTS_AFTER_NAME = {ToolFormat.MISTRAL_V11: "[ARGS]", ToolFormat.HARMONY: "<|message|>"}

_HERMES_CLOSE = "</tool_call>"


@dataclass
class _Call:
    id: str
    name: str | None = None
    arguments_start: int = -1
    arguments_sent: int = 0  # characters of the arguments already given out
    arguments: str | None = None  # complete JSON text
    started: bool = False


class ToolCallParser:
    """Splits a model's output into answer text and tool calls, piece by piece as it streams."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.fmt = plan.format
        self.text = ""  # everything fed
        self.content = ""  # answer text given out
        self.calls: list[_Call] = []
        self.failed = False  # output that looked like a call but is not one: all of it is text
        self._position = 0  # how far self.text has been handled
        self._scanner: JsonScanner | None = None
        self._marker_start = 0  # where the call's marker (or JSON) begins in self.text
        self._region_start = 0  # where the scanner's text begins in self.text
        self._call_base = 0  # index of the scanner's first call
        self._closing = False  # hermes: a call object is complete, "</tool_call>" is due
        self._response_sent = 0  # generic: characters of the response string given out
        self._naming = False  # mistral-v11, harmony: reading a call's name, up to "[ARGS]" or "<|message|>"

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [ToolCall(call.id, call.name or "", call.arguments or "{}") for call in self.calls]

    def feed(self, text: str) -> list[Piece]:
        self.text += text
        pieces: list[Piece] = []
        while self._position < len(self.text) and not self.failed:
            before = (self._position, self._scanner, self._closing, self._naming)
            if self._closing:
                self._read_close()
            elif self._naming:
                self._read_name()
            elif self._scanner is not None:
                self._read_json(pieces)
            else:
                self._read_content(pieces)
            if (self._position, self._scanner, self._closing, self._naming) == before:
                break  # waiting for more text
        if self.failed:
            self._emit_content(pieces, self.text[self._position :])
        return pieces

    def finish(self) -> list[Piece]:
        """The output is complete: flush held-back text; an unfinished or invalid call makes it all text."""
        pieces: list[Piece] = []
        if self._scanner is not None and not self.failed:
            self._scanner.finish()
            self._collect(pieces, self._scanner)
            if self._scanner.done:
                self._scanner = None
        if self.fmt is ToolFormat.GENERIC and not self.calls and not self.failed:
            return pieces  # an answer (perhaps cut short): its text has been given out
        unfinished = self._scanner is not None or self._closing or self._naming
        if self.failed or unfinished or not self._valid_calls():
            if not self.failed:
                self.failed = True
                self._position = self._marker_start if self.calls or unfinished else self._position
            self.calls = []
        rest = self.text[self._position :]
        if not (self.calls and not rest.strip()):
            self._emit_content(pieces, rest)
        return pieces

    def final_content(self) -> str:
        """The whole answer text, once finished."""
        if self.failed:
            return self.text
        return self.content.strip() if self.calls else self.content

    # -- reading --------------------------------------------------------------------------

    def _emit_content(self, pieces: list[Piece], text: str) -> None:
        self._position += len(text)
        if text:
            self.content += text
            pieces.append(ContentPiece(text))

    def _read_content(self, pieces: list[Piece]) -> None:
        rest = self.text[self._position :]
        if self.fmt is ToolFormat.GENERIC or (self.fmt is ToolFormat.LLAMA3 and not self.content.strip()):
            # The call is the whole answer: JSON from the first character that is not a space.
            stripped = rest.lstrip()
            if self.fmt is ToolFormat.LLAMA3 and stripped.startswith("<|python_tag|>"):
                stripped = stripped[len("<|python_tag|>") :].lstrip()
            elif self.fmt is ToolFormat.LLAMA3 and "<|python_tag|>".startswith(stripped):
                return  # perhaps the tag, cut between tokens
            if not stripped:
                return
            if self.fmt is ToolFormat.GENERIC or stripped[0] == "{":
                self._marker_start = self._position
                self._start_json(len(self.text) - len(stripped))
            else:
                self._emit_content(pieces, rest)
            return
        marker = _MARKERS.get(self.fmt)
        found = rest.find(marker) if marker else -1
        if marker is None:
            self._emit_content(pieces, rest)
        elif found >= 0:
            start = self._position
            self._emit_content(pieces, rest[:found].rstrip())  # the space before a call is not answer text
            self._marker_start = start + found
            if self.fmt in _ARGUMENTS_AFTER_NAME:
                self._position, self._naming = start + found + len(marker), True
            else:
                self._start_json(start + found + len(marker))
        else:
            # Hold back what may be the start of the marker, and trailing space (it may precede one).
            self._emit_content(pieces, rest[: len(rest) - partial_suffix(rest, marker)].rstrip())

    def _start_json(self, start: int) -> None:
        self._scanner = JsonScanner()
        self._region_start = self._position = start
        self._call_base = len(self.calls)

    def _read_json(self, pieces: list[Piece]) -> None:
        scanner = self._scanner
        assert scanner is not None
        scanner.feed(self.text[self._region_start + len(scanner.text) :])
        if scanner.error is None:
            self._collect(pieces, scanner)
        if scanner.error is not None or self.failed:
            self.failed = True
            self._position = self._marker_start
            return
        if scanner.done:
            self._position = self._region_start + scanner.end
            self._scanner = None
            self._closing = self.fmt is ToolFormat.HERMES
        else:
            self._position = len(self.text)

    def _read_name(self) -> None:
        """mistral-v11 and harmony: the call's name, then its arguments' JSON after "[ARGS]" or "<|message|>"."""
        rest = self.text[self._position :]
        separator = _ARGUMENTS_AFTER_NAME[self.fmt]
        end = rest.find(separator)
        if end < 0:
            if len(rest) > 256 or any(char.isspace() for char in rest.strip()):
                self.failed, self._naming = True, False
                self._position = self._marker_start
            return
        name = rest[:end].strip()
        if not name or not all(char.isalnum() or char in "_-." for char in name):
            self.failed, self._naming = True, False
            self._position = self._marker_start
            return
        index = len(self.calls)
        self._call(index).name = name
        self._naming = False
        self._start_json(self._position + end + len(separator))
        self._call_base = index

    def _read_close(self) -> None:
        rest = self.text[self._position :]
        stripped = rest.lstrip()
        if not stripped:
            self._position = len(self.text)
        elif stripped.startswith(_HERMES_CLOSE):
            self._closing = False
            self._position = len(self.text) - len(stripped) + len(_HERMES_CLOSE)
            tail = self.text[self._position :]  # whitespace between calls is not answer text
            self._position += len(tail) - len(tail.lstrip())
        elif not _HERMES_CLOSE.startswith(stripped):
            self.failed = True
            self._position = self._marker_start

    # -- calls out of a scanned JSON value ----------------------------------------------------

    def _call_field(self, path: Path) -> tuple[int, str] | None:
        """(call index, field name) when ``path`` is a field of a call object, else None."""
        if self.fmt is ToolFormat.GENERIC:
            if len(path) == 3 and path[0] == "tool_calls" and isinstance(path[1], int):
                return self._call_base + path[1], str(path[2])
        elif self.fmt is ToolFormat.MISTRAL:
            if len(path) == 2 and isinstance(path[0], int):
                return self._call_base + path[0], str(path[1])
        elif self.fmt in _ARGUMENTS_AFTER_NAME:
            return (self._call_base, "arguments") if path == () else None
        elif len(path) == 1:
            return self._call_base, str(path[0])
        return None

    def _collect(self, pieces: list[Piece], scanner: JsonScanner) -> None:
        arguments_key = "parameters" if self.fmt is ToolFormat.LLAMA3 else "arguments"
        text = scanner.text
        for path, (start, end) in scanner.values.items():
            located = self._call_field(path)
            if located is None:
                continue
            call = self._call(located[0])
            if located[1] == "name" and call.name is None:
                name = json.loads(text[start:end])
                if not isinstance(name, str):
                    self.failed = True
                    return
                call.name = name
            elif located[1] == arguments_key and call.arguments is None:
                call.arguments_start, call.arguments = start, text[start:end]
        for opened in scanner.open_values():
            located = self._call_field(opened.path)
            if located is not None and located[1] == arguments_key:
                self._call(located[0]).arguments_start = opened.start
        if self.fmt is ToolFormat.GENERIC:
            self._collect_response(pieces, scanner)
        for index in range(self._call_base, len(self.calls)):
            self._stream_call(pieces, index, text)

    def _call(self, index: int) -> _Call:
        while len(self.calls) <= index:
            self.calls.append(_Call(new_call_id(self.fmt)))
        return self.calls[index]

    def _stream_call(self, pieces: list[Piece], index: int, text: str) -> None:
        call = self.calls[index]
        if call.name is None:
            return  # the name comes first in what clients see
        if not call.started:
            call.started = True
            pieces.append(CallStart(index, call.id, call.name))
        if call.arguments_start < 0:
            return
        end = call.arguments_start + len(call.arguments) if call.arguments is not None else len(text)
        sent = call.arguments_start + call.arguments_sent
        if end > sent:
            pieces.append(ArgumentsPiece(index, text[sent:end]))
            call.arguments_sent = end - call.arguments_start

    def _collect_response(self, pieces: list[Piece], scanner: JsonScanner) -> None:
        """Generic format: the "response" string is answer text, given out as it is written."""
        text = scanner.text
        span = scanner.values.get(("response",))
        if span is not None:
            raw = text[span[0] + 1 : span[1] - 1]
        else:
            opened = next((value for value in scanner.open_values() if value.path == ("response",)), None)
            if opened is None or text[opened.start] != '"':
                return
            raw = _complete_escapes(text[opened.start + 1 :])
        decoded = json.loads(f'"{raw}"')
        if len(decoded) > self._response_sent:
            piece = decoded[self._response_sent :]
            self._response_sent = len(decoded)
            self.content += piece
            pieces.append(ContentPiece(piece))

    def _valid_calls(self) -> bool:
        """Every call names a tool and its arguments match that tool's schema."""
        import jsonschema

        schemas = {tool.name: tool.parameters for tool in self.plan.tools}
        for call in self.calls:
            if call.name not in schemas or call.arguments is None:
                return False
            try:
                arguments = json.loads(call.arguments)
                jsonschema.validate(arguments, schemas[call.name])
            except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError):
                return False
            if not isinstance(arguments, dict):
                return False
        return True


def _complete_escapes(raw: str) -> str:
    """``raw`` (inside a JSON string) without a backslash escape cut short at its end."""
    cut = raw.rfind("\\")
    while cut >= 0:
        # Count the backslashes ending at ``cut``: an odd run means ``cut`` starts an escape.
        run = 0
        while cut - run >= 0 and raw[cut - run] == "\\":
            run += 1
        if run % 2 == 0:
            return raw
        needed = 6 if raw[cut + 1 : cut + 2] == "u" else 2
        return raw[:cut] if len(raw) - cut < needed else raw
    return raw
