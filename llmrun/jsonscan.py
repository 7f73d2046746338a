"""Following a JSON document as it streams in, one piece at a time.

A tool call's arguments are streamed to clients while the model is still writing them,
so the parser must know, after every token, which value it is inside and where that
value began, without waiting for the document to be complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

Path = tuple[str | int, ...]

_WHITESPACE = " \t\r\n"
_SCALAR_END = _WHITESPACE + ",]}"


@dataclass
class _Frame:
    kind: str  # "{" or "["
    path: Path
    start: int
    state: str  # object: key, colon, value, comma; array: value, comma
    key: str | int | None = None
    count: int = 0


@dataclass
class OpenValue:
    """A value that has begun and not ended: its path and where it starts in the text fed."""

    path: Path
    start: int


@dataclass
class JsonScanner:
    """Scans a JSON value fed in pieces; records where each value at a path starts and ends.

    ``values`` maps a path (keys and array indices from the top) to the ``(start, end)``
    offsets of every complete value; ``open_values()`` lists those begun and not ended.
    ``error`` is set when the text cannot be JSON; ``done`` once the top value is complete,
    and ``end`` is then the offset just past it (what follows is not consumed).
    """

    text: str = ""
    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    error: str | None = None
    done: bool = False
    end: int = -1
    _position: int = 0
    _stack: list[_Frame] = field(default_factory=list)
    _started: bool = False
    _string_start: int = -1  # offset of the opening quote of the string being read, or -1
    _string_is_key: bool = False
    _escape: bool = False
    _scalar_start: int = -1  # offset of the number or literal being read, or -1
    _scalar_path: Path = ()

    def feed(self, piece: str) -> None:
        self.text += piece
        text = self.text
        while self._position < len(text) and not self.done and self.error is None:
            self._step(text[self._position])
            self._position += 1

    def open_values(self) -> list[OpenValue]:
        opened = [OpenValue(frame.path, frame.start) for frame in self._stack]
        if self._string_start >= 0 and not self._string_is_key:
            opened.append(OpenValue(self._value_path(), self._string_start))
        if self._scalar_start >= 0:
            opened.append(OpenValue(self._scalar_path, self._scalar_start))
        return opened

    def _value_path(self) -> Path:
        if not self._stack:
            return ()
        frame = self._stack[-1]
        assert frame.key is not None
        return (*frame.path, frame.key)

    def _step(self, char: str) -> None:
        position = self._position
        if self._string_start >= 0:
            if self._escape:
                self._escape = False
            elif char == "\\":
                self._escape = True
            elif char == '"':
                start, self._string_start = self._string_start, -1
                if self._string_is_key:
                    frame = self._stack[-1]
                    frame.key = json.loads(self.text[start : position + 1])
                    frame.state = "colon"
                else:
                    self._close_value(self._value_path(), start, position + 1)
            elif char < " ":
                self.error = "a control character inside a string"
            return
        if self._scalar_start >= 0:
            if char not in _SCALAR_END:
                return
            start, self._scalar_start = self._scalar_start, -1
            if not _is_scalar(self.text[start:position]):
                self.error = f"{self.text[start:position]!r} is not a JSON value"
                return
            self._close_value(self._scalar_path, start, position)
            if self.done:
                return
        if char in _WHITESPACE:
            return
        if not self._stack:
            if self._started:
                self.error = "more than one value"
                return
            self._started = True
            self._begin_value((), char, position)
            return
        frame = self._stack[-1]
        if frame.kind == "{":
            if frame.state == "key" and char == '"':
                self._string_start, self._string_is_key = position, True
            elif frame.state in ("key", "comma") and char == "}" and (frame.state == "comma" or frame.count == 0):
                self._end_container(position)
            elif frame.state == "comma" and char == ",":
                frame.state = "key"
            elif frame.state == "colon" and char == ":":
                frame.state = "value"
            elif frame.state == "value":
                frame.state = "comma"
                frame.count += 1
                assert frame.key is not None
                self._begin_value((*frame.path, frame.key), char, position)
            else:
                self.error = f"unexpected {char!r} in an object"
        else:
            if frame.state == "value" and char == "]" and frame.count == 0:
                self._end_container(position)
            elif frame.state == "value":
                frame.key = frame.count
                frame.count += 1
                frame.state = "comma"
                self._begin_value((*frame.path, frame.count - 1), char, position)
            elif frame.state == "comma" and char == ",":
                frame.state = "value"
            elif frame.state == "comma" and char == "]":
                self._end_container(position)
            else:
                self.error = f"unexpected {char!r} in an array"

    def _begin_value(self, path: Path, char: str, position: int) -> None:
        if char == "{":
            self._stack.append(_Frame("{", path, position, "key"))
        elif char == "[":
            self._stack.append(_Frame("[", path, position, "value"))
        elif char == '"':
            self._string_start, self._string_is_key = position, False
            if self._stack:
                self._stack[-1].key = path[-1]
        elif char in "-0123456789tfn":
            self._scalar_start, self._scalar_path = position, path
        else:
            self.error = f"unexpected {char!r} where a value should start"

    def _end_container(self, position: int) -> None:
        frame = self._stack.pop()
        self._close_value(frame.path, frame.start, position + 1)

    def _close_value(self, path: Path, start: int, end: int) -> None:
        self.values[path] = (start, end)
        if not self._stack:
            self.done, self.end = True, end

    def finish(self) -> None:
        """The text is complete: a number at the very end is a whole value."""
        if self._scalar_start >= 0 and not self._stack and self.error is None:
            start, self._scalar_start = self._scalar_start, -1
            if _is_scalar(self.text[start:]):
                self._close_value(self._scalar_path, start, len(self.text))
            else:
                self.error = "not a JSON value"


def _is_scalar(text: str) -> bool:
    if text in ("true", "false", "null"):
        return True
    try:
        return isinstance(json.loads(text), (int, float))
    except ValueError:
        return False
