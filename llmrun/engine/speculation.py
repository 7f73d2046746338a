"""Speculative decoding: guess the next tokens, by prompt lookup or with a draft model, verify them in one decode.

A sequence that is quoting its input (repeating or editing code, extracting fields, JSON
with repeated keys) keeps producing n-grams it has seen before; the tokens that followed
the last occurrence are a guess at what comes next. The guess rides along in the next
``llama_decode`` as extra rows, and each row's logits are sampled exactly as a lone token
would be: the sampled token is emitted, and the next row counts only if the guess there was
right. So the answer is the one plain decoding gives, token for token, with the same seed
too (sampling from the target and comparing to a fixed guess is speculative sampling with a
one-point draft distribution: it accepts a guess with the target's own probability). That
holds as far as llama.cpp computes a row of a batch as it computes a lone token: always,
except that with an f16 (or f32) KV cache its CPU flash attention splits a lone token's work
across threads once the cache holds 512 cells, and sums in another order from there.

Verifying is not free. On a CPU with few cores a decode of n rows costs far more than one
row (measured here: 9 rows ~5x, 17 rows ~9x one row on a 2-core machine), so a guess pays
only when it is very likely to be right. Each sequence keeps an estimate of how often its
guesses are right, learned also from the guesses it did not send (they are checked for free
against what was generated), and the scheduler measures what decodes of each size cost; a
guess is sent only when the expected tokens per second go up.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmrun.settings import DEFAULT_DRAFT_MAX

# Tokens of context a guess is looked up by: the last occurrence of the last 12 tokens when there is one
# (the text is being copied, and that occurrence is the one being copied), else of the last 3.
NGRAMS = (12, 3)
# How far the text before a guessed token matches the text before the earlier occurrence it was taken
# from: a long match means the model is copying (or looping), and its guesses come true far more
# often. Acceptance is learned separately for matches up to each of these lengths (and longer ones).
# Each right guess lengthens the match of the tokens guessed after it, so a guess's later tokens are
# weighed by longer matches than its first.
MATCH_BUCKETS = (4, 8, 16, 32, 64)
MATCH_PRIORS = (0.5, 0.6, 0.8, 0.9, 0.95, 0.98)  # acceptance per bucket, until learned
DRAFT_PRIOR_ACCEPTANCE = 0.7  # a draft model's tokens, until its verifies say otherwise
# A decode of n rows is guessed to cost this much more per extra row than one row, until measured.
PRIOR_ROW_COST = 0.6
COST_WEIGHT = 0.25  # of a new timing in the running average per row count
ACCEPTANCE_WEIGHT = 0.08  # of one guessed token's outcome in the running acceptance rate
MIN_GAIN = 1.05  # speculate only when the expected rate beats plain decoding by this much
# Verify rows stay below llama.cpp's tiled flash-attention path (64 query rows): every row of a verify is
# computed alike, whatever their number.
MAX_ROWS = 48


@dataclass(frozen=True)
class SpeculationOptions:
    """Whether to speculate, and how far."""

    lookup: bool = False
    draft: Path | None = None  # a draft model's GGUF file
    draft_max: int = DEFAULT_DRAFT_MAX
    draft_min: int = 0  # guess at least this many tokens whenever there is a guess, paying or not

    @property
    def enabled(self) -> bool:
        return self.lookup or self.draft is not None

    @property
    def method(self) -> str:
        """ "lookup", "draft", or "" without speculation."""
        return "lookup" if self.lookup else "draft" if self.draft is not None else ""


@dataclass
class SpeculationStats:
    """Guessed tokens sent for verification, and how many of them were right."""

    drafted: int = 0
    accepted: int = 0

    def record(self, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted


def learned(rate: float, right: bool) -> float:
    """A running acceptance rate after one more guessed token came true, or did not."""
    return rate + ACCEPTANCE_WEIGHT * ((1.0 if right else 0.0) - rate)


def learned_from_verify(rate: float, drafted: int, accepted: int) -> float:
    """A running acceptance rate after a verify found the first ``accepted`` of ``drafted`` guesses right."""
    for _ in range(accepted):
        rate = learned(rate, True)
    return learned(rate, False) if accepted < drafted else rate


class DecodeCosts:
    """Seconds per ``llama_decode`` by number of rows (running averages), as ratios to one row."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}

    def record(self, rows: int, seconds: float) -> None:
        if rows > MAX_ROWS + 1 or seconds <= 0:
            return
        previous = self.seconds.get(rows)
        self.seconds[rows] = seconds if previous is None else previous + COST_WEIGHT * (seconds - previous)

    def ratio(self, rows: int) -> float:
        """What a decode of ``rows`` rows costs, in decodes of one row (0 for none): measured, or
        interpolated between the row counts measured, or extended from the last two."""
        if rows <= 1:
            return float(rows)
        one = self.seconds.get(1)
        if one is None:
            return 1.0 + PRIOR_ROW_COST * (rows - 1)
        if rows in self.seconds:
            return self.seconds[rows] / one
        known = sorted(self.seconds)
        below = max(n for n in known if n < rows)
        above = [n for n in known if n > rows]
        if above:
            low, high = below, above[0]
        elif len(known) >= 2:
            low, high = known[-2], known[-1]
        else:
            return 1.0 + PRIOR_ROW_COST * (rows - 1)
        slope = (self.seconds[high] - self.seconds[low]) / (high - low)
        return max(1.0, (self.seconds[low] + slope * (rows - low)) / one)


