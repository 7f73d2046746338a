"""Reasoning models' thinking, told apart from their answer as it streams.

Most reasoning models think inside a pair of tags before answering: ``<think>...</think>``
(Qwen3, QwQ, DeepSeek-R1 and its distills, GLM, SmolLM3, ...), ``[THINK]...[/THINK]``
(Magistral, Ministral 3 Reasoning), ``<seed:think>`` (Seed-OSS), ``<|START_THINKING|>``
(Command R7B). Their chat templates often open the block in the prompt (the generation
prompt ends with the opening tag), so the output starts inside it. gpt-oss writes OpenAI's
harmony format instead: messages on channels, ``analysis`` for its thinking and ``final``
for the answer. The format is read off the chat template; a model whose template closes
no think block is not split at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

REASONING = "reasoning"
CONTENT = "content"


class Splitter(Protocol):
    """Feeds on output text; gives ``(kind, text)`` pieces, kind ``reasoning`` or ``content``."""

    def feed(self, text: str) -> list[tuple[str, str]]: ...

    def finish(self) -> list[tuple[str, str]]: ...


@dataclass(frozen=True)
class ReasoningFormat:
    """How a model family marks its thinking: a pair of tags, or harmony's channels."""

    open: str
    close: str
    harmony: bool = False

    def splitter(self, inside: bool) -> Splitter:
        """A splitter for one answer; ``inside``: the prompt left the thinking open."""
        return HarmonySplitter(inside) if self.harmony else ReasoningSplitter(inside, self)

    def opened_in_prompt(self, prompt_text: str) -> bool:
        """Whether the rendered prompt leaves the thinking open, so the output starts inside it."""
        return prompt_text.rstrip().endswith(self.open.rstrip())

    def template_options(self, think: bool | None, effort: str | None = None) -> dict[str, object]:
        """What the chat template is told: Qwen3-style ``enable_thinking``, and a ``reasoning_effort`` (low,
        medium, high) for the templates that take one; gpt-oss cannot stop thinking, so "no" is its lowest effort."""
        options: dict[str, object] = {}
        if effort in EFFORTS:
            options["reasoning_effort"] = effort
        if self.harmony:
            if think is False:
                options["reasoning_effort"] = "low"
        elif think is not None:
            options["enable_thinking"] = think
        return options


EFFORTS = ("low", "medium", "high")
THINK = ReasoningFormat("<think>", "</think>")
HARMONY = ReasoningFormat("<|channel|>analysis<|message|>", "<|end|>", harmony=True)
TAG_FORMATS = (
    THINK,
    ReasoningFormat("[THINK]", "[/THINK]"),
    ReasoningFormat("<seed:think>", "</seed:think>"),
    ReasoningFormat("<|START_THINKING|>", "<|END_THINKING|>"),
)


def reasoning_format(template: str | None) -> ReasoningFormat | None:
    """The reasoning format a chat template uses, or None for a model that does not think."""
    if not template:
        return None
    if "<|channel|>" in template and "analysis" in template:
        return HARMONY
    for fmt in TAG_FORMATS:
        if fmt.close in template:
            return fmt
    return None


class ReasoningSplitter:
    """Splits output whose thinking sits between a pair of tags (``<think>...</think>`` by default).

    Text that could be the start of a tag is held back until it is known; the whitespace
    around the think block is dropped, as the models' own templates drop it from history.
    """

    def __init__(self, inside: bool, fmt: ReasoningFormat = THINK) -> None:
        self._open, self._close = fmt.open, fmt.close
        self._state = "reasoning" if inside else "start"
        self._held = ""
        self._fresh = True  # no reasoning text yet: its leading whitespace is dropped

    def feed(self, text: str) -> list[tuple[str, str]]:
        pieces: list[tuple[str, str]] = []
        buffer = self._held + text
        self._held = ""
        while buffer:
            if self._state == "start":
                stripped = buffer.lstrip()
                if stripped.startswith(self._open):
                    buffer, self._state = stripped[len(self._open) :], "reasoning"
                elif self._open.startswith(stripped):
                    self._held = buffer  # perhaps the tag's start (or only whitespace so far)
                    return pieces
                else:
                    self._state = "content"
            elif self._state == "reasoning":
                end = buffer.find(self._close)
                if end >= 0:
                    self._reason(pieces, buffer[:end].rstrip())
                    buffer, self._state = buffer[end + len(self._close) :], "after"
                    continue
                # Held back: what may start the closing tag, and trailing whitespace (dropped before it).
                emit = buffer[: len(buffer) - partial_suffix(buffer, self._close)].rstrip()
                self._held = buffer[len(emit) :]
                self._reason(pieces, emit)
                return pieces
            elif self._state == "after":
                buffer = buffer.lstrip()
                if buffer:
                    self._state = "content"
            else:
                _add(pieces, CONTENT, buffer)
                return pieces
        return pieces

    def _reason(self, pieces: list[tuple[str, str]], text: str) -> None:
        if self._fresh:
            text = text.lstrip()
            self._fresh = not text
        _add(pieces, REASONING, text)

    def finish(self) -> list[tuple[str, str]]:
        """What was held back, at the end of the output."""
        held, self._held = self._held, ""
        if not held:
            return []
        if self._state == "reasoning":
            pieces: list[tuple[str, str]] = []
            self._reason(pieces, held.rstrip())
            return pieces
        if self._state == "start" and held.strip():
            return [(CONTENT, held)]
        return []


