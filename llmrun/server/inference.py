"""The one inference path under every API: an internal request in, a stream of events out.

``openai.py``, ``ollama.py`` (and later APIs) translate their wire format into an
``InferenceRequest`` and the ``Event`` stream back; nothing here knows which API a
request came from. The asyncio side never calls llama.cpp: prompts are rendered and
tokenized on a worker thread of the pool, and tokens come back from the model's engine
thread through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from llmrun.errors import LlmrunError, UsageError
from llmrun.generation import TokenLogprob
from llmrun.reasoning import CONTENT, REASONING, ReasoningFormat, Splitter, reasoning_format
from llmrun.tools import ArgumentsPiece, CallStart, ContentPiece, Tool, ToolCall, ToolCallParser, ToolChoice, ToolPlan

if TYPE_CHECKING:
    from llmrun.engine import Engine, SamplingParams
    from llmrun.engine.worker import SequenceUpdate, Ticket
    from llmrun.server.pool import LoadedModel, ModelPool


@dataclass(frozen=True)
class InferenceRequest:
    """What every API asks of a model: a conversation or a raw prompt, and how to generate."""

    model: str
    messages: list[dict[str, Any]] | None = None  # a chat, rendered by the model's template
    prefill: str = ""  # the start of the assistant's answer, which the model continues (Anthropic's prefill)
    prompt: str | None = None  # plain completion text (no template)
    sampling: SamplingParams | None = None  # None: llmrun's defaults
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1  # independent answers (OpenAI's ``n``), each its own sequence
    logprobs: int | None = None  # see GenerationRequest.logprobs
    ignore_eos: bool = False
    json_schema: dict[str, Any] | None = None  # constrain output to JSON matching this schema
    json_any: bool = False  # constrain output to some JSON object
    keep_alive_s: float | None = None  # None: the server's default
    tools: tuple[Tool, ...] = ()  # functions the model may call (chat only)
    tool_choice: ToolChoice = ToolChoice()
    parallel_tool_calls: bool = True
    think: bool | None = None  # a reasoning model thinks first (its template's enable_thinking); None: its default
    effort: str | None = None  # low, medium, high: how hard it thinks, where its template takes a reasoning_effort
    route: str = ""  # for metrics and the log
    log: bool = True  # False: the client logs this exchange itself, in this same log (see client.LOG_HEADER)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    drafted_tokens: int = 0  # speculative decoding: guessed tokens verified
    accepted_tokens: int = 0  # and found right

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def evaluated_prompt_tokens(self) -> int:
        """Prompt tokens computed for this answer (the rest were found in the KV cache)."""
        return max(0, self.prompt_tokens - self.cached_tokens)


@dataclass(frozen=True)
class TextDelta:
    """New text of answer ``index``."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class ReasoningDelta:
    """New thinking of answer ``index`` (a reasoning model's, before its answer)."""

    index: int
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """Part of tool call ``call_index`` of answer ``index``: its id and name first, then its arguments in pieces."""

    index: int
    call_index: int
    id: str | None
    name: str | None
    arguments: str  # a piece of the arguments object's JSON text


@dataclass(frozen=True)
class Finished:
    """Answer ``index`` is complete."""

    index: int
    finish_reason: str  # stop, length, tool_calls, cancelled, error
    text: str  # the whole answer text (without tool calls)
    usage: Usage
    time_to_first_token_s: float
    generation_s: float
    total_s: float
    error: LlmrunError | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    stop_sequence: str | None = None  # the stop string that ended the answer, if one did
    reasoning: str = ""  # a reasoning model's thinking, apart from ``text``

    @property
    def prompt_tokens_per_s(self) -> float:
        evaluated = self.usage.evaluated_prompt_tokens
        return evaluated / self.time_to_first_token_s if self.time_to_first_token_s > 0 else 0.0

    @property
    def generation_tokens_per_s(self) -> float:
        """Decode speed, as GenerationResult's: each token after the first costs one decode."""
        decodes = self.usage.completion_tokens - 1
        return decodes / self.generation_s if decodes > 0 and self.generation_s > 0 else 0.0


Event = TextDelta | ReasoningDelta | ToolCallDelta | Finished


@dataclass(frozen=True)
class Prepared:
    """A request turned into tokens for a loaded model."""

    prompt_tokens: tuple[int, ...]
    grammar: str | None
    grammar_triggers: tuple[str, ...] = ()
    tools: ToolPlan | None = None  # set when the output is parsed for tool calls
    reasoning: ReasoningFormat | None = None  # a reasoning model's output is split in this format
    reasoning_inside: bool = False  # and starts inside its thinking (the prompt opened it)
    # The start of every answer, at the end of the prompt instead of generated (see ToolPlan.lead): evaluated and
    # counted with the prompt, and streamed first as the answer's own text.
    lead: str = ""


