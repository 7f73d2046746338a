"""Sampling options and the llama.cpp sampler chain built from them."""

from __future__ import annotations

import ctypes
import math
import random
import re
from typing import Any

from llmrun.engine.native import NATIVE_LOG, llama_cpp
from llmrun.errors import UsageError
from llmrun.generation import SamplingParams


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
# Its whitespace is one optional space; llama.cpp's (as here) also lets a model lay JSON out on lines, as most
# models were trained to: a token the grammar refuses costs a second pick over the whole vocabulary, so a grammar
# that refuses the model's every newline makes constrained output about half as fast.
_SPACE_RULE = r'space ::= | " " | "\n"{1,2} [ \t]{0,20}'


def json_schema_grammar(schema: dict[str, Any] | None) -> str:
    """GBNF for JSON matching ``schema`` (any JSON object for None), by llama.cpp's JSON-schema converter."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF if schema is None else json_schema_rules(schema)


def json_schema_rules(schema: dict[str, Any], name: str = "root", *, compact: bool = False) -> str:
    """GBNF rules for JSON matching ``schema``, the top one called ``name`` (to use inside a larger grammar).

    ``compact``: JSON on one line (at most a space between tokens), as tool-call arguments are sent.
    """
    from llama_cpp.llama_grammar import SchemaConverter

    try:
        converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)  # type: ignore[no-untyped-call]
        converter.visit(converter.resolve_refs(schema, "schema"), "" if name == "root" else name)  # type: ignore[no-untyped-call]
        grammar = str(converter.format_grammar())  # type: ignore[no-untyped-call]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, NotImplementedError) as error:
        raise UsageError(f"the JSON schema cannot be turned into a grammar: {error}", "simplify the schema") from None
    grammar = re.sub(r"^char ::= .*$", lambda _: _STRICT_CHAR_RULE, grammar, flags=re.MULTILINE)
    return grammar if compact else re.sub(r"^space ::= .*$", lambda _: _SPACE_RULE, grammar, flags=re.MULTILINE)


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
        # The grammar stays out of the chain: checking every token of the vocabulary against it at each
        # step halves the speed. As llama.cpp's own sampler does, the chain picks a token, the grammar
        # checks that one, and only when it refuses it is the pick made again with the grammar first
        # (over the whole vocabulary, so that top-k cannot keep none of the tokens it allows).
        self.grammar: Any = None
        if params.grammar is not None:
            self.grammar = grammar_sampler(vocab, params.grammar, params.grammar_triggers)
            self._candidates = _Candidates(n_vocab)
            # The allowed tokens the chain must see among the likeliest for its pick to be the one it would
            # make over the whole vocabulary: the best (greedy), or the top k (sampling; None: all tokens).
            self._needed: int | None = 1 if params.temperature <= 0 else (params.top_k or None)
        # top-k first: the penalty sampler is slow over a whole vocabulary (llama.h says so), and
        # penalties only lower logits, so the tokens they could promote are already among the top k.
        if params.top_k > 0:
            add(self.handle, llama_cpp.llama_sampler_init_top_k(params.top_k))
        penalized = params.repeat_penalty != 1.0 or params.presence_penalty or params.frequency_penalty
        # Only the penalty sampler remembers the tokens it is told were chosen (see sample()).
        self._stateless = not (penalized and params.repeat_last_n != 0)
        if not self._stateless:
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
        if self.grammar is None:
            return int(llama_cpp.llama_sampler_sample(self.handle, ctx, batch_index))
        # llama.cpp picks (in C, the cheapest way there is), the grammar checks the pick: most often it allows
        # it. A refused pick has been accepted into the chain: one that remembers picks (penalties) goes back
        # to a copy made before; then the chain picks again among the allowed tokens, as sample_constrained.
        backup = None if self._stateless else llama_cpp.llama_sampler_clone(self.handle)
        token = int(llama_cpp.llama_sampler_sample(self.handle, ctx, batch_index))
        candidates = self._candidates
        if candidates.allows(self.grammar, token):
            if backup is not None:
                llama_cpp.llama_sampler_free(backup)
        else:
            if backup is not None:
                llama_cpp.llama_sampler_free(self.handle)
                self.handle = backup
            candidates.load(llama_cpp.llama_get_logits_ith(ctx, batch_index))
            token = candidates.pick_allowed(self.handle, self.grammar, self._needed)
            llama_cpp.llama_sampler_accept(self.handle, token)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        return token

    def sample_constrained(self, logits: Any) -> int:
        """Sample (and accept) a token the grammar allows from ``logits`` (a float pointer, n_vocab long)."""
        assert self.grammar is not None
        candidates = self._candidates
        candidates.load(logits)
        token = candidates.pick(self.handle)
        if not candidates.allows(self.grammar, token):
            token = candidates.pick_allowed(self.handle, self.grammar, self._needed)
        llama_cpp.llama_sampler_accept(self.grammar, token)
        llama_cpp.llama_sampler_accept(self.handle, token)
        return token

    def close(self) -> None:
        if self.handle is not None:
            llama_cpp.llama_sampler_free(self.handle)
            self.handle = None
        if self.grammar is not None:
            llama_cpp.llama_sampler_free(self.grammar)
            self.grammar = None


# How many of the likeliest tokens the grammar is asked about when it refuses the chain's pick, in turn, before
# the whole vocabulary (which takes it milliseconds).
LIKELIEST = (256, 4096)


class _Candidates:
    """A vocabulary's worth of llama.cpp token candidates, refilled from logits with numpy."""

    def __init__(self, n_vocab: int) -> None:
        import numpy as np

        self.n_vocab = n_vocab
        self.buffer = (llama_cpp.llama_token_data * n_vocab)()
        self.view = np.ctypeslib.as_array(self.buffer)
        # Every token in order with probability 0: copied whole over the buffer (samplers sort and cut it in
        # place), then the logits written in; one copy and one strided write, far cheaper than three.
        self.blank = np.zeros(n_vocab, dtype=self.view.dtype)
        self.blank["id"] = np.arange(n_vocab, dtype=np.int32)
        self.array = llama_cpp.llama_token_data_array(self.buffer, n_vocab, -1, False)
        self.pointer = ctypes.byref(self.array)
        self.one = (llama_cpp.llama_token_data * 1)()
        self.one_array = llama_cpp.llama_token_data_array(self.one, 1, -1, False)
        self.one_pointer = ctypes.byref(self.one_array)
        self._logits: Any = None

    def load(self, logits_pointer: Any) -> None:
        import numpy as np

        self._logits = np.ctypeslib.as_array(logits_pointer, shape=(self.n_vocab,))
        self.reload()

    def reload(self) -> None:
        """Every token again, with its logit."""
        ctypes.memmove(self.buffer, self.blank.ctypes.data, self.blank.nbytes)
        self.view["logit"] = self._logits
        self.array.size, self.array.selected, self.array.sorted = self.n_vocab, -1, False

    def pick(self, chain: Any) -> int:
        llama_cpp.llama_sampler_apply(chain, self.pointer)
        return int(self.buffer[self.array.selected].id)

    def pick_allowed(self, chain: Any, grammar: Any, needed: int | None) -> int:
        """The chain's pick among the tokens the grammar allows.

        The grammar is first asked about the likeliest tokens only (256, then 4,096); when
        ``needed`` of them are allowed, the chain's pick among them is the one it would make
        among all, as every token left out is less likely. Else it is asked about all.
        """
        import numpy as np

        if needed is not None:
            for count in LIKELIEST:
                if not needed <= count < self.n_vocab:
                    continue
                likeliest = np.argpartition(self._logits, -count)[-count:]
                self.view["id"][:count] = likeliest
                self.view["logit"][:count] = self._logits[likeliest]
                self.view["p"][:count] = 0.0
                self.array.size, self.array.selected, self.array.sorted = count, -1, False
                llama_cpp.llama_sampler_apply(grammar, self.pointer)
                if np.isfinite(self.view["logit"][:count]).sum() >= needed:
                    return self.pick(chain)
        self.reload()
        llama_cpp.llama_sampler_apply(grammar, self.pointer)
        return self.pick(chain)

    def allows(self, grammar: Any, token: int) -> bool:
        one = self.one[0]
        one.id, one.logit, one.p = token, 0.0, 0.0  # type: ignore[assignment]
        self.one_array.size, self.one_array.selected, self.one_array.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(grammar, self.one_pointer)
        return math.isfinite(one.logit)
