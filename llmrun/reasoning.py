"""Reasoning models' thinking, told apart from their answer as it streams.

Qwen3, QwQ, DeepSeek-R1 and its distills (and the templates written like theirs) think in
``<think>...</think>`` before answering; their chat templates often open the block in the
prompt (the generation prompt ends with ``<think>``), so the output starts inside it. A
model whose template never mentions ``</think>`` is not split at all.
"""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"

REASONING = "reasoning"
CONTENT = "content"


def thinks(template: str | None) -> bool:
    """Whether a chat template is a reasoning model's (it closes a think block somewhere)."""
    return bool(template) and CLOSE in (template or "")


def opened_in_prompt(prompt_text: str) -> bool:
    """Whether the rendered prompt leaves a think block open, so the output starts inside it."""
    tail = prompt_text.rstrip()
    return tail.endswith(OPEN)


class ReasoningSplitter:
    """Feeds on output text; gives ``(kind, text)`` pieces, kind ``reasoning`` or ``content``.

    Text that could be the start of a tag is held back until it is known; the whitespace
    around the think block is dropped, as the models' own templates drop it from history.
    """

    def __init__(self, inside: bool) -> None:
        self._state = "reasoning" if inside else "start"
        self._held = ""
        self._fresh = True  # no reasoning text yet: its leading whitespace is dropped

    @property
    def thinking(self) -> bool:
        return self._state in ("start", "reasoning")

    def feed(self, text: str) -> list[tuple[str, str]]:
        pieces: list[tuple[str, str]] = []
        buffer = self._held + text
        self._held = ""
        while buffer:
            if self._state == "start":
                stripped = buffer.lstrip()
                if stripped.startswith(OPEN):
                    buffer, self._state = stripped[len(OPEN) :], "reasoning"
                elif OPEN.startswith(stripped):
                    self._held = buffer  # perhaps the tag's start (or only whitespace so far)
                    return pieces
                else:
                    self._state = "content"
            elif self._state == "reasoning":
                end = buffer.find(CLOSE)
                if end >= 0:
                    self._reason(pieces, buffer[:end].rstrip())
                    buffer, self._state = buffer[end + len(CLOSE) :], "after"
                    continue
                # Held back: what may start the closing tag, and trailing whitespace (dropped before it).
                emit = buffer[: len(buffer) - _partial_suffix(buffer, CLOSE)].rstrip()
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


def _add(pieces: list[tuple[str, str]], kind: str, text: str) -> None:
    if text:
        pieces.append((kind, text))


def _partial_suffix(buffer: str, tag: str) -> int:
    """The length of the longest end of ``buffer`` that starts ``tag``."""
    for length in range(min(len(tag) - 1, len(buffer)), 0, -1):
        if buffer.endswith(tag[:length]):
            return length
    return 0