# How likely guessed tokens are to come true, each given the ones before it did: one rate for all, or
# one per token of the guess.
Likelihood = float | Sequence[float]


def _per_token(likelihood: Likelihood, guessed: int) -> Sequence[float]:
    return [likelihood] * guessed if isinstance(likelihood, float | int) else likelihood[:guessed]


def best_draft_length(
    likelihood: Likelihood, available: int, others: int, costs: DecodeCosts, guess_cost: float = 0.0
) -> int:
    """How many guessed tokens to verify (0: decode plainly), for the most tokens per second. The
    sequence is decoded on its own when it verifies guesses, beside a decode of the ``others``
    sequences that decode one token; making each guessed token costs ``guess_cost`` one-row decodes."""
    if available <= 0:
        return 0
    plain = (others + 1) / costs.ratio(others + 1)
    best, best_rate = 0, plain * MIN_GAIN
    expected, run = 1.0, 1.0  # tokens a verify emits: the sampled one, then the run of right guesses
    for guessed, rate in enumerate(_per_token(likelihood, available), start=1):
        run *= rate
        expected += run
        cost = costs.ratio(others) + costs.ratio(guessed + 1) + guess_cost * guessed
        if (others + expected) / cost > best_rate:
            best, best_rate = guessed, (others + expected) / cost
    return best


# How many tokens to guess: (how likely each is to come true, how many could be guessed, cost of making
# one) -> count.
Chooser = Callable[[Likelihood, int, float], int]


def match_bucket(matched: int) -> int:
    """The acceptance bucket of a guessed token whose preceding text matches over ``matched`` tokens: the first
    bound at least ``matched``, or past the last."""
    return bisect.bisect_left(MATCH_BUCKETS, matched)


@dataclass
class Lookup:
    """One sequence's text as tokens, indexed by n-gram, and how often guesses from it come true."""

    history: list[int]
    # Per n-gram length: the n-gram -> where the token after its last occurrence is.
    index: dict[int, dict[tuple[int, ...], int]] = field(default_factory=lambda: {n: {} for n in NGRAMS})
    # Per match-length bucket: how often a guessed token came true (given the ones before it did).
    acceptance: list[float] = field(default_factory=lambda: list(MATCH_PRIORS))
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    matched: int = 0  # how far the text before the last guess's first token matched
    # A guess not sent for verification, checked against the tokens generated after it.
    _shadow: list[int] = field(default_factory=list)
    _shadow_at: int = 0
    _shadow_matched: int = 0

    def __post_init__(self) -> None:
        history = self.history
        for n, index in self.index.items():
            for end in range(n, len(history)):
                index[tuple(history[end - n : end])] = end

    def propose(self, slot: int, room: int, choose: Chooser) -> list[int]:
        """The guessed tokens to verify in this step (none when verifying them would not pay)."""
        guess = self.guess(room)
        guessed = choose(self.likelihoods(len(guess)), len(guess), 0.0) if guess else 0
        self.sent(guess, verifying=guessed > 0)
        return guess[:guessed]

    def guess(self, limit: int) -> list[int]:
        """The tokens that followed the last earlier occurrence of the text's last n-gram (the longest n)."""
        history = self.history
        if limit <= 0:
            return []
        start = None
        for n, index in self.index.items():
            if len(history) >= n and (start := index.get(tuple(history[-n:]))) is not None:
                break
        if start is None:
            return []
        matched, longest = n, MATCH_BUCKETS[-1] + 1  # past the last bucket, the length makes no difference
        while matched < longest and start > matched and history[start - matched - 1] == history[-matched - 1]:
            matched += 1
        self.matched = matched
        return history[start : start + limit]

    def likelihoods(self, count: int) -> list[float]:
        """How likely each of the last guess's first ``count`` tokens is to come true, given the ones before."""
        acceptance, matched = self.acceptance, self.matched
        return [acceptance[match_bucket(matched + offset)] for offset in range(count)]

    def _learn(self, matched: int, right: bool) -> None:
        bucket = match_bucket(matched)
        self.acceptance[bucket] = learned(self.acceptance[bucket], right)

    def sent(self, guess: list[int], verifying: bool) -> None:
        """This step's guess goes to a verify, or is checked against what gets generated next."""
        if verifying:
            self._shadow = []  # the verify checks the same tokens
        elif not self._shadow and guess:
            self._shadow, self._shadow_at, self._shadow_matched = guess, 0, self.matched

    def append(self, token: int) -> None:
        """A token was generated."""
        history = self.history
        history.append(token)
        end = len(history) - 1
        for n, index in self.index.items():
            if end >= n:
                index[tuple(history[end - n : end])] = end
        if self._shadow:
            right = self._shadow[self._shadow_at] == token
            self._learn(self._shadow_matched + self._shadow_at, right)
            self._shadow_at += 1
            if not right or self._shadow_at == len(self._shadow):
                self._shadow = []

    def verified(self, drafted: int, accepted: int) -> None:
        """A verify checked ``drafted`` guessed tokens and found the first ``accepted`` right."""
        self.stats.record(drafted, accepted)
        for offset in range(accepted):
            self._learn(self.matched + offset, True)
        if accepted < drafted:
            self._learn(self.matched + accepted, False)
