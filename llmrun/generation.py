"""What a generation is asked for and what it gives: values shared by the engine, the server and the client of a
server, without llama.cpp (``run --server`` never loads it)."""

from __future__ import annotations

from dataclasses import dataclass

from llmrun.settings import (
    DEFAULT_MIN_P,
    DEFAULT_REPEAT_LAST_N,
    DEFAULT_REPEAT_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature <= 0`` means greedy."""

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    min_p: float = DEFAULT_MIN_P
    repeat_penalty: float = DEFAULT_REPEAT_PENALTY
    repeat_last_n: int = DEFAULT_REPEAT_LAST_N
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from a token already in the last repeat_last_n
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias) added to the logits before anything else
    grammar: str | None = None  # GBNF with a ``root`` rule: only text it accepts can be generated
    # Regular expressions that must match all the text so far before the grammar applies (a lazy
    # grammar: free text until, say, "<tool_call>"); it constrains from the first group's start on.
    grammar_triggers: tuple[str, ...] = ()
    # The fields a request set itself (the rest are llmrun's defaults): what an upstream engine is sent.
    explicit: frozenset[str] = frozenset()

    def logged(self) -> dict[str, object]:
        """The settings as the log keeps them."""
        return {key: value for key, value in vars(self).items() if value not in (None, ()) and key != "explicit"}


@dataclass(frozen=True)
class GenerationResult:
    """What one generation produced, with token counts and timings in seconds."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens already in the KV cache from the previous turn: not evaluated again
    context_full: bool
    time_to_first_token_s: float
    generation_s: float
    total_s: float
    stop_sequence: str | None = None  # the stop string that ended it, if one did
    drafted_tokens: int = 0  # guessed tokens verified (speculative decoding)
    accepted_tokens: int = 0  # of those, the ones that were right

    @property
    def evaluated_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def prompt_tokens_per_s(self) -> float:
        evaluated = self.evaluated_prompt_tokens
        return evaluated / self.time_to_first_token_s if self.time_to_first_token_s > 0 else 0.0

    @property
    def generation_tokens_per_s(self) -> float:
        """Decode speed: each token after the first costs one decode (the first comes with the prompt)."""
        decodes = self.completion_tokens - 1
        return decodes / self.generation_s if decodes > 0 and self.generation_s > 0 else 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model, and the likeliest alternatives."""

    token: str
    token_bytes: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...] = ()
