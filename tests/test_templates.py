"""Chat templates render exactly as Hugging Face transformers renders them, on the real templates llama.cpp vendors.

The templates come from the installed llama-cpp-python's sdist (``vendor/llama.cpp/models/templates/*.jinja``):
the tree ``scripts/build_native.sh`` unpacks under ``.cache/native/`` when it is there, else the sdist tarball,
downloaded once from PyPI into the same folder and read with ``tarfile`` (nothing is built).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

import pytest
import transformers.utils.chat_template_utils as hf_templates
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

import llmrun.engine.template as our_templates
from llmrun.engine.template import render_chat, template_supports_tools
from llmrun.errors import InvalidModelFile

ROOT = Path(__file__).resolve().parent.parent
NATIVE_DIR = ROOT / ".cache" / "native"
TEMPLATES_IN_SDIST = "vendor/llama.cpp/models/templates"

BOS, EOS = "<|bos|>", "<|eos|>"


def llama_cpp_templates(native_dir: Path = NATIVE_DIR) -> dict[str, str]:
    """The chat templates vendored in the installed llama-cpp-python's sdist, by file name."""
    version = importlib.metadata.version("llama-cpp-python")
    unpacked = native_dir / f"llama_cpp_python-{version}" / TEMPLATES_IN_SDIST
    if unpacked.is_dir():
        return {path.name: path.read_text(encoding="utf-8") for path in sorted(unpacked.glob("*.jinja"))}
    tarball = native_dir / f"llama_cpp_python-{version}.tar.gz"
    if not tarball.exists():
        download_sdist(version, tarball)
    templates = {}
    with tarfile.open(tarball) as archive:
        for member in archive:
            directory, _, name = member.name.rpartition("/")
            if member.isfile() and directory.endswith("/" + TEMPLATES_IN_SDIST) and name.endswith(".jinja"):
                reader = archive.extractfile(member)
                assert reader is not None
                templates[name] = reader.read().decode("utf-8")
    assert templates, f"{tarball.name} has no {TEMPLATES_IN_SDIST}/*.jinja"
    return dict(sorted(templates.items()))


