"""A chat conversation on the engine: turns, fitting them into the context, logging, and the commands' effects.

No terminal I/O here (that is ``cli/chat.py``): this module holds the state and what each
slash command does to it, so it reads like the REPL's rules.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from llmrun.engine import Engine, Generation, GenerationRequest, GenerationResult, SamplingParams
from llmrun.errors import UsageError
from llmrun.logs import Exchange, LogStore
from llmrun.reasoning import CONTENT, REASONING, Splitter, reasoning_format

# Room kept for the answer when deciding whether old turns must go.
ANSWER_RESERVE_TOKENS = 512

SETTABLE = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repeat_penalty": float,
    "seed": int,
    "max_tokens": int,
}


@dataclass
class Turn:
    user: str
    assistant: str


@dataclass
class PendingReply:
    """An answer being generated: iterate ``pieces()``, then ``ChatSession.finish`` it."""

    user_text: str
    generation: Generation
    dropped_turns: int
    splitter: Splitter | None = None  # a reasoning model's: its thinking apart from its answer
    answer: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)

    def pieces(self) -> Iterator[tuple[str, str]]:
        """``(kind, text)`` as the answer streams, kind ``reasoning`` or ``content``."""
        for piece in self.generation:
            yield from self._keep(self.splitter.feed(piece) if self.splitter else [(CONTENT, piece)])
        if self.splitter is not None:
            yield from self._keep(self.splitter.finish())

    def _keep(self, pieces: list[tuple[str, str]]) -> Iterator[tuple[str, str]]:
        for kind, text in pieces:
            (self.thinking if kind == REASONING else self.answer).append(text)
            yield kind, text

    @property
    def text(self) -> str:
        return "".join(self.answer)


@dataclass
class ChatSession:
    engine: Engine
    model_name: str
    sampling: SamplingParams
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    system: str | None = None
    log: LogStore | None = None
    conversation_id: str | None = None
    turns: list[Turn] = field(default_factory=list)
    attachment: str | None = None  # /read: text for the next message
    last_result: GenerationResult | None = None
    last_thinking: str = ""  # a reasoning model's thinking before its last answer (/think shows it)

    # -- the conversation -------------------------------------------------------

    def messages(self, next_user: str | None = None) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for turn in self.turns:
            messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
        if next_user is not None:
            messages.append({"role": "user", "content": next_user})
        return messages

    def context_tokens(self) -> int:
        """Tokens the conversation takes in the context now."""
        return len(self.engine.chat_prompt(self.messages())) if (self.turns or self.system) else 0

    def _reserve(self) -> int:
        capacity = self.engine.seq_capacity
        return min(self.max_tokens or ANSWER_RESERVE_TOKENS, capacity // 4)

    def _fit(self, user_text: str) -> tuple[list[int], int]:
        """The prompt for the next message; the oldest turns (never the system prompt) go until it fits."""
        dropped = 0
        limit = self.engine.seq_capacity - self._reserve()
        while True:
            prompt = self.engine.chat_prompt(self.messages(user_text))
            if len(prompt) <= limit or not self.turns:
                break
            self.turns.pop(0)
            dropped += 1
        return prompt, dropped  # still too long even alone: Engine.generate refuses it (PromptTooLong)

    def start(self, text: str) -> PendingReply:
        """Begin answering ``text`` (with any /read attachment)."""
        if self.attachment:
            text = f"{self.attachment}\n\n{text}"
            self.attachment = None
        prompt, dropped = self._fit(text)
        request = GenerationRequest(tuple(prompt), self.sampling, self.max_tokens, self.stop)
        splitter = None
        if (fmt := reasoning_format(self.engine.model.chat_template)) is not None:
            splitter = fmt.splitter(fmt.opened_in_prompt(self.engine.chat_text(self.messages(text)).text))
        return PendingReply(text, self.engine.generate(request), dropped, splitter)

    def finish(self, reply: PendingReply) -> GenerationResult:
        """Keep the answer (complete, or what was generated before Ctrl-C) and log the exchange."""
        result = replace(reply.generation.result, text=reply.text)  # the answer, without the thinking
        self.turns.append(Turn(reply.user_text, result.text))
        self.last_result = result
        self.last_thinking = "".join(reply.thinking)
        if self.log is not None:
            if self.conversation_id is None:
                self.conversation_id = self.log.new_conversation(self.model_name)
            exchange = Exchange.of(
                self.model_name, reply.user_text, self.system, self.sampling, self.max_tokens, result
            )
            self.log.log(self.conversation_id, exchange)
        return result

    # -- what the slash commands do ---------------------------------------------

    def undo(self) -> Turn:
        if not self.turns:
            raise UsageError("there is nothing to undo")
        if self.log is not None and self.conversation_id is not None:
            self.log.undo_last(self.conversation_id)
        return self.turns.pop()

    def regen(self) -> PendingReply:
        return self.start(self.undo().user)

    def clear(self) -> None:
        """Forget the conversation; the next message starts a new one in the log."""
        self.turns.clear()
        self.conversation_id = None

    def set_option(self, key: str, value: str) -> None:
        key = key.replace("-", "_")
        if key not in SETTABLE:
            raise UsageError(f"cannot set {key!r}", f"settable: {', '.join(SETTABLE)}")
        try:
            number = SETTABLE[key](value)
        except ValueError:
            raise UsageError(f"{key} needs a number, not {value!r}") from None
        if key == "max_tokens":
            self.max_tokens = int(number) if number > 0 else None
        else:
            self.sampling = replace(self.sampling, **{key: number})

    def read_file(self, path: Path) -> int:
        """Attach a file's text to the next message; returns its length in characters."""
        try:
            text = path.expanduser().read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            raise UsageError(f"cannot read {path}: {error.strerror}") from None
        self.attachment = f"File {path.name}:\n```\n{text.rstrip()}\n```"
        return len(text)

    def save(self, name: str) -> None:
        if self.log is None:
            raise UsageError("the log is off (--no-log), so conversations cannot be saved")
        if self.conversation_id is None:
            raise UsageError("nothing to save yet: say something first")
        self.log.name_conversation(self.conversation_id, name)

    def load(self, id_or_name: str) -> int:
        """Continue a logged conversation; returns how many turns it has."""
        if self.log is None:
            raise UsageError("the log is off (--no-log), so conversations cannot be loaded")
        conversation_id = self.log.find_conversation(id_or_name)
        responses = self.log.responses(conversation_id=conversation_id, include_undone=False)
        self.turns = [Turn(logged.exchange.prompt, logged.exchange.response) for logged in responses]
        self.system = responses[-1].exchange.system if responses else self.system
        self.conversation_id = conversation_id
        return len(self.turns)

    def switch_engine(self, engine: Engine, model_name: str) -> None:
        self.engine.close()
        self.engine = engine
        self.model_name = model_name