class Stream(Protocol):
    """A started request, wherever it runs (``ModelStream`` here, ``UpstreamStream`` on an upstream engine):
    iterate for events; ``close()`` (or leaving the loop) cancels what is unfinished."""

    request: InferenceRequest
    load_s: float  # loading the model, before the request could start
    prompt_tokens: int  # known before any output where the model runs here; 0 where only the end says
    created: float

    @property
    def model_name(self) -> str: ...

    def __aiter__(self) -> AsyncIterator[Event]: ...

    def close(self) -> None: ...


class ModelStream:
    """A request on a model loaded here."""

    def __init__(self, request: InferenceRequest, pool: ModelPool, model: LoadedModel, load_s: float) -> None:
        self.request = request
        self._pool = pool
        self.model = model
        self.load_s = load_s
        self.created = time.time()
        self._queue: asyncio.Queue[tuple[int, SequenceUpdate]] = asyncio.Queue()
        self._tickets: list[Ticket] = []
        self._open = request.n
        self._released = False
        self._parsers: list[ToolCallParser] = []
        self._splitters: list[Splitter] = []
        self._content: list[list[str]] = [[] for _ in range(request.n)]
        self._reasoning: list[list[str]] = [[] for _ in range(request.n)]
        self.prompt_tokens = 0  # known once the prompt is prepared, before any output
        self._lead = ""

    @property
    def model_name(self) -> str:
        return self.model.name

    def _start(self, prepared: Prepared) -> None:
        from llmrun.engine import GenerationRequest

        request = self.request
        self.prompt_tokens = len(prepared.prompt_tokens)
        self._lead = prepared.lead
        mailbox = _mailbox(asyncio.get_running_loop())
        sampling = request.sampling or _default_sampling()
        for index in range(request.n):
            choice_sampling = sampling
            if prepared.grammar is not None:
                choice_sampling = replace(
                    choice_sampling, grammar=prepared.grammar, grammar_triggers=prepared.grammar_triggers
                )
            if index > 0 and sampling.seed is not None:
                choice_sampling = replace(choice_sampling, seed=sampling.seed + index)
            generation = GenerationRequest(
                prompt_tokens=prepared.prompt_tokens,
                sampling=choice_sampling,
                max_tokens=request.max_tokens,
                stop=request.stop,
                ignore_eos=request.ignore_eos,
                logprobs=request.logprobs,
            )

            def deliver(update: SequenceUpdate, index: int = index) -> None:
                mailbox.post(self._queue, (index, update))

            self._tickets.append(self.model.worker.submit(generation, deliver, mailbox.wake))
        if prepared.tools is not None:
            self._parsers = [ToolCallParser(prepared.tools) for _ in range(request.n)]
        if prepared.reasoning is not None:
            self._splitters = [prepared.reasoning.splitter(prepared.reasoning_inside) for _ in range(request.n)]

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            if self._lead:
                from llmrun.engine.worker import SequenceUpdate

                for index in range(self.request.n):
                    for event in self._events(index, SequenceUpdate(self._lead)):
                        yield event
            while self._open:
                index, update = await self._queue.get()
                for event in self._events(index, update):
                    yield event
        finally:
            self.close()

    def _events(self, index: int, update: SequenceUpdate) -> Iterator[Event]:
        """One choice's update as events: its text split into thinking, answer and calls, and at the end how it
        finished."""
        content = update.text
        if self._splitters:
            split = self._splitters[index].feed(update.text) if update.text else []
            if update.result is not None:
                split += self._splitters[index].finish()
            thought = "".join(text for kind, text in split if kind == REASONING)
            content = "".join(text for kind, text in split if kind == CONTENT)
            self._content[index].append(content)
            if thought:
                self._reasoning[index].append(thought)
                yield ReasoningDelta(index, thought)
        parser = self._parsers[index] if self._parsers else None
        if parser is None:
            if content or update.logprobs:
                yield TextDelta(index, content, update.logprobs)
        else:
            pieces = parser.feed(content) if content else []
            if update.result is not None:
                pieces += parser.finish()
            yield from _tool_events(index, pieces, update.logprobs)
        if update.result is None:
            return
        self._open -= 1
        result = update.result
        calls: tuple[ToolCall, ...] = ()
        text, reason = result.text, result.finish_reason
        if self._splitters:
            text = "".join(self._content[index])
        if parser is not None:
            text, calls = parser.final_content(), tuple(parser.tool_calls)
            if calls and reason == "stop":
                reason = "tool_calls"
        usage = Usage(
            result.prompt_tokens, result.completion_tokens, result.cached_tokens, result.drafted_tokens,
            result.accepted_tokens,
        )  # fmt: skip
        finished = Finished(
            index=index,
            finish_reason=reason,
            text=text,
            usage=usage,
            time_to_first_token_s=result.time_to_first_token_s,
            generation_s=result.generation_s,
            total_s=result.total_s,
            error=update.error,
            tool_calls=calls,
            stop_sequence=result.stop_sequence,
            reasoning="".join(self._reasoning[index]),
        )
        self._pool.finished(self.request, self.model.name, finished)
        yield finished

    def close(self) -> None:
        """Cancel unfinished answers and give the model back to the pool (once)."""
        if self._released:
            return
        self._released = True
        if self._open:
            for ticket in self._tickets:
                ticket.cancel()
        self._pool.release(self.model, self.request.keep_alive_s, weight=self.request.n)


