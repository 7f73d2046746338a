"""A chat conversation: turns, fitting them into the context, logging, and the commands' effects.

No terminal I/O here (that is ``cli/chat.py``): this module holds the state and what each
slash command does to it, so it reads like the REPL's rules. The model answering is a
``ChatModel``: one loaded here (``EngineChat``), or one on a server (``ServerChat``, for
``chat --server``); the conversation does not know which.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llmrun.errors import PromptTooLong, UsageError
from llmrun.generation import GenerationResult, SamplingParams
from llmrun.logs import Exchange, LogStore
from llmrun.reasoning import CONTENT, REASONING

if TYPE_CHECKING:
    from llmrun.client import ServerClient
    from llmrun.engine import Engine

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


class Reply(Protocol):
    """An answer as it streams: ``(kind, text)`` pieces (kind ``reasoning`` or ``content``), then its result."""

    def __iter__(self) -> Iterator[tuple[str, str]]: ...

    @property
    def result(self) -> GenerationResult: ...


class ChatModel(Protocol):
    """The model a conversation talks to."""

    name: str

    @property
    def capacity(self) -> int | None:
        """Tokens of context one conversation may use, where known."""

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        """Tokens the conversation takes, where it can be known before sending it (None: on a server)."""

    def reply(
        self, messages: list[dict[str, str]], sampling: SamplingParams, max_tokens: int | None, stop: tuple[str, ...]
    ) -> Reply:
        """Start answering; a conversation too long for the context raises PromptTooLong here."""

    def close(self) -> None: ...


@dataclass
class PendingReply:
    """An answer being generated: iterate ``pieces()``, then ``ChatSession.finish`` it."""

    user_text: str
    generation: Reply
    dropped_turns: int
    answer: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)

    def pieces(self) -> Iterator[tuple[str, str]]:
        """``(kind, text)`` as the answer streams, kind ``reasoning`` or ``content``."""
        for kind, text in self.generation:
            (self.thinking if kind == REASONING else self.answer).append(text)
            yield kind, text

    @property
    def text(self) -> str:
        return "".join(self.answer)


@dataclass
class ChatSession:
    model: ChatModel
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

    @property
    def model_name(self) -> str:
        return self.model.name

    def context_tokens(self) -> int | None:
        """Tokens the conversation takes in the context now (None where only the server knows)."""
        if not (self.turns or self.system):
            return 0
        counted = self.model.count_tokens(self.messages())
        if counted is None and self.last_result is not None:  # the last exchange, as the server counted it
            return self.last_result.prompt_tokens + self.last_result.completion_tokens
        return counted

    def _fits(self, user_text: str) -> bool:
        """Whether the next message leaves the answer its room (always, where tokens cannot be counted here)."""
        counted = self.model.count_tokens(self.messages(user_text))
        capacity = self.model.capacity if counted is not None else None
        if counted is None or capacity is None:
            return True
        return counted <= capacity - min(self.max_tokens or ANSWER_RESERVE_TOKENS, capacity // 4)

    def start(self, text: str) -> PendingReply:
        """Begin answering ``text`` (with any /read attachment); the oldest turns (never the system prompt) go
        until the conversation fits the context."""
        if self.attachment:
            text = f"{self.attachment}\n\n{text}"
            self.attachment = None
        dropped = 0
        while self.turns and not self._fits(text):
            self.turns.pop(0)
            dropped += 1
        while True:
            try:
                reply = self.model.reply(self.messages(text), self.sampling, self.max_tokens, self.stop)
            except PromptTooLong:  # a server's verdict: it counts the tokens
                if not self.turns:
                    raise
                self.turns.pop(0)
                dropped += 1
                continue
            return PendingReply(text, reply, dropped)

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

    def switch_model(self, model: ChatModel) -> None:
        self.model.close()
        self.model = model


class EngineChat:
    """A conversation's model loaded here: prompts rendered by its chat template, thinking split from the answer."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.name = name
        self._rendered: tuple[str, str, list[int]] = ("", "", [])  # the last conversation rendered: its text, tokens

    @property
    def capacity(self) -> int | None:
        return int(self.engine.seq_capacity)

    def _render(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        """The conversation as the template renders it, and its tokens (fitting it and answering it render once)."""
        key = json.dumps(messages)
        if self._rendered[0] != key:
            chat = self.engine.chat_text(messages)
            self._rendered = (key, chat.text, self.engine.chat_tokens(chat))
        return self._rendered[1], self._rendered[2]

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        return len(self._render(messages)[1])

    def reply(
        self, messages: list[dict[str, str]], sampling: SamplingParams, max_tokens: int | None, stop: tuple[str, ...]
    ) -> Reply:
        from llmrun.engine import GenerationRequest
        from llmrun.reasoning import reasoning_format

        text, tokens = self._render(messages)
        request = GenerationRequest(tuple(tokens), sampling, max_tokens, stop)
        fmt = reasoning_format(self.engine.model.chat_template)
        splitter = fmt.splitter(fmt.opened_in_prompt(text)) if fmt is not None else None
        return _EngineReply(self.engine.generate(request), splitter)

    def close(self) -> None:
        self.engine.close()


class _EngineReply:
    def __init__(self, generation: Any, splitter: Any) -> None:
        self.generation = generation
        self.splitter = splitter

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for piece in self.generation:
            yield from self.splitter.feed(piece) if self.splitter else [(CONTENT, piece)]
        if self.splitter is not None:
            yield from self.splitter.finish()

    @property
    def result(self) -> GenerationResult:
        result: GenerationResult = self.generation.result
        return result


class ServerChat:
    """A conversation's model on a server (``chat --server``): the server renders, splits and counts."""

    def __init__(self, client: ServerClient, name: str) -> None:
        self.client = client
        self.name = name  # as asked for; the server's own name for it once it has answered

    @property
    def capacity(self) -> int | None:
        return self.client.context_length(self.name)

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        return None

    def reply(
        self, messages: list[dict[str, str]], sampling: SamplingParams, max_tokens: int | None, stop: tuple[str, ...]
    ) -> Reply:
        from llmrun.client import Ask

        return _ServerReply(self, self.client.ask(Ask(self.name, messages, sampling, max_tokens, stop)))

    def close(self) -> None:
        """Nothing to release: each request has a connection of its own."""


class _ServerReply:
    """A server's answer; once it is complete, the chat takes the server's name for the model, as `run --server`
    logs it (``smollm2`` for ``smollm2:latest``)."""

    def __init__(self, chat: ServerChat, generation: Any) -> None:
        self.chat = chat
        self.generation = generation

    def __iter__(self) -> Iterator[tuple[str, str]]:
        yield from self.generation
        self.chat.name = self.generation.model_name

    @property
    def result(self) -> GenerationResult:
        result: GenerationResult = self.generation.result
        return result
