"""Sampling options and the llama.cpp sampler chain built from them."""

from __future__ import annotations

import ctypes
import random
import re
from dataclasses import dataclass
from typing import Any

from llmrun.engine.native import NATIVE_LOG, llama_cpp
from llmrun.errors import UsageError
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


def grammar_sampler(vocab: Any, grammar: str, triggers: tuple[str, ...] = ()) -> Any:
    """A llama.cpp grammar sampler (lazy with ``triggers``); a grammar llama.cpp cannot parse is a UsageError."""
    NATIVE_LOG.clear_errors()
    if triggers:
        patterns = (ctypes.c_char_p * len(triggers))(*(pattern.encode() for pattern in triggers))
        sampler = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
            vocab, grammar.encode(), b"root", patterns, len(triggers), None, 0
        )
    else:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        detail = NATIVE_LOG.first_error()
        raise UsageError("the grammar is not valid GBNF" + (f": {detail}" if detail else ""), "check its rules")
    return sampler


def check_grammar(vocab: Any, grammar: str, triggers: tuple[str, ...] = ()) -> None:
    """Raise UsageError unless llama.cpp accepts the grammar (before a request is queued)."""
    llama_cpp.llama_sampler_free(grammar_sampler(vocab, grammar, triggers))


# llama-cpp-python's port of the converter lets a string hold raw control characters (a newline, a tab), which
# JSON forbids; llama.cpp's own converter excludes them, as this rule does.
_STRICT_CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'


def json_schema_grammar(schema: dict[str, Any] | None) -> str:
    """GBNF for JSON matching ``schema`` (any JSON object for None), by llama.cpp's JSON-schema converter."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF if schema is None else json_schema_rules(schema)


def json_schema_rules(schema: dict[str, Any], name: str = "root") -> str:
    """GBNF rules for JSON matching ``schema``, the top one called ``name`` (to use inside a larger grammar)."""
    from llama_cpp.llama_grammar import SchemaConverter

    try:
        converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)  # type: ignore[no-untyped-call]
        converter.visit(converter.resolve_refs(schema, "schema"), "" if name == "root" else name)  # type: ignore[no-untyped-call]
        grammar = str(converter.format_grammar())  # type: ignore[no-untyped-call]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, NotImplementedError) as error:
        raise UsageError(f"the JSON schema cannot be turned into a grammar: {error}", "simplify the schema") from None
    return re.sub(r"^char ::= .*$", lambda _: _STRICT_CHAR_RULE, grammar, flags=re.MULTILINE)


class SamplerChain:
    """One sequence's sampler chain (it holds that sequence's RNG and penalty history)."""

    def __init__(self, params: SamplingParams, n_vocab: int, vocab: Any = None) -> None:
        self.seed = params.seed if params.seed is not None else random.randrange(2**32 - 1)
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.handle: Any = llama_cpp.llama_sampler_chain_init(chain_params)
        add = llama_cpp.llama_sampler_chain_add
        if params.logit_bias:
            entries = [llama_cpp.llama_logit_bias(token, bias) for token, bias in params.logit_bias]
            biases = (llama_cpp.llama_logit_bias * len(entries))(*entries)
            add(self.handle, llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), biases))
        if params.grammar is not None:
            # Before top-k: the grammar must choose among every token, or top-k may keep none it allows.
            add(self.handle, grammar_sampler(vocab, params.grammar, params.grammar_triggers))
        # top-k first: the penalty sampler is slow over a whole vocabulary (llama.h says so), and
        # penalties only lower logits, so the tokens they could promote are already among the top k.
        if params.top_k > 0:
            add(self.handle, llama_cpp.llama_sampler_init_top_k(params.top_k))
        penalized = params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        if penalized and params.repeat_last_n != 0:
            penalties = llama_cpp.llama_sampler_init_penalties(
                n_vocab, params.repeat_last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
            )
            add(self.handle, penalties)
        if params.temperature <= 0:
            add(self.handle, llama_cpp.llama_sampler_init_greedy())
            return
        if params.top_p < 1.0:
            add(self.handle, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(self.handle, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        add(self.handle, llama_cpp.llama_sampler_init_temp(params.temperature))
        add(self.handle, llama_cpp.llama_sampler_init_dist(self.seed))

    def sample(self, ctx: Any, batch_index: int) -> int:
        """Sample (and accept) a token from the logits at ``batch_index`` of the last decode."""
        return int(llama_cpp.llama_sampler_sample(self.handle, ctx, batch_index))

    def close(self) -> None:
        if self.handle is not None:
            llama_cpp.llama_sampler_free(self.handle)
            self.handle = None
