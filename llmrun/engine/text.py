"""Turning generated tokens into text: UTF-8 across token boundaries, and stop strings across tokens."""

from __future__ import annotations

import codecs


class Utf8Stream:
    """Decodes token byte pieces into text, holding back a multi-byte character split between tokens."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:
        return self._decoder.decode(piece)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds stop strings in streamed text, even when one spans several tokens.

    Text that might be the start of a stop string is held back until it is known
    not to be, so a stop string never reaches the output.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(stop for stop in stops if stop)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        """Returns the text that is safe to emit; sets ``stopped`` when a stop string appears."""
        if not self.stops:
            return text
        buffer = self._held + text
        found = [(index, stop) for stop in self.stops if (index := buffer.find(stop)) >= 0]
        if found:
            first_stop, self.matched = min(found)
            self._held = ""
            self.stopped = True
            return buffer[:first_stop]
        keep = self._partial_suffix_len(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """The held-back text, at the end of generation when no stop string completed."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix_len(self, buffer: str) -> int:
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:length]):
                    longest = length
                    break
        return longest
