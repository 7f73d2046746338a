"""Sampling options and the llama.cpp sampler chain built from them."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from llmrun.engine.native import llama_cpp
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
    seed: int | None = None


class SamplerChain:
    """One sequence's sampler chain (it holds that sequence's RNG and penalty history)."""

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        self.seed = params.seed if params.seed is not None else random.randrange(2**32 - 1)
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self.handle: Any = llama_cpp.llama_sampler_chain_init(chain_params)
        add = llama_cpp.llama_sampler_chain_add
        # top-k first: the penalty sampler is slow over a whole vocabulary (llama.h says so), and
        # penalties only lower logits, so the tokens they could promote are already among the top k.
        if params.top_k > 0:
            add(self.handle, llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.repeat_penalty != 1.0 and params.repeat_last_n != 0:
            penalties = llama_cpp.llama_sampler_init_penalties(
                n_vocab, params.repeat_last_n, params.repeat_penalty, 0, 0
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