def _tool_events(index: int, pieces: list[Any], logprobs: list[TokenLogprob]) -> list[Event]:
    """A tool parser's pieces as stream events (token log-probabilities ride on the first text)."""
    events: list[Event] = []
    for piece in pieces:
        if isinstance(piece, ContentPiece):
            events.append(TextDelta(index, piece.text, logprobs))
            logprobs = []
        elif isinstance(piece, CallStart):
            events.append(ToolCallDelta(index, piece.index, piece.id, piece.name, ""))
        elif isinstance(piece, ArgumentsPiece):
            events.append(ToolCallDelta(index, piece.index, None, None, piece.text))
    if logprobs:
        events.append(TextDelta(index, "", logprobs))
    return events


class _Mailbox:
    """Hands updates from engine threads to the event loop: one wake-up for all that arrive together.

    An engine step yields text for every running sequence; the engine's thread posts them all,
    then wakes the loop once. A wake-up per sequence would cost a system call each, and the woken
    loop would take the interpreter from the engine's thread between two posts, for as long as
    it takes to send what it got (measured: 4 streams 3-5% slower).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []
        self._waking = False  # a flush is on its way

    def post(self, queue: asyncio.Queue[Any], item: Any) -> None:
        """From any thread: put ``item`` on ``queue`` at the next ``wake()``."""
        with self._lock:
            self._items.append((queue, item))

    def wake(self) -> None:
        """From any thread: deliver what was posted, soon."""
        with self._lock:
            if self._waking or not self._items:
                return
            self._waking = True
        try:
            self._loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            with self._lock:
                self._items.clear()
                self._waking = False
            raise

    def _flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._waking = False
        for queue, item in items:
            queue.put_nowait(item)


_MAILBOXES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    mailbox = _MAILBOXES.get(loop)
    if mailbox is None:
        mailbox = _MAILBOXES[loop] = _Mailbox(loop)
    return mailbox


def _default_sampling() -> SamplingParams:
    from llmrun.engine import SamplingParams

    return SamplingParams()


def prepare(engine: Engine, request: InferenceRequest) -> Prepared:
    """Render and tokenize the prompt, build the grammar, check the context (on a thread, not the event loop)."""
    from llmrun.engine.sampling import check_grammar, json_schema_grammar
    from llmrun.engine.template import template_supports_tools
    from llmrun.tools import check_tool_results, plan, prompt_messages

    tool_plan = None
    reasoning: ReasoningFormat | None = None
    inside = False
    if request.messages is not None:
        check_tool_results(request.messages)
        template = engine.model.chat_template
        if request.tools:
            supports = bool(template) and template_supports_tools(template or "")
            # No lead where the answer has a start of its own (a prefill) or every token's log-probability is asked.
            may_lead = not request.prefill and request.logprobs is None
            tool_plan = plan(
                list(request.tools), request.tool_choice, request.parallel_tool_calls, template, supports, may_lead
            )
            if tool_plan.constrained and (request.json_schema is not None or request.json_any):
                raise UsageError("tools and a JSON response format cannot be combined", "send one of them")
        messages = prompt_messages(request.messages, tool_plan, request.tool_choice)
        template_tools = None
        if tool_plan is not None and tool_plan.template_tools and tool_plan.constrained:
            template_tools = [tool.as_template_tool() for tool in tool_plan.tools]
        # A grammar that holds from the first token (a forced call, a JSON answer) leaves no room to think.
        forced = request.json_schema is not None or request.json_any
        forced = forced or (tool_plan is not None and tool_plan.grammar is not None and not tool_plan.triggers)
        fmt = reasoning_format(template)
        think = False if forced and fmt is not None else request.think
        extra = fmt.template_options(think, request.effort) if fmt is not None else {}
        chat = engine.chat_text(messages, tools=template_tools, **extra)
        tokens = engine.chat_tokens(chat)
        if request.prefill:
            tokens += engine.model.tokenize(request.prefill, add_special=False, parse_special=False)
        if tool_plan is not None and tool_plan.lead:
            tokens += engine.model.tokenize(tool_plan.lead, add_special=False, parse_special=True)
        if fmt is not None and (fmt.harmony or not forced):  # harmony's calls are read through its splitter too
            reasoning, inside = fmt, fmt.opened_in_prompt(chat.text + request.prefill)
    elif request.prompt is not None:
        tokens = engine.raw_prompt(request.prompt)
    else:
        raise UsageError("the request has neither messages nor a prompt", "send one of them")
    engine.check_fits(tokens)
    if request.max_tokens is not None and request.max_tokens < 1:
        raise UsageError(f"max tokens must be at least 1, not {request.max_tokens}", "leave it out for no limit")
    if tool_plan is not None and tool_plan.grammar is not None:
        check_grammar(engine.model.vocab, tool_plan.grammar, tool_plan.triggers)
        return Prepared(tuple(tokens), tool_plan.grammar, tool_plan.triggers, tool_plan, reasoning, inside,
                        tool_plan.lead)  # fmt: skip
    grammar = None
    if request.json_schema is not None or request.json_any:
        grammar = json_schema_grammar(request.json_schema)
        check_grammar(engine.model.vocab, grammar)
    return Prepared(tuple(tokens), grammar, reasoning=reasoning, reasoning_inside=inside)


async def start(pool: ModelPool, request: InferenceRequest) -> Stream:
    """Load the model if need be, prepare the prompt and queue the request (or send it to the upstream engine that
    serves the model): errors come out here, before any output."""
    if request.n < 1:
        raise UsageError(f"n must be at least 1, not {request.n}", "ask for 1 or more answers")
    upstream = pool.upstream_for(request.model)
    if upstream is not None:
        return await upstream.start_stream(pool, request)
    began = time.perf_counter()
    model = await pool.acquire(request.model, extra=request.n - 1)
    load_s = time.perf_counter() - began
    try:
        prepared = await asyncio.to_thread(prepare, model.engine, request)
    except BaseException:
        pool.release(model, request.keep_alive_s, weight=request.n)
        raise
    stream = ModelStream(request, pool, model, load_s)
    stream._start(prepared)
    return stream


async def final_answer(stream: Stream) -> Finished:
    """A one-answer stream's answer when it is complete (its error raised); the stream is closed."""
    try:
        async for event in stream:
            if isinstance(event, Finished):
                if event.error is not None:
                    raise event.error
                return event
    finally:
        stream.close()
    raise LlmrunError("the answer ended without finishing", "try again")