MAX_HEADER_CHARS = 256  # longer than any harmony header (role, channel, recipient, content type)


class HarmonySplitter:
    """Splits gpt-oss's harmony output: messages on channels, ``analysis`` the thinking, the rest the answer.

    Each message is ``<|start|>assistant<|channel|>NAME<|message|>BODY<|end|>`` (the first one's
    ``<|start|>assistant`` is in the prompt). ``final`` messages, and ``commentary`` addressed to
    nobody (preambles), are answer text. A message addressed to a tool
    (``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}``) is passed on
    as answer text in one plain form, ``to=functions.NAME<|message|>{...}``, for the tool parser.
    Output without any header (the model ignored its format) is all answer.
    """

    _HEADS = ("<|start|>", "<|channel|>", "to=")  # to=: a call addressed right after the prompt's <|start|>assistant
    _ENDS = ("<|end|>", "<|return|>", "<|call|>", "<|start|>", "<|channel|>")

    def __init__(self, inside: bool) -> None:
        self._state = "body" if inside else "between"
        self._kind = REASONING if inside else CONTENT
        self._held = ""
        self._answered = False  # answer text given out: the whitespace between messages is then kept out

    def feed(self, text: str) -> list[tuple[str, str]]:
        pieces: list[tuple[str, str]] = []
        buffer = self._held + text
        self._held = ""
        while buffer:
            if self._state == "between":
                stripped = buffer.lstrip()
                if stripped.startswith(self._HEADS):
                    buffer, self._state = stripped, "header"
                elif not stripped or any(head.startswith(stripped) for head in self._HEADS):
                    self._held = buffer
                    return pieces
                else:
                    self._state, self._kind = "plain", CONTENT
            elif self._state == "header":
                end = buffer.find("<|message|>")
                if end < 0 and len(buffer) > MAX_HEADER_CHARS:
                    self._state, self._kind = "plain", CONTENT  # no header after all: the model left its format
                    continue
                if end < 0:
                    self._held = buffer  # a header is a few tokens: wait for all of it
                    return pieces
                header, buffer = buffer[:end], buffer[end + len("<|message|>") :]
                self._start_message(pieces, header)
            elif self._state == "body":
                ends = [(found, marker) for marker in self._ENDS if (found := buffer.find(marker)) >= 0]
                if ends:
                    found, marker = min(ends)
                    self._body(pieces, buffer[:found])
                    skip = len(marker) if marker in ("<|end|>", "<|return|>", "<|call|>") else 0
                    buffer, self._state = buffer[found + skip :], "between"
                    continue
                keep = partial_suffix(buffer, *self._ENDS)
                self._body(pieces, buffer[: len(buffer) - keep])
                self._held = buffer[len(buffer) - keep :]
                return pieces
            else:  # plain
                self._body(pieces, buffer)
                return pieces
        return pieces

    def _start_message(self, pieces: list[tuple[str, str]], header: str) -> None:
        words = header.replace("<|", " <|").replace("|>", "|> ").split()
        channel = words[words.index("<|channel|>") + 1] if "<|channel|>" in words[:-1] else ""
        recipient = next((word[3:] for word in words if word.startswith("to=")), None)
        self._state = "body"
        if recipient is not None and recipient != "assistant":
            self._kind = CONTENT
            _add(pieces, CONTENT, f"to={recipient}<|message|>")
        else:
            self._kind = REASONING if channel == "analysis" else CONTENT

    def _body(self, pieces: list[tuple[str, str]], text: str) -> None:
        if self._kind == CONTENT:
            if not self._answered:
                text = text.lstrip()
            self._answered = self._answered or bool(text)
        _add(pieces, self._kind, text)

    def finish(self) -> list[tuple[str, str]]:
        """What was held back, at the end of the output (an unfinished header is dropped)."""
        held, self._held = self._held, ""
        pieces: list[tuple[str, str]] = []
        if self._state == "body":
            self._body(pieces, held)
        return pieces


def _add(pieces: list[tuple[str, str]], kind: str, text: str) -> None:
    if text:
        pieces.append((kind, text))


def partial_suffix(buffer: str, *tags: str) -> int:
    """The length of the longest end of ``buffer`` that starts one of ``tags`` (text to hold back: it may be
    the start of a tag cut between tokens)."""
    longest = 0
    for tag in tags:
        for length in range(min(len(tag) - 1, len(buffer)), longest, -1):
            if buffer.endswith(tag[:length]):
                longest = length
                break
    return longest
