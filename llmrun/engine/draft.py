"""A draft model: a small model with the target's vocabulary guesses the next tokens greedily.

It has a context of its own with a sequence per slot of the target's, and keeps in each the
tokens it last saw there: before guessing, it drops what the target rejected and evaluates
only what is new, so a draft costs its guessed tokens plus the target's last few.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmrun.engine.model import Model
from llmrun.engine.native import NATIVE_LOG, llama_cpp
from llmrun.engine.speculation import (
    COST_WEIGHT,
    DRAFT_PRIOR_ACCEPTANCE,
    Chooser,
    DecodeCosts,
    SpeculationStats,
    learned_from_verify,
)
from llmrun.errors import DraftMismatch, ModelLoadError

# As llama.cpp's speculative example: vocabularies may differ by this many (padding) tokens at the end.
MAX_VOCAB_DIFFERENCE = 128
N_BATCH = 512  # tokens the draft evaluates in one decode when it catches up


def vocabulary_mismatch(target: Model, draft: Model) -> str | None:
    """Why the draft's guesses would not be the target's tokens, or None when they are."""
    if llama_cpp.llama_vocab_type(target.vocab) != llama_cpp.llama_vocab_type(draft.vocab):
        return "its tokenizer is of another kind"
    if abs(target.n_vocab - draft.n_vocab) > MAX_VOCAB_DIFFERENCE:
        return f"its vocabulary has {draft.n_vocab} tokens, the model's {target.n_vocab}"
    if (target.bos_token, target.eos_token) != (draft.bos_token, draft.eos_token):
        return "its start and end tokens are other ones"
    for token in range(min(target.n_vocab, draft.n_vocab)):
        if llama_cpp.llama_vocab_get_text(target.vocab, token) != llama_cpp.llama_vocab_get_text(draft.vocab, token):
            return f"token {token} is {draft.token_text(token)!r} in it, {target.token_text(token)!r} in the model"
    return None


class DraftModel:
    """The draft model and its context: ``n_slots`` sequences of up to ``seq_capacity`` tokens."""

    def __init__(
        self, path: Path, target: Model, n_slots: int, seq_capacity: int, n_threads: int, gpu_layers: str | int
    ) -> None:
        self.model = Model(path, gpu_layers)
        mismatch = vocabulary_mismatch(target, self.model)
        if mismatch is not None:
            self.model.close()
            raise DraftMismatch(
                f"{path.name} cannot draft for {target.path.name}: {mismatch}",
                "use a draft model of the same family (the same tokenizer), or --lookup",
            )
        self.n_vocab = min(target.n_vocab, self.model.n_vocab)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = seq_capacity * n_slots
        params.n_batch = params.n_ubatch = N_BATCH
        params.n_seq_max = n_slots
        params.n_threads = params.n_threads_batch = n_threads
        params.kv_unified = False
        params.no_perf = True
        NATIVE_LOG.clear_errors()
        self.ctx: Any = llama_cpp.llama_init_from_model(self.model.handle, params)
        if not self.ctx:
            detail = NATIVE_LOG.first_error()
            self.model.close()
            raise ModelLoadError(
                "llama.cpp could not create a context for the draft model" + (f": {detail}" if detail else ""),
                "try a smaller --ctx",
            )
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self.greedy = llama_cpp.llama_sampler_init_greedy()
        self.slot_tokens: list[list[int]] = [[] for _ in range(n_slots)]
        self.token_seconds: float | None = None  # one draft token's decode (running average)

    def measure(self) -> None:
        """Time a decode of one token, so that the first decision to draft knows what drafting costs."""
        token = max(self.model.bos_token, 0)
        for position in range(3):  # the first warms up
            started = time.perf_counter()
            if not self._decode(0, [token], position):
                return
            if position:
                self._record(time.perf_counter() - started)
        llama_cpp.llama_memory_seq_rm(self.memory, 0, -1, -1)
        self.slot_tokens[0].clear()

    def _record(self, seconds: float) -> None:
        previous = self.token_seconds
        self.token_seconds = seconds if previous is None else previous + COST_WEIGHT * (seconds - previous)

    def draft(self, slot: int, history: list[int], count: int) -> list[int]:
        """Up to ``count`` greedy tokens to follow ``history`` (the sequence's tokens so far)."""
        held = self.slot_tokens[slot]
        shared = 0
        for mine, theirs in zip(held, history, strict=False):
            if mine != theirs:
                break
            shared += 1
        shared = min(shared, len(history) - 1)  # the last token is evaluated again, for its logits
        llama_cpp.llama_memory_seq_rm(self.memory, slot, shared, -1)
        del held[shared:]
        for start in range(shared, len(history), N_BATCH):
            if not self._decode(slot, history[start : start + N_BATCH], start):
                return []
        guessed: list[int] = []
        while True:
            token = int(llama_cpp.llama_sampler_sample(self.greedy, self.ctx, -1))
            if token >= self.n_vocab or self.model.is_end_of_generation(token):
                break
            guessed.append(token)
            if len(guessed) == count:
                break
            started = time.perf_counter()
            if not self._decode(slot, [token], len(history) + len(guessed) - 1):
                break
            self._record(time.perf_counter() - started)
        return guessed

    def _decode(self, slot: int, tokens: list[int], position: int) -> bool:
        batch = self.batch
        for index, token in enumerate(tokens):
            batch.token[index] = token
            batch.pos[index] = position + index
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = slot
            batch.logits[index] = index == len(tokens) - 1
        batch.n_tokens = len(tokens)
        if llama_cpp.llama_decode(self.ctx, batch) != 0:
            llama_cpp.llama_memory_seq_rm(self.memory, slot, -1, -1)
            self.slot_tokens[slot].clear()
            return False
        self.slot_tokens[slot].extend(tokens)
        return True

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.greedy is not None:
            llama_cpp.llama_sampler_free(self.greedy)
            self.greedy = None
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        self.model.close()


@dataclass
class DraftGuesser:
    """One sequence's guesses from the draft model, and how often they come true."""

    drafter: DraftModel
    history: list[int]
    costs: DecodeCosts  # the target's
    acceptance: float = DRAFT_PRIOR_ACCEPTANCE
    stats: SpeculationStats = field(default_factory=SpeculationStats)

    def propose(self, slot: int, room: int, choose: Chooser) -> list[int]:
        drafter = self.drafter
        target = self.costs.seconds.get(1)
        guess_cost = drafter.token_seconds / target if drafter.token_seconds and target else 0.25
        guessed = choose(self.acceptance, room, guess_cost)
        return drafter.draft(slot, self.history, guessed) if guessed > 0 else []

    def append(self, token: int) -> None:
        self.history.append(token)

    def verified(self, drafted: int, accepted: int) -> None:
        self.stats.record(drafted, accepted)
        self.acceptance = learned_from_verify(self.acceptance, drafted, accepted)
