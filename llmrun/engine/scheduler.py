"""Sequences and the decode loop: every request is one sequence among N slots of one context.

``run`` drives one sequence; ``serve`` will drive many through the same ``step()``,
which puts the next token of every running sequence and the next prompt chunk of
every new one into a single ``llama_decode`` call.
"""

from __future__ import annotations

import ctypes
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from llmrun.engine.model import Model
from llmrun.engine.native import llama_cpp
from llmrun.engine.sampling import SamplerChain
from llmrun.engine.speculation import (
    MAX_ROWS,
    DecodeCosts,
    Likelihood,
    Lookup,
    SpeculationOptions,
    best_draft_length,
)
from llmrun.engine.text import StopMatcher, Utf8Stream
from llmrun.errors import LlmrunError
from llmrun.generation import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from llmrun.engine.draft import DraftGuesser, DraftModel


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: prompt tokens, how to sample, when to stop."""

    prompt_tokens: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the chosen token's; N: also the N likeliest alternatives


class SequenceStatus(Enum):
    WAITING = "waiting"  # queued, no slot yet
    PREFILL = "prefill"  # prompt being evaluated, chunk by chunk
    DECODING = "decoding"  # one token per step
    FINISHED = "finished"


class FinishReason(str, Enum):
    STOP = "stop"  # end-of-generation token or a stop string
    LENGTH = "length"  # max_tokens reached, or the context is full
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass
class Timings:
    """Wall-clock marks of one sequence (``time.perf_counter`` seconds)."""

    created: float = 0.0
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


@dataclass(eq=False)  # identity: a sequence is itself, however alike two may be
class Sequence:
    """One request's state inside the scheduler."""

    request: GenerationRequest
    sampler: SamplerChain
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int = -1
    n_past: int = 0  # tokens of this sequence already in the KV cache
    n_cached: int = 0  # of those, prompt tokens found already there from the slot's previous sequence
    next_token: int | None = None  # sampled, not yet decoded
    completion_tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    context_full: bool = False
    error: LlmrunError | None = None
    timings: Timings = field(default_factory=Timings)
    utf8: Utf8Stream = field(default_factory=Utf8Stream)
    stop_matcher: StopMatcher = field(default_factory=lambda: StopMatcher(()))
    pending_text: deque[str] = field(default_factory=deque)
    text_parts: list[str] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    # A prompt prefix being evaluated in another slot right now: wait for it and copy its KV cells.
    prefix_source: Sequence | None = None
    prefix_len: int = 0
    guesser: Lookup | DraftGuesser | None = None  # with speculative decoding
    draft: list[int] = field(default_factory=list)  # guessed tokens after next_token, in this step's decode

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_tokens)

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def drain_text(self) -> list[str]:
        """Text produced since the last call."""
        parts = list(self.pending_text)
        self.pending_text.clear()
        return parts

    def drain_logprobs(self) -> list[TokenLogprob]:
        """Log-probabilities of the tokens sampled since the last call (when the request asked for them)."""
        entries, self.pending_logprobs = self.pending_logprobs, []
        return entries

    def _emit(self, text: str) -> None:
        if text:
            self.pending_text.append(text)
            self.text_parts.append(text)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


# Copying fewer cells than this is not worth a wait or the bookkeeping.
MIN_COPY_TOKENS = 16
# A slot's cache is kept in host memory when it is about to lose at least this many tokens (see HostCache).
MIN_SAVE_TOKENS = 64
# An answer is moved to close a gap between busy slots only when it may run for at least this many more tokens.
MIN_MOVE_TOKENS = 16
# A prompt chunk holds at least this many tokens, so its tokens are computed as any prompt's are;
# a lone token takes llama.cpp's one-token path, which rounds differently (see Scheduler.step).
MIN_CHUNK_TOKENS = 2


def _reusable(prompt_len: int) -> int:
    """How many of a prompt's tokens may come from the cache: all but the last chunk's."""
    return max(0, prompt_len - MIN_CHUNK_TOKENS)