def download_sdist(version: str, target: Path) -> None:
    """``pip download`` the sdist (as scripts/build_native.sh does), then move it into place whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmrun-sdist-", dir=target.parent) as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
            "--disable-pip-version-check", f"llama-cpp-python=={version}", "-d", tmp,
        ]  # fmt: skip
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        assert completed.returncode == 0, f"pip could not download the llama-cpp-python sdist:\n{completed.stderr}"
        Path(tmp, target.name).replace(target)


TEMPLATES = llama_cpp_templates()

# --- the conversations ---------------------------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city, e.g. Zürich"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers <exactly> & return the sum.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "integer", "minimum": 0}},
                "required": ["a", "b"],
            },
        },
    },
]

DOCUMENTS = [
    {"title": "Paris", "text": "Paris is the capital of France. It has 2.1 million inhabitants."},
    {"title": "Zürich", "text": 'Zürich is the largest city in Switzerland; "Züri" to its people.'},
]

SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
USER = {"role": "user", "content": 'What is the capital of France? Use <b>bold</b> & quotes "like this".'}
ASSISTANT = {"role": "assistant", "content": "The capital of France is **Paris**."}
USER_2 = {"role": "user", "content": "And its population? Réponds en français."}
ASSISTANT_2 = {"role": "assistant", "content": "Environ 2,1 millions d'habitants."}
TOOL_CALL = {
    "role": "assistant",
    "content": None,  # as OpenAI sends it; dropped before rendering
    "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ],
}
TOOL_RESULT = {
    "role": "tool",
    "tool_call_id": "call_1",
    "name": "get_weather",
    "content": '{"temperature": 18, "sky": "clear"}',
}
TOOL_RESULT_9 = {**TOOL_RESULT, "tool_call_id": "a1B2c3D4e"}
# With a content, and a 9-character id as Mistral's templates require. The arguments stay a dict: most templates
# refuse the JSON string the OpenAI API carries (transformers' convention: decode it before rendering).
TOOL_CALL_9 = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {"id": "a1B2c3D4e", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ],
}
WEATHER_QUESTION = {"role": "user", "content": "What's the weather in Paris?"}
WEATHER_ANSWER = {"role": "assistant", "content": "It is 18 °C and clear in Paris."}
REASONING = {
    "role": "assistant",
    "reasoning_content": "The user asks for the capital of France. That is Paris.",
    "content": "Paris.",
}


@dataclass(frozen=True)
class Conversation:
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    tools: list[Any] | None = None
    documents: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


CONVERSATIONS = {
    "user": Conversation([USER]),
    "system-user": Conversation([SYSTEM, USER]),
    "multi-turn": Conversation([SYSTEM, USER, ASSISTANT, USER_2]),
    "ends-on-assistant": Conversation([SYSTEM, USER, ASSISTANT, USER_2, ASSISTANT_2], add_generation_prompt=False),
    "tools": Conversation([SYSTEM, USER, ASSISTANT, USER_2], tools=TOOLS),
    "tools-ends-on-assistant": Conversation([USER, ASSISTANT], add_generation_prompt=False, tools=TOOLS),
    "tool-call": Conversation([SYSTEM, WEATHER_QUESTION, TOOL_CALL, TOOL_RESULT, USER_2], tools=TOOLS),
    # The whole round (Mistral's templates want the answer before the next user turn).
    "tool-call-answered": Conversation(
        [SYSTEM, WEATHER_QUESTION, TOOL_CALL_9, TOOL_RESULT_9, WEATHER_ANSWER, USER_2], tools=TOOLS
    ),
    "reasoning": Conversation([USER, REASONING, USER_2]),
    "documents": Conversation([USER], documents=DOCUMENTS),
    # Qwen3's and SmolLM3's switch, gpt-oss's effort, firefunction's required tools (a JSON string) and date.
    "extra-kwargs": Conversation(
        [SYSTEM, USER],
        extra={
            "enable_thinking": False,
            "reasoning_effort": "high",
            "functions": json.dumps(TOOLS, indent=2),
            "datetime": "2025-03-14",
        },
    ),
}

# Cases that cannot match for a reason outside our reach: {(template, conversation): reason}.
KNOWN_DIFFERENCES: dict[tuple[str, str], str] = {}


class FrozenDatetime(datetime):
    """``strftime_now`` in both renderers reads this clock, so a date in a prompt is the same on both sides."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> FrozenDatetime:
        return cls(2025, 3, 14, 9, 26, 53, tzinfo=tz)


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(our_templates, "datetime", FrozenDatetime)
    monkeypatch.setattr(hf_templates, "datetime", FrozenDatetime)


