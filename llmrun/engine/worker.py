"""Engines driven for callers on other threads (the server): every engine computes on one thread.

Only that thread touches llama contexts. Callers hand a worker requests through its inbox
and get each sequence's progress back through a callback, called on that thread after every
step; with nothing to do, the thread sleeps on a condition variable (no polling).

One thread for all the models a server has loaded, taking a step of each in turn, not a thread
per model: llama.cpp's CPU backend runs each decode in an OpenMP team of threads, and OpenMP
keeps a team for every thread that ever started one. With more of those threads than cores
(a second model's team on a 2-core machine, idle or not), its barriers stop spinning and
sleep, and every decode of every model was measured 35% slower.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from llmrun.engine.engine import Engine, Generation
from llmrun.engine.scheduler import GenerationRequest, Sequence
from llmrun.errors import LlmrunError
from llmrun.generation import GenerationResult, TokenLogprob

T = TypeVar("T")


@dataclass(frozen=True)
class SequenceUpdate:
    """What one sequence produced in one step: new text, and at the end its result (or error)."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    result: GenerationResult | None = None  # set on the last update
    error: LlmrunError | None = None

    @property
    def last(self) -> bool:
        return self.result is not None


UpdateCallback = Callable[[SequenceUpdate], None]


class Ticket:
    """A submitted request: cancel it from any thread."""

    def __init__(
        self, worker: EngineWorker, request: GenerationRequest, on_update: UpdateCallback,
        on_handed: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self.worker = worker
        self.request = request
        self.on_update = on_update
        self.on_handed = on_handed
        self.sequence: Sequence | None = None
        self.cancelled = False
        self.answering = False  # its first text has been handed over

    def cancel(self) -> None:
        self.worker._post(("cancel", self))


class _ComputeThread:
    """The thread every worker's engine computes on: one step of each worker with work, in turn."""

    def __init__(self) -> None:
        self.wake = threading.Condition()
        self.workers: list[EngineWorker] = []
        self.thread = threading.Thread(target=self._run, name="llmrun-engines", daemon=True)
        self.thread.start()

    def add(self, worker: EngineWorker) -> None:
        with self.wake:
            self.workers.append(worker)
            self.wake.notify()

    def _run(self) -> None:
        while True:
            with self.wake:
                while not any(worker._ready() for worker in self.workers):
                    self.wake.wait()
                workers = list(self.workers)
            for worker in workers:
                try:
                    stopped = worker._turn()
                except Exception as error:  # noqa: BLE001 - one engine's failure must not stop the others
                    stopped = worker._fail_all(error)
                if stopped:
                    with self.wake:
                        self.workers.remove(worker)


_compute: _ComputeThread | None = None
_compute_lock = threading.Lock()


def _compute_thread() -> _ComputeThread:
    global _compute
    with _compute_lock:
        if _compute is None:
            _compute = _ComputeThread()
        return _compute


class EngineWorker:
    """Runs ``engine``'s scheduler on the engines' thread until ``stop()``.

    ``stream_interval_s``: how long the text of running answers is gathered before it is handed
    over, all answers at once. Every hand-off wakes the receiver's thread, and on a CPU whose
    cores all decode, that thread's turn is taken from the decode: one wake per token made
    single-stream decoding 8% slower, one per 20 ms costs about 1%. An answer's first text and
    its end are handed over at once, whatever the interval.
    """

    def __init__(self, engine: Engine, name: str = "engine", stream_interval_s: float = 0.0) -> None:
        self.engine = engine
        self.name = name
        self.stream_interval_s = stream_interval_s
        self._handed_at = 0.0  # when the text of every running answer was last handed over
        self._inbox: deque[tuple[str, Any]] = deque()
        self._active: dict[Sequence, Ticket] = {}
        self._stopping = False
        self._prepared = False
        self._stopped = threading.Event()
        self._compute = _compute_thread()
        self._wake = self._compute.wake
        self._compute.add(self)

    # -- any thread --------------------------------------------------------------

    def submit(
        self, request: GenerationRequest, on_update: UpdateCallback, on_handed: Callable[[], None] | None = None
    ) -> Ticket:
        """Queue a request; ``on_update`` is called on the worker thread as it progresses.

        ``on_handed`` is called after the updates of a step have all been handed over, once for
        every ticket that shares it: where receivers wake one thread, that wake-up is then one
        for all the answers of the step, not one for each.
        """
        ticket = Ticket(self, request, on_update, on_handed)
        self._post(("submit", ticket))
        return ticket

    def call(self, function: Callable[[Engine], T]) -> Future[T]:
        """Run ``function(engine)`` on the worker thread between steps (embeddings, anything else)."""
        future: Future[T] = Future()
        self._post(("call", (function, future)))
        return future

    def cancel_all(self, reason: str) -> None:
        """End every request now with an error saying ``reason`` (a server shutting down)."""
        self._post(("cancel_all", reason))

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished (racy: for display and metrics)."""
        return len(self._active) + sum(1 for kind, _ in list(self._inbox) if kind == "submit")

    @property
    def busy_slots(self) -> int:
        return self.engine.scheduler.busy_slots

    @property
    def waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    def stop(self) -> None:
        """Cancel everything, end the thread and free the engine."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._stopped.wait()
        self.engine.close()

    def _post(self, message: tuple[str, Any]) -> None:
        with self._wake:
            self._inbox.append(message)
            self._wake.notify()

    # -- the engines' thread ---------------------------------------------------------

    def _ready(self) -> bool:
        """Something to do (asked holding the condition's lock)."""
        return not self._prepared or bool(self._inbox) or self._stopping or self.engine.scheduler.has_work

    def _turn(self) -> bool:
        """Handle what came in and take one step; True once the worker has stopped."""
        scheduler = self.engine.scheduler
        if not self._prepared:
            self._prepared = True
            scheduler.prepare()
        with self._wake:
            messages = list(self._inbox)
            self._inbox.clear()
            stopping = self._stopping
        for kind, payload in messages:
            self._handle(kind, payload)
        if stopping:
            for ticket in list(self._active.values()):
                self._cancel(ticket)
            self._stopped.set()
            return True
        if scheduler.has_work:
            scheduler.step()
            self._deliver()
        return False

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "submit":
            ticket: Ticket = payload
            if ticket.cancelled:
                return
            try:
                ticket.sequence = self.engine.scheduler.submit(ticket.request)
            except LlmrunError as error:
                ticket.on_update(SequenceUpdate("", result=_empty_result(), error=error))
                self._wake_receivers([ticket])
                return
            self._active[ticket.sequence] = ticket
        elif kind == "cancel":
            self._cancel(payload)
        elif kind == "cancel_all":
            for sequence, ticket in list(self._active.items()):
                sequence.error = LlmrunError(payload, "send the request again later")
                self._cancel(ticket)
        elif kind == "call":
            function, future = payload
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function(self.engine))
                except BaseException as error:  # noqa: BLE001 - handed to the caller, whatever it is
                    future.set_exception(error)

    def _fail_all(self, error: Exception) -> bool:
        """End this engine's requests with an error (a step raised one); False: the worker goes on."""
        sys.stderr.write(f"error: generation failed in {self.name}: {error!r}\n")
        for sequence, ticket in list(self._active.items()):
            sequence.error = LlmrunError(f"generation failed: {error}", "send the request again")
            self._cancel(ticket)
        return False

    def _cancel(self, ticket: Ticket) -> None:
        ticket.cancelled = True
        sequence = ticket.sequence
        if sequence is not None and sequence in self._active:
            self.engine.scheduler.cancel(sequence)
            self._hand_over([(sequence, ticket)])

    def _deliver(self) -> None:
        now = time.perf_counter()
        due = now - self._handed_at >= self.stream_interval_s
        if due:
            self._handed_at = now
        ready = []
        for sequence, ticket in self._active.items():
            pending = sequence.pending_text or sequence.pending_logprobs
            if sequence.finished or (pending and (due or not ticket.answering)):
                ready.append((sequence, ticket))
        if ready:
            self._hand_over(ready)

    def _hand_over(self, ready: list[tuple[Sequence, Ticket]]) -> None:
        """Each sequence's update to its ticket, then their receivers' wake-ups."""
        for sequence, ticket in ready:
            self._deliver_one(sequence, ticket)
        self._wake_receivers([ticket for _, ticket in ready])

    def _wake_receivers(self, tickets: list[Ticket]) -> None:
        """Each distinct ``on_handed`` of ``tickets`` once; where one fails, its unfinished answers are cancelled."""
        handed: dict[Callable[[], None], list[Ticket]] = {}
        for ticket in tickets:
            if ticket.on_handed is not None:
                handed.setdefault(ticket.on_handed, []).append(ticket)
        for on_handed, group in handed.items():
            try:
                on_handed()
            except Exception:  # noqa: BLE001 - a receiver that has gone away must not stop the other sequences
                for ticket in group:
                    if ticket.sequence is not None and not ticket.sequence.finished:
                        self._cancel(ticket)

    def _deliver_one(self, sequence: Sequence, ticket: Ticket) -> None:
        text = "".join(sequence.drain_text())
        logprobs = sequence.drain_logprobs()
        ticket.answering = True
        if sequence.finished:
            del self._active[sequence]
            result = Generation(self.engine.scheduler, sequence).result
            update = SequenceUpdate(text, logprobs, result, sequence.error)
        else:
            update = SequenceUpdate(text, logprobs)
        try:
            ticket.on_update(update)
        except Exception:  # noqa: BLE001 - a receiver that has gone away must not stop the other sequences
            if not sequence.finished:
                self._cancel(ticket)


def _empty_result() -> GenerationResult:
    return GenerationResult("", "error", 0, 0, 0, False, 0.0, 0.0, 0.0)