def _common_prefix(cached: list[int] | tuple[int, ...], prompt: tuple[int, ...]) -> int:
    length = 0
    for cached_token, prompt_token in zip(cached, prompt, strict=False):
        if cached_token != prompt_token:
            break
        length += 1
    return length


class HostCache:
    """Slots' KV caches saved in host memory when a new request takes their slot, up to ``budget`` bytes.

    A later prompt that starts like a saved one (a conversation's next turn, after its slot
    went to another) gets it back into a slot in a copy, instead of evaluating it again: as
    llama-server's ``--cache-ram``. The least recently used entries go first.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.entries: OrderedDict[tuple[int, ...], ctypes.Array[ctypes.c_uint8]] = OrderedDict()

    def best(self, prompt: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
        """The saved tokens sharing the longest prefix with ``prompt``, and that length."""
        best: tuple[tuple[int, ...], int] = ((), 0)
        for tokens in self.entries:
            shared = _common_prefix(tokens, prompt)
            if shared > best[1]:
                best = (tokens, shared)
        return best

    def save(self, ctx: Any, slot: int, tokens: tuple[int, ...]) -> None:
        if any(saved[: len(tokens)] == tokens for saved in self.entries):
            return  # held already, or within a longer entry
        size = int(llama_cpp.llama_state_seq_get_size(ctx, slot))
        if size <= 0 or size > self.budget:
            return
        state = (ctypes.c_uint8 * size)()
        if int(llama_cpp.llama_state_seq_get_data(ctx, state, size, slot)) != size:
            return
        for saved in [saved for saved in self.entries if tokens[: len(saved)] == saved]:
            self._drop(saved)  # a shorter start of the same conversation
        while self.entries and self.used + size > self.budget:
            self._drop(next(iter(self.entries)))
        self.entries[tokens] = state
        self.used += size

    def restore(self, ctx: Any, memory: Any, slot: int, tokens: tuple[int, ...]) -> bool:
        """Put a saved cache into an empty ``slot``; False when llama.cpp refuses it."""
        state = self.entries[tokens]
        self.entries.move_to_end(tokens)
        if int(llama_cpp.llama_state_seq_set_data(ctx, state, len(state), slot)) == 0:
            llama_cpp.llama_memory_seq_rm(memory, slot, -1, -1)
            self._drop(tokens)
            return False
        return True

    def _drop(self, tokens: tuple[int, ...]) -> None:
        self.used -= len(self.entries.pop(tokens))


class Scheduler:
    """Runs sequences over the ``n_slots`` sequence ids of one llama.cpp context."""

    def __init__(
        self,
        model: Model,
        ctx: Any,
        n_slots: int,
        seq_capacity: int,
        n_batch: int,
        n_ubatch: int | None = None,
        unified_kv: bool = False,
        host_cache_bytes: int = 0,
        speculation: SpeculationOptions | None = None,
        drafter: DraftModel | None = None,
        group_prompts: bool = True,
    ) -> None:
        self.model = model
        self.group_prompts = group_prompts  # short prompts of consecutive slots share decodes (_group_short_prompts)
        self.unified_kv = unified_kv
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_slots = n_slots
        self.seq_capacity = seq_capacity
        self.n_batch = n_batch
        # One decode never holds more than llama.cpp computes in one pass (so it never splits a
        # prompt chunk itself, which could leave a lone token); while answers stream, prompts are
        # fed at most this many tokens a step.
        self.n_ubatch = min(n_ubatch or n_batch, n_batch)
        self.prefill_chunk = self.n_ubatch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots = list(range(n_slots - 1, -1, -1))
        # What each slot's KV cache holds (token i at position i): a finished sequence leaves its
        # tokens there, so a next prompt that starts the same way (a conversation's next turn)
        # evaluates only what is new, and other slots can copy those cells instead of evaluating them.
        self.slot_tokens: list[list[int]] = [[] for _ in range(n_slots)]
        self.prefix_hit_tokens = 0  # prompt tokens taken from the cache (own slot or copied), not evaluated
        self.moves = 0  # answers moved to another slot to close a gap (see _close_gap)
        # Slots whose whole KV cache llama.cpp is to copy into another slot at the next decode: until then their
        # cells' data must stay as it is (nothing is restored into them from the host cache).
        self._copy_sources: set[int] = set()
        self._slot_admitted = [0] * n_slots  # when each slot last took a sequence (admission count; 0: never)
        self._admissions = 0
        self.host_cache = HostCache(host_cache_bytes) if host_cache_bytes > 0 else None
        self.speculation = speculation or SpeculationOptions()
        self.drafter = drafter
        self.costs = DecodeCosts()  # what decodes of each size cost here: speculation's price list
        self._costs_measured = not self.speculation.enabled

    def submit(self, request: GenerationRequest) -> Sequence:
        sequence = Sequence(
            request=request,
            sampler=SamplerChain(request.sampling, self.model.n_vocab, self.model.vocab),
            stop_matcher=StopMatcher(request.stop),
        )
        if self.speculation.lookup:
            sequence.guesser = Lookup(list(request.prompt_tokens))
        elif self.drafter is not None:
            from llmrun.engine.draft import DraftGuesser

            sequence.guesser = DraftGuesser(self.drafter, list(request.prompt_tokens), self.costs)
        sequence.timings.created = time.perf_counter()
        self.waiting.append(sequence)
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        if sequence.status is SequenceStatus.WAITING:
            self.waiting.remove(sequence)
        if not sequence.finished:
            self._finish(sequence, FinishReason.CANCELLED)
            self._retire()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def busy_slots(self) -> int:
        return self.n_slots - len(self.free_slots)

    def step(self) -> None:
        """Admit waiting sequences, decode one token of every running answer, feed prompt chunks, retire.

        Each ``llama_decode`` holds either one token of each decoding sequence, or one sequence's
        next token with the tokens guessed after it (speculation), or one chunk of one prompt (at
        least two tokens), never a mix: llama.cpp computes a sequence's lone token in a batch by
        another kernel path than a token among several of its own, so keeping that shape fixed
        gives a sequence the same numbers, and the same greedy answer, whatever else runs beside it.
        """
        self.prepare()
        self._admit()
        self._copy_ready_prefixes()
        self._close_gap()
        for parts in self._plan():
            parts = [part for part in parts if not part[0].finished]  # a decode before this one may have failed
            if not parts:
                continue
            sampled = self._fill_batch(parts)
            started = time.perf_counter()
            status = llama_cpp.llama_decode(self.ctx, self.batch)
            self._copy_sources.clear()  # done before it computed
            if status != 0:
                self._fail([sequence for sequence, _, _ in parts], status)
                continue
            if self.speculation.enabled and all(sequence.status is SequenceStatus.DECODING for sequence, _, _ in parts):
                self.costs.record(self.batch.n_tokens, time.perf_counter() - started)
            for sequence, batch_index in sampled:
                if sequence.draft:
                    self._verify(sequence, batch_index)
                else:
                    self._sample_and_emit(sequence, batch_index)
        self._retire()

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            sequence = self.waiting.popleft()
            prompt = sequence.request.prompt_tokens
            shared = [_common_prefix(tokens, prompt) for tokens in self.slot_tokens]
            slot = self._choose_slot(shared)
            self._admissions += 1
            self._slot_admitted[slot] = self._admissions
            self.free_slots.remove(slot)
            # Keep the shared prefix, but evaluate at least the last prompt token (its logits are
            # needed), in a chunk of MIN_CHUNK_TOKENS.
            keep = min(shared[slot], _reusable(len(prompt)))
            if self.host_cache is not None:
                keep = self._through_host_cache(slot, prompt, keep, in_slots=max(shared))
            if not llama_cpp.llama_memory_seq_rm(self.memory, slot, keep, -1):
                keep = 0  # this memory cannot drop a tail (recurrent models): start over
                llama_cpp.llama_memory_seq_rm(self.memory, slot, -1, -1)
            del self.slot_tokens[slot][keep:]
            sequence.slot = slot
            sequence.n_past = sequence.n_cached = keep
            sequence.status = SequenceStatus.PREFILL
            self.prefix_hit_tokens += keep
            if self.n_slots > 1:
                self._plan_prefix_copy(sequence)
            self.running.append(sequence)

    def _choose_slot(self, shared: list[int]) -> int:
        """The free slot a new sequence takes, given how many of its prompt's tokens each slot holds.

        Next to the busy slots, filling a gap first: llama.cpp decodes the streams of a run of
        consecutive slots in one pass over the weights, and each run apart in a pass of its own,
        so 4 answers in slots 1, 3, 5 and 7 cost 4 passes a token where slots 0-3 cost one (on a
        2-core machine, 95 instead of 140 tokens/s). Among those, the slot holding most of the
        prompt (a better one elsewhere is copied, see _plan_prefix_copy); when none holds a useful
        part of it, the one used least recently (an empty one first), so that another
        conversation's cache stays for its next turn.
        """
        busy = set(self._busy_slot_ids())
        neighbours = {free: (free - 1 in busy) + (free + 1 in busy) for free in self.free_slots}
        closest = max(neighbours.values())
        candidates = [free for free in self.free_slots if neighbours[free] == closest]
        slot = max(candidates, key=lambda free: (shared[free], -free))
        if shared[slot] < MIN_COPY_TOKENS:
            slot = min(candidates, key=lambda free: (self._slot_admitted[free], free))
        return slot

    def _close_gap(self) -> None:
        """Move the answer in the highest busy slot into a free slot below it, when busy slots have a gap.

        A finished answer leaves a gap when others are still running on both sides of it, and
        every step then costs one more pass over the weights (see _choose_slot) until a new
        request fills it. A move is a copy of the slot's whole KV cache (a memcpy, milliseconds):
        it is made only for an answer that may run a while yet. What the gap's slot held is kept
        in host memory first, where there is a host cache.
        """
        busy = self._busy_slot_ids()
        if len(busy) < 2 or busy[-1] - busy[0] + 1 == len(busy) or self.drafter is not None:
            return
        gap = next(slot for slot in range(busy[0], busy[-1]) if slot not in busy)
        sequence = next(sequence for sequence in self.running if sequence.slot == busy[-1])
        request = sequence.request
        if sequence.status is not SequenceStatus.DECODING:
            return
        if request.max_tokens is not None and request.max_tokens - len(sequence.completion_tokens) < MIN_MOVE_TOKENS:
            return
        held = self.slot_tokens[gap]
        if self.host_cache is not None and len(held) >= MIN_SAVE_TOKENS:
            self.host_cache.save(self.ctx, gap, tuple(held))
        source = sequence.slot
        self._copy_whole_slot(source, gap)
        llama_cpp.llama_memory_seq_rm(self.memory, source, -1, -1)
        self.slot_tokens[gap], self.slot_tokens[source] = self.slot_tokens[source], []
        self._slot_admitted[gap], self._slot_admitted[source] = self._slot_admitted[source], 0
        self.free_slots.remove(gap)
        self.free_slots.append(source)
        sequence.slot = gap
        self.moves += 1

    def _through_host_cache(self, slot: int, prompt: tuple[int, ...], keep: int, in_slots: int) -> int:
        """Save what the slot is about to lose; bring back a saved cache that holds more of the prompt than
        ``keep`` and than any slot (``in_slots`` of its tokens)."""
        cache = self.host_cache
        assert cache is not None
        held = self.slot_tokens[slot]
        if len(held) - keep >= MIN_SAVE_TOKENS:
            cache.save(self.ctx, slot, tuple(held))
        saved, shared = cache.best(prompt)
        shared = min(shared, _reusable(len(prompt)))
        if shared - max(keep, in_slots) < MIN_COPY_TOKENS:
            return keep  # the slots hold as much (another slot's cells are copied, see _plan_prefix_copy)
        if slot in self._copy_sources:
            return keep  # restoring now would overwrite what another slot is about to receive
        llama_cpp.llama_memory_seq_rm(self.memory, slot, -1, -1)
        if cache.restore(self.ctx, self.memory, slot, saved):
            self.slot_tokens[slot] = list(saved)
            return shared
        self.slot_tokens[slot] = []
        return 0

    def _plan_prefix_copy(self, sequence: Sequence) -> None:
        """Find another slot holding (or about to hold) more of this prompt than its own slot does."""
        prompt = sequence.request.prompt_tokens
        limit = _reusable(len(prompt))
        best_source: Sequence | None = None
        best_len = sequence.n_past
        best_slot = -1
        for slot, tokens in enumerate(self.slot_tokens):
            if slot != sequence.slot and (shared := min(_common_prefix(tokens, prompt), limit)) > best_len:
                best_len, best_slot = shared, slot
        for other in self.running:
            # A prompt being evaluated now: what it will hold once its prefill is done.
            if other.status is SequenceStatus.PREFILL and other.prefix_source is None:
                shared = min(_common_prefix(other.request.prompt_tokens, prompt), limit)
                if shared > best_len and shared > other.n_past:
                    best_len, best_source, best_slot = shared, other, other.slot
        if best_slot < 0 or best_len - sequence.n_past < MIN_COPY_TOKENS:
            return
        if best_source is None:
            self._copy_cells(sequence, best_slot, best_len)
        else:
            sequence.prefix_source, sequence.prefix_len = best_source, best_len

    def _copy_ready_prefixes(self) -> None:
        for sequence in self.running:
            source = sequence.prefix_source
            if source is None:
                continue
            ready = source.n_past >= sequence.prefix_len or source.status is not SequenceStatus.PREFILL
            if ready:
                sequence.prefix_source = None
                # Only what the source slot really holds now (it may have been cancelled half way).
                shared = min(_common_prefix(self.slot_tokens[source.slot], sequence.request.prompt_tokens),
                             sequence.prefix_len)  # fmt: skip
                if shared > sequence.n_past:
                    self._copy_cells(sequence, source.slot, shared)

    def _copy_cells(self, sequence: Sequence, source_slot: int, length: int) -> None:
        """Give this sequence's slot ``source_slot``'s KV cells for positions [0, length)."""
        if self.unified_kv:
            # One cache for all slots: the cells are shared, nothing is copied.
            llama_cpp.llama_memory_seq_cp(self.memory, source_slot, sequence.slot, sequence.n_past, length)
        else:
            # A cache per slot: the source slot's whole cache is copied (a memcpy far cheaper than
            # evaluating the prefix); drop what lies past the shared part.
            self._copy_whole_slot(source_slot, sequence.slot)
            llama_cpp.llama_memory_seq_rm(self.memory, sequence.slot, length, -1)
        self.slot_tokens[sequence.slot].extend(sequence.request.prompt_tokens[sequence.n_past : length])
        self.prefix_hit_tokens += length - sequence.n_past
        sequence.n_cached = sequence.n_past = length

    def _copy_whole_slot(self, source: int, destination: int) -> None:
        """Give ``destination`` every KV cell of ``source``. With a cache per slot, llama.cpp copies the data at the
        next decode, before it computes; until then nothing may be written into ``source`` (see _copy_sources)."""
        llama_cpp.llama_memory_seq_cp(self.memory, source, destination, -1, -1)
        self._copy_sources.add(source)

    def _busy_slot_ids(self) -> list[int]:
        """The slots holding a running sequence, in order."""
        return sorted(set(range(self.n_slots)).difference(self.free_slots))

    def _plan(self) -> list[list[tuple[Sequence, int, int]]]:
        """This step's decodes: (sequence, first position, end position) parts of each ``llama_decode``.

        First one token of every decoding sequence, in slot order (with a KV cache per slot,
        llama.cpp decodes a run of consecutive slots in one pass). Then prompt chunks, each its
        own decode: while answers are streaming, at most ``prefill_chunk`` prompt tokens a step, so
        a long prompt delays their next token by one chunk's time, not by the whole prompt's.
        """
        plans: list[list[tuple[Sequence, int, int]]] = []
        decoding = [sequence for sequence in self.running if sequence.status is SequenceStatus.DECODING]
        if self.speculation.enabled:
            plain: list[Sequence] = []
            for order, sequence in enumerate(decoding):
                # Guessed tokens make this sequence's rows outnumber the others', and llama.cpp decodes
                # unequal sequences in separate passes anyway: it is decoded on its own.
                sequence.draft = self._draft(sequence, others=len(decoding) - order - 1 + len(plain))
                if sequence.draft:
                    plans.append([(sequence, sequence.n_past, sequence.n_past + 1 + len(sequence.draft))])
                else:
                    plain.append(sequence)
            decoding = plain
        for start in range(0, len(decoding), self.n_ubatch):
            chunk = sorted(decoding[start : start + self.n_ubatch], key=lambda sequence: sequence.slot)
            plans.append([(sequence, sequence.n_past, sequence.n_past + 1) for sequence in chunk])
        budget = self.prefill_chunk if decoding else self.n_batch
        ready = [sequence for sequence in self.running
                 if sequence.status is SequenceStatus.PREFILL and sequence.prefix_source is None]  # fmt: skip
        grouped: list[list[tuple[Sequence, int, int]]] = []
        if self.group_prompts:
            grouped, budget = self._group_short_prompts(ready, budget)
            plans += grouped
        in_groups = {sequence for plan in grouped for sequence, _, _ in plan}
        for sequence in ready:
            if sequence in in_groups:
                continue
            if budget < MIN_CHUNK_TOKENS:
                break
            remaining = sequence.prompt_len - sequence.n_past
            size = min(remaining, budget, self.n_ubatch)
            if remaining - size == 1:  # never leave a lone last token: it would be computed differently
                size -= 1
            if size < MIN_CHUNK_TOKENS and size < remaining:
                continue
            plans.append([(sequence, sequence.n_past, sequence.n_past + size)])
            budget -= size
        return plans

    def _group_short_prompts(
        self, ready: list[Sequence], budget: int
    ) -> tuple[list[list[tuple[Sequence, int, int]]], int]:
        """Decodes that evaluate the short prompts of consecutive slots together, and the budget left.

        Eight requests arriving at once would otherwise cost eight prompt decodes, each a pass over
        the weights for a few dozen tokens; together they take one or a few. Every sequence in such a
        decode gets the same number of tokens (llama.cpp then computes them in one pass, each slot's
        rows as a chunk of its own), never leaving one with a lone last token, and no chunk reaches
        MAX_ROWS rows, so that attention computes each row as it does in the prompt's own decode.
        """
        plans: list[list[tuple[Sequence, int, int]]] = []
        short = sorted((sequence for sequence in ready if sequence.prompt_len - sequence.n_past <= MAX_ROWS),
                       key=lambda sequence: sequence.slot)  # fmt: skip
        runs: list[list[Sequence]] = []
        for sequence in short:
            if runs and runs[-1][-1].slot + 1 == sequence.slot and len(runs[-1]) < self.n_ubatch // MAX_ROWS:
                runs[-1].append(sequence)
            else:
                runs.append([sequence])
        for run in runs:
            if len(run) < 2 or budget < MIN_CHUNK_TOKENS * len(run):
                continue
            offsets = {sequence: sequence.n_past for sequence in run}
            active = run
            while len(active) >= 2:
                remaining = [sequence.prompt_len - offsets[sequence] for sequence in active]
                size = min(remaining)
                if any(left - size == 1 for left in remaining):
                    size -= 2  # the shortest keeps 2 tokens, the others 3 or more
                if size < MIN_CHUNK_TOKENS or size * len(active) > budget:
                    break
                plans.append([(sequence, offsets[sequence], offsets[sequence] + size) for sequence in active])
                budget -= size * len(active)
                for sequence in active:
                    offsets[sequence] += size
                active = [sequence for sequence in active if offsets[sequence] < sequence.prompt_len]
            for sequence in active:  # what is left of a prompt (2 tokens or more), in a decode of its own
                if offsets[sequence] > sequence.n_past and budget >= sequence.prompt_len - offsets[sequence]:
                    plans.append([(sequence, offsets[sequence], sequence.prompt_len)])
                    budget -= sequence.prompt_len - offsets[sequence]
        return plans, budget

    def prepare(self) -> None:
        """Before the first step, on the thread that will step: with speculation, time decodes of 1, 2, 4...
        rows in an empty slot, to know what verifying guesses costs on this machine. (On another thread,
        llama.cpp's CPU threads for that one would stay and slow every later decode.)"""
        if self._costs_measured:
            return
        self._costs_measured = True
        max_rows = min(self.speculation.draft_max, MAX_ROWS - 1) + 1
        sizes = sorted({rows for rows in (1, 2, 4, 8, 16, 32, max_rows) if rows <= min(max_rows, self.n_ubatch)})
        token = max(self.model.bos_token, 0)
        slot = self.free_slots[-1]
        for measured, rows in [(False, sizes[-1]), *((True, rows) for rows in sizes)]:  # the first warms up
            for index in range(rows):
                self._put(index, token, index, slot, True)
            self.batch.n_tokens = rows
            started = time.perf_counter()
            status = llama_cpp.llama_decode(self.ctx, self.batch)
            elapsed = time.perf_counter() - started
            llama_cpp.llama_memory_seq_rm(self.memory, slot, -1, -1)
            if status == 0 and measured:
                self.costs.record(rows, elapsed)
        if self.drafter is not None:
            self.drafter.measure()

    def _draft(self, sequence: Sequence, others: int) -> list[int]:
        """Tokens to guess after this sequence's next one, when verifying them is expected to pay."""
        guesser = sequence.guesser
        if guesser is None:
            return []
        room = min(self.speculation.draft_max, MAX_ROWS - 1, self.seq_capacity - sequence.n_past - 1)
        if sequence.request.max_tokens is not None:
            room = min(room, sequence.request.max_tokens - len(sequence.completion_tokens) - 1)
        if room <= 0:
            return []

        def choose(likelihood: Likelihood, available: int, guess_cost: float) -> int:
            count = best_draft_length(likelihood, available, others, self.costs, guess_cost)
            return max(count, min(self.speculation.draft_min, available))

        return guesser.propose(sequence.slot, room, choose)

    def _fill_batch(self, parts: list[tuple[Sequence, int, int]]) -> list[tuple[Sequence, int]]:
        """Write one decode's tokens into the batch; returns which sequences get logits at which index."""
        sampled: list[tuple[Sequence, int]] = []
        index = 0
        for sequence, begin, end in parts:
            if sequence.status is SequenceStatus.DECODING:
                tokens: list[int] = [sequence.next_token, *sequence.draft]  # type: ignore[list-item]
                for offset, token in enumerate(tokens):
                    self._put(index + offset, token, begin + offset, sequence.slot, True)
                self.slot_tokens[sequence.slot].extend(tokens)
                sampled.append((sequence, index))
                index += len(tokens)
            else:
                prompt = sequence.request.prompt_tokens
                for position in range(begin, end):
                    self._put(index, prompt[position], position, sequence.slot, False)
                    index += 1
                self.slot_tokens[sequence.slot].extend(prompt[begin:end])
                if end == sequence.prompt_len:
                    self.batch.logits[index - 1] = True
                    sampled.append((sequence, index - 1))
            sequence.n_past = end
        self.batch.n_tokens = index
        return sampled

    def _put(self, index: int, token: int, position: int, slot: int, logits: bool) -> None:
        batch = self.batch
        batch.token[index] = token
        batch.pos[index] = position
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = slot
        batch.logits[index] = logits

    def _verify(self, sequence: Sequence, batch_index: int) -> None:
        """Sample each row of a decode that carried guessed tokens, as far as the guesses were right; then
        drop the rows past that from the cache."""
        draft, sequence.draft = sequence.draft, []
        first = sequence.n_past - len(draft) - 1  # the position of the row holding next_token
        accepted = 0
        for row in range(len(draft) + 1):
            sequence.n_past = first + row + 1
            token = self._sample_and_emit(sequence, batch_index + row)
            if sequence.finished or row == len(draft) or token != draft[row]:
                break
            accepted += 1
        if sequence.guesser is not None:
            sequence.guesser.verified(len(draft), accepted)
        if sequence.n_past < first + len(draft) + 1:
            llama_cpp.llama_memory_seq_rm(self.memory, sequence.slot, sequence.n_past, -1)
            del self.slot_tokens[sequence.slot][sequence.n_past :]

    def _sample_and_emit(self, sequence: Sequence, batch_index: int) -> int | None:
        """Sample the next token from the logits at ``batch_index``; None when the sequence ended instead."""
        if sequence.finished:
            return None
        token = sequence.sampler.sample(self.ctx, batch_index)
        now = time.perf_counter()
        if sequence.status is SequenceStatus.PREFILL:
            sequence.status = SequenceStatus.DECODING
            sequence.timings.first_token = now
        sequence.timings.last_token = now
        request = sequence.request
        if not request.ignore_eos and self.model.is_end_of_generation(token):
            self._finish(sequence, FinishReason.STOP)
            return None
        if request.logprobs is not None:
            sequence.pending_logprobs.append(self._logprob(batch_index, token, request.logprobs))
        sequence.completion_tokens.append(token)
        if sequence.guesser is not None:
            sequence.guesser.append(token)
        sequence.next_token = token
        text = sequence.stop_matcher.feed(sequence.utf8.feed(self.model.token_bytes(token)))
        sequence._emit(text)
        if sequence.stop_matcher.stopped:
            self._finish(sequence, FinishReason.STOP)
        elif request.max_tokens is not None and len(sequence.completion_tokens) >= request.max_tokens:
            self._finish(sequence, FinishReason.LENGTH)
        elif sequence.n_past >= self.seq_capacity:
            sequence.context_full = True
            self._finish(sequence, FinishReason.LENGTH)
        return token

    def _logprob(self, batch_index: int, token: int, n_top: int) -> TokenLogprob:
        """The model's log-probabilities (before sampling options) at ``batch_index`` of the last decode."""
        import numpy as np

        pointer = llama_cpp.llama_get_logits_ith(self.ctx, batch_index)
        logits = np.ctypeslib.as_array(pointer, shape=(self.model.n_vocab,)).astype(np.float64)
        log_z = float(np.logaddexp.reduce(logits))
        top: tuple[tuple[str, bytes, float], ...] = ()
        if n_top > 0:
            best = np.argpartition(-logits, n_top)[:n_top]
            best = best[np.argsort(-logits[best])]
            top = tuple(self._token_entry(int(candidate), float(logits[candidate]) - log_z) for candidate in best)
        text, piece, logprob = self._token_entry(token, float(logits[token]) - log_z)
        return TokenLogprob(text, piece, logprob, top)

    def _token_entry(self, token: int, logprob: float) -> tuple[str, bytes, float]:
        piece = self.model.token_bytes(token)
        return piece.decode("utf-8", errors="replace"), piece, logprob

    def _finish(self, sequence: Sequence, reason: FinishReason) -> None:
        if not sequence.stop_matcher.stopped:
            sequence._emit(sequence.stop_matcher.feed(sequence.utf8.flush()))
            if not sequence.stop_matcher.stopped:
                sequence._emit(sequence.stop_matcher.flush())
        sequence.finish_reason = reason
        sequence.status = SequenceStatus.FINISHED
        sequence.timings.finished = time.perf_counter()

    def _fail(self, sequences: list[Sequence], status: int) -> None:
        reason = "no room left in the KV cache" if status == 1 else f"llama_decode returned {status}"
        for sequence in sequences:
            if not sequence.finished:
                sequence.error = LlmrunError(f"generation failed: {reason}", "run with --debug to see llama.cpp's log")
                self._finish(sequence, FinishReason.ERROR)

    def _retire(self) -> None:
        still_running = []
        for sequence in self.running:
            if sequence.finished:
                if sequence.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
                    # The cache may hold tokens the record does not (a decode that failed half way).
                    llama_cpp.llama_memory_seq_rm(self.memory, sequence.slot, -1, -1)
                    self.slot_tokens[sequence.slot].clear()
                sequence.sampler.close()
                self.free_slots.append(sequence.slot)
            else:
                still_running.append(sequence)
        self.running = still_running

    def close(self) -> None:
        for sequence in [*self.running, *self.waiting]:
            sequence.sampler.close()
        self.running.clear()
        self.waiting.clear()
        if self.host_cache is not None:
            self.host_cache.entries.clear()
            self.host_cache.used = 0
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