@pytest.fixture(scope="module")
def hf_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer whose only special tokens are BOS and EOS: what ``apply_chat_template`` passes the template."""
    vocabulary = Tokenizer(WordLevel({BOS: 0, EOS: 1}, unk_token=EOS))
    return PreTrainedTokenizerFast(tokenizer_object=vocabulary, bos_token=BOS, eos_token=EOS)  # type: ignore[no-untyped-call]


def render_ours(template: str, conversation: Conversation) -> str:
    return render_chat(
        template,
        copy.deepcopy(conversation.messages),
        bos_token=BOS,
        eos_token=EOS,
        add_generation_prompt=conversation.add_generation_prompt,
        tools=copy.deepcopy(conversation.tools),
        documents=copy.deepcopy(conversation.documents),
        **copy.deepcopy(conversation.extra),
    )


def render_transformers(tokenizer: PreTrainedTokenizerFast, template: str, conversation: Conversation) -> str:
    rendered = tokenizer.apply_chat_template(
        copy.deepcopy(conversation.messages),
        tools=copy.deepcopy(conversation.tools),
        documents=copy.deepcopy(conversation.documents),
        chat_template=template,
        add_generation_prompt=conversation.add_generation_prompt,
        tokenize=False,
        **copy.deepcopy(conversation.extra),
    )
    assert isinstance(rendered, str)
    return rendered


def corpus_cases() -> list[Any]:
    cases = []
    for template in TEMPLATES:
        for conversation in CONVERSATIONS:
            reason = KNOWN_DIFFERENCES.get((template, conversation))
            marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
            cases.append(pytest.param(template, conversation, id=f"{template}-{conversation}", marks=marks))
    return cases


def test_the_corpus_is_there() -> None:
    assert len(TEMPLATES) >= 60, sorted(TEMPLATES)


@pytest.mark.parametrize(("template_name", "conversation_name"), corpus_cases())
def test_renders_like_transformers(
    hf_tokenizer: PreTrainedTokenizerFast, template_name: str, conversation_name: str
) -> None:
    template, conversation = TEMPLATES[template_name], CONVERSATIONS[conversation_name]
    try:
        expected = render_transformers(hf_tokenizer, template, conversation)
    except Exception as refusal:  # noqa: BLE001 - the template refuses the conversation: ours must refuse it too
        with pytest.raises(InvalidModelFile) as ours_refused:
            render_ours(template, conversation)
        assert "\n" not in ours_refused.value.message, "an error message must be one line"
        assert " ".join(str(refusal).split()) in ours_refused.value.message
        return
    assert render_ours(template, conversation) == expected


def outcome(template: str, conversation: Conversation) -> str:
    """The rendered text, or the error."""
    try:
        return render_ours(template, conversation)
    except InvalidModelFile as error:
        return f"error: {error.message}"


@pytest.mark.parametrize("template_name", TEMPLATES)
def test_tools_matter_only_where_the_template_reads_them(template_name: str) -> None:
    template = TEMPLATES[template_name]
    assert template_supports_tools(template) == ("tools" in hf_templates._get_template_variables(template))
    if not template_supports_tools(template):
        conversation = CONVERSATIONS["multi-turn"]
        with_tools = Conversation(conversation.messages, tools=TOOLS)
        assert outcome(template, with_tools) == outcome(template, conversation)


# --- the details, on small templates -------------------------------------------------------------------------------


def test_supports_tools_reads_the_variable_not_the_text() -> None:
    assert template_supports_tools("{% if tools %}{{ tools | tojson }}{% endif %}{{ messages[0].content }}")
    assert not template_supports_tools("{# no tools here #}{{ messages[0].content }}")
    assert not template_supports_tools("{% set tools = [] %}{{ tools }}")  # its own variable, not ours
    with pytest.raises(InvalidModelFile, match="chat template"):
        template_supports_tools("{% if %}")


def test_generation_tag_renders_its_body_in_its_own_scope() -> None:
    template = (
        "{% for m in messages %}{% generation %}{% set seen = true %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
        "{{ seen is defined }}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert render_chat(template, messages, bos_token="", eos_token="") == "[hi][hello]False"


def test_tojson_is_plain_json() -> None:
    template = "{{ tools | tojson }}|{{ tools | tojson(indent=2) | length > 0 }}"
    tools = [{"name": "x", "description": "<b> & 'é'", "b": 1, "a": 2}]
    assert render_chat(template, [], bos_token="", eos_token="", tools=tools) == (
        '[{"name": "x", "description": "<b> & \'é\'", "b": 1, "a": 2}]|True'
    )


def test_reasoning_is_seen_under_each_name() -> None:
    template = "{{ messages[0].reasoning_content }}|{{ messages[0].thinking }}|{{ messages[0].content is defined }}"
    message = {"role": "assistant", "reasoning": "hmm", "content": None}
    assert render_chat(template, [message], bos_token="", eos_token="") == "hmm|hmm|False"


def test_extra_keywords_and_strftime_reach_the_template() -> None:
    template = "{{ enable_thinking }} {{ strftime_now('%d %b %Y') }} {{ bos_token }}{{ eos_token }}"
    assert render_chat(template, [], bos_token="<s>", eos_token="</s>", enable_thinking=False) == (
        "False 14 Mar 2025 <s></s>"
    )


@pytest.mark.parametrize(
    "hostile",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{% set ns = namespace(_x=1) %}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
        "{{ dict.__class__.__mro__ }}",
        "{{ dict.mro() }}",
        "{{ messages.append(1) }}",
    ],
)
def test_the_sandbox_holds(hostile: str) -> None:
    with pytest.raises(InvalidModelFile, match="chat template"):
        render_chat(hostile, [USER], bos_token="", eos_token="")


def test_a_python_error_in_a_template_is_the_model_files_fault() -> None:
    with pytest.raises(InvalidModelFile, match="the model's chat template failed: can only concatenate str"):
        render_chat("{{ 'a' + 1 }}", [USER], bos_token="", eos_token="")