async def count_tokens(pool: ModelPool, request: InferenceRequest) -> int:
    """The prompt tokens ``request`` would take (its template, tools and all), without generating."""
    if (upstream := pool.upstream_for(request.model)) is not None:
        raise UsageError(
            f"{request.model} runs on upstream {upstream.name}, which cannot count tokens without generating",
            "count them with the upstream's own tokenizer",
        )
    model = await pool.acquire(request.model)
    try:
        prepared = await asyncio.to_thread(prepare, model.engine, request)
    finally:
        pool.release(model, request.keep_alive_s)
    return len(prepared.prompt_tokens)


async def embed(pool: ModelPool, model_name: str, inputs: list[str] | list[list[int]]) -> tuple[list[list[float]], int]:
    """Embeddings of each input (text, or token ids), and the number of tokens they took."""
    if (upstream := pool.upstream_for(model_name)) is not None:
        return await upstream.embed(model_name, inputs)
    model = await pool.acquire(model_name)
    try:

        def tokenize(engine: Engine) -> list[list[int]]:
            return [
                engine.model.tokenize(item, add_special=True, parse_special=False) if isinstance(item, str) else item
                for item in inputs
            ]

        token_lists = await asyncio.to_thread(tokenize, model.engine)
        for tokens in token_lists:
            if any(not 0 <= token < model.engine.model.n_vocab for token in tokens):
                raise UsageError("an input holds a token id outside the vocabulary", "send text or valid token ids")
        vectors = await asyncio.wrap_future(model.worker.call(lambda engine: engine.embed(token_lists)))
        return vectors, sum(len(tokens) for tokens in token_lists)
    finally:
        pool.release(model, None)
