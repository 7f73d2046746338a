"""The Engine: a model, one llama.cpp context sized for it, and the scheduler that generates."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmrun.engine.model import Model
from llmrun.engine.native import NATIVE_LOG, init_native, llama_cpp
from llmrun.engine.resources import ContextChoice, choose_context_size
from llmrun.engine.scheduler import FinishReason, GenerationRequest, Scheduler, Sequence
from llmrun.engine.speculation import SpeculationOptions
from llmrun.engine.template import render_chat
from llmrun.errors import LlmrunError, ModelLoadError, PromptTooLong, UsageError
from llmrun.generation import GenerationResult
from llmrun.machine import available_memory_bytes, physical_cores
from llmrun.settings import KV_CACHE_TYPES

if TYPE_CHECKING:
    from llmrun.engine.draft import DraftModel

DEFAULT_N_BATCH = 2048
DEFAULT_N_UBATCH = 512
EMBEDDING_MAX_CONTEXT = 2048  # one ubatch holds a whole input: its compute buffer grows with the square


def _ggml_type(name: str) -> int:
    """A KV cache type name (as llama.cpp's --cache-type-k takes it) to its ggml_type number."""
    if name.lower() not in KV_CACHE_TYPES:
        raise UsageError(f"unknown KV cache type {name!r}", f"use one of {', '.join(KV_CACHE_TYPES)}")
    return int(getattr(llama_cpp, f"GGML_TYPE_{name.upper()}"))


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model and size its context."""

    n_ctx: int | None = None  # None: training context, capped to fit memory
    n_threads: int | None = None  # None: physical cores
    gpu_layers: str | int = "auto"
    n_slots: int = 1
    n_batch: int = DEFAULT_N_BATCH
    n_ubatch: int = DEFAULT_N_UBATCH
    cache_type_k: str = "f16"  # a ggml type name: f16, q8_0, q4_0, ...
    cache_type_v: str = "f16"
    flash_attn: bool | None = None  # None: llama.cpp decides (auto)
    host_cache_mb: int = 0  # slots' KV caches kept in host memory when their slot is taken (see HostCache)
    speculation: SpeculationOptions = SpeculationOptions()
    rpc: tuple[str, ...] = ()  # llama.cpp RPC workers (host:port) that take the model's layers
    debug: bool = False


class Generation:
    """A running generation: iterate for text as it is produced, then read ``result``."""

    def __init__(self, scheduler: Scheduler, sequence: Sequence) -> None:
        self._scheduler = scheduler
        self._sequence = sequence

    def __iter__(self) -> Iterator[str]:
        sequence = self._sequence
        try:
            while not sequence.finished:
                self._scheduler.step()
                yield from sequence.drain_text()
            yield from sequence.drain_text()
        finally:
            # Interrupted (Ctrl-C, a closed pipe): give the slot back.
            if not sequence.finished:
                self._scheduler.cancel(sequence)
        if sequence.error is not None:
            raise sequence.error

    @property
    def result(self) -> GenerationResult:
        sequence = self._sequence
        timings = sequence.timings
        end = timings.finished or timings.last_token or timings.created
        first = timings.first_token or end
        return GenerationResult(
            text=sequence.text,
            finish_reason=(sequence.finish_reason or FinishReason.CANCELLED).value,
            prompt_tokens=sequence.prompt_len,
            completion_tokens=len(sequence.completion_tokens),
            cached_tokens=sequence.n_cached,
            context_full=sequence.context_full,
            time_to_first_token_s=first - timings.created,
            generation_s=(timings.last_token or first) - first,
            total_s=end - timings.created,
            stop_sequence=sequence.stop_matcher.matched,
            drafted_tokens=sequence.guesser.stats.drafted if sequence.guesser else 0,
            accepted_tokens=sequence.guesser.stats.accepted if sequence.guesser else 0,
        )


@dataclass(frozen=True)
class ChatText:
    """A conversation as prompt text: rendered by the model's template (special tokens parsed), or plain."""

    text: str
    templated: bool


class Engine:
    """One model loaded with one context of ``n_slots`` sequences."""

    def __init__(self, model_path: Path, options: LoadOptions = LoadOptions()) -> None:
        init_native(options.debug)
        if options.n_ctx is not None and options.n_ctx < 16:
            raise UsageError(f"--ctx {options.n_ctx} is too small", "give at least 16 tokens, or leave it out")
        if options.n_threads is not None and options.n_threads < 1:
            raise UsageError(
                f"--threads {options.n_threads} must be at least 1", "leave it out to use every physical core"
            )
        if options.rpc:
            from llmrun.engine.rpc import add_workers

            add_workers(options.rpc)
        self.model = Model(model_path, options.gpu_layers)
        self.context_choice: ContextChoice = choose_context_size(
            options.n_ctx,
            self.model.n_ctx_train,
            self.model.kv_bytes_per_token * options.n_slots,
            available_memory_bytes(),
        )
        self.n_threads = options.n_threads or physical_cores()
        self.speculation = options.speculation
        self.ctx: Any = self._create_context(options)
        # llama.cpp pads the context (to 256); the limit we enforce is the size chosen, so --ctx means what it says.
        allocated_per_slot = int(llama_cpp.llama_n_ctx(self.ctx)) // options.n_slots
        seq_capacity = min(self.context_choice.n_ctx, allocated_per_slot)
        self.drafter: DraftModel | None = None
        if options.speculation.draft is not None:
            from llmrun.engine.draft import DraftModel

            try:
                self.drafter = DraftModel(
                    options.speculation.draft, self.model, options.n_slots, seq_capacity, self.n_threads,
                    options.gpu_layers,
                )  # fmt: skip
            except LlmrunError:
                llama_cpp.llama_free(self.ctx)
                self.model.close()
                raise
        self._one_token = (llama_cpp.llama_token * 1)()
        self._one_token_batch = llama_cpp.llama_batch_get_one(self._one_token, 1)
        self.scheduler = Scheduler(
            self.model,
            self.ctx,
            n_slots=options.n_slots,
            seq_capacity=seq_capacity,
            n_batch=options.n_batch,
            n_ubatch=options.n_ubatch,
            unified_kv=False,
            host_cache_bytes=options.host_cache_mb * 1024 * 1024,
            speculation=options.speculation,
            drafter=self.drafter,
            # Without flash attention (serve --deterministic), a prompt is evaluated only in its own decodes.
            group_prompts=options.flash_attn is not False,
        )
        self._embedding_ctx: Any = None

    def _create_context(self, options: LoadOptions) -> Any:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.context_choice.n_ctx * options.n_slots
        params.n_batch = options.n_batch
        params.n_ubatch = min(options.n_ubatch, options.n_batch)
        params.n_seq_max = options.n_slots
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        params.type_k = _ggml_type(options.cache_type_k)
        params.type_v = _ggml_type(options.cache_type_v)
        params.flash_attn_type = {None: -1, False: 0, True: 1}[options.flash_attn]  # llama_flash_attn_type
        params.no_perf = True
        # A KV cache per slot, not one shared by all: in a shared cache the cells of concurrent
        # sequences interleave, attention sums over them in a different order, and a greedy answer
        # could change with the company a request keeps. Per slot, it is the same alone or among 8.
        # A prefix is then shared by copying a slot's cache (a memcpy), not by sharing cells.
        params.kv_unified = False
        NATIVE_LOG.clear_errors()
        ctx = llama_cpp.llama_init_from_model(self.model.handle, params)
        if not ctx:
            detail = NATIVE_LOG.first_error()
            self.model.close()
            raise ModelLoadError(
                f"llama.cpp could not create a context of {self.context_choice.n_ctx} tokens"
                + (f": {detail}" if detail else ""),
                "try a smaller --ctx, or other KV cache options",
            )
        return ctx

    @property
    def seq_capacity(self) -> int:
        """Tokens one sequence may hold: prompt plus generated text."""
        return self.scheduler.seq_capacity

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, **extra: Any
    ) -> list[int]:
        """Tokens for a conversation in the model's own chat template (plain text when it has none)."""
        return self.chat_tokens(self.chat_text(messages, tools, **extra))

    def chat_text(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, **extra: Any
    ) -> ChatText:
        """A conversation rendered by the model's chat template; ``extra`` keywords become template
        variables (``enable_thinking``...). Without a template, the messages' text one after another."""
        model = self.model
        if not model.chat_template:
            return ChatText("\n\n".join(str(message.get("content") or "") for message in messages), templated=False)
        rendered = render_chat(
            model.chat_template,
            messages,
            bos_token=model.token_text(model.bos_token),
            eos_token=model.token_text(model.eos_token),
            tools=tools,
            **extra,
        )
        return ChatText(rendered, templated=True)

    def chat_tokens(self, chat: ChatText) -> list[int]:
        model = self.model
        if not chat.templated:
            return model.tokenize(chat.text, add_special=True, parse_special=False)
        bos_text = model.token_text(model.bos_token)
        # A template that writes BOS itself must not get a second one from the tokenizer.
        add_special = not (bos_text and chat.text.startswith(bos_text))
        return model.tokenize(chat.text, add_special=add_special, parse_special=True)

    def raw_prompt(self, text: str) -> list[int]:
        """Tokens for plain-completion text."""
        return self.model.tokenize(text, add_special=True, parse_special=True)

    def check_fits(self, prompt_tokens: list[int]) -> None:
        """Raise PromptTooLong unless the prompt leaves room for at least one generated token."""
        if len(prompt_tokens) < self.seq_capacity:
            return
        train = self.model.n_ctx_train
        hint = (
            f"raise it with --ctx (the model was trained on {train})"
            if self.seq_capacity < train
            else f"shorten the prompt (the model was trained on {train}; --ctx can go beyond that at lower quality)"
        )
        raise PromptTooLong(
            f"the prompt is {len(prompt_tokens)} tokens but the context is {self.seq_capacity} tokens", hint
        )

    def generate(self, request: GenerationRequest) -> Generation:
        """Start generating; iterate the result for text."""
        if request.max_tokens is not None and request.max_tokens < 1:
            raise UsageError(f"max tokens must be at least 1, not {request.max_tokens}", "leave it out for no limit")
        self.check_fits(list(request.prompt_tokens))
        return Generation(self.scheduler, self.scheduler.submit(request))

    # -- embeddings ------------------------------------------------------------------

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One L2-normalised embedding per token list: the model's own pooling, or the mean of its tokens."""
        import numpy as np

        ctx = self._embedding_context()
        capacity = int(llama_cpp.llama_n_ctx(ctx))
        encoder_only = bool(llama_cpp.llama_model_has_encoder(self.model.handle)) and not bool(
            llama_cpp.llama_model_has_decoder(self.model.handle)
        )
        vectors = []
        for tokens in inputs:
            if not tokens:
                raise UsageError("an input to embed is empty", "give some text")
            if len(tokens) > capacity:
                raise PromptTooLong(
                    f"an input to embed is {len(tokens)} tokens but at most {capacity} fit", "shorten or split it"
                )
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
            try:
                for index, token in enumerate(tokens):
                    batch.token[index] = token
                    batch.pos[index] = index
                    batch.n_seq_id[index] = 1
                    batch.seq_id[index][0] = 0
                    batch.logits[index] = True
                batch.n_tokens = len(tokens)
                status = (llama_cpp.llama_encode if encoder_only else llama_cpp.llama_decode)(ctx, batch)
            finally:
                llama_cpp.llama_batch_free(batch)
            if status != 0:
                raise ModelLoadError(
                    f"computing an embedding failed ({status})", "run with --debug for llama.cpp's log"
                )
            pointer = llama_cpp.llama_get_embeddings_seq(ctx, 0)
            vector = np.ctypeslib.as_array(pointer, shape=(self.model.n_embd,)).astype(np.float64)
            norm = float(np.linalg.norm(vector))
            vectors.append((vector / norm if norm > 0 else vector).tolist())
        return vectors

    def _embedding_context(self) -> Any:
        """A second, small context that pools embeddings; made on first use."""
        if self._embedding_ctx is not None:
            return self._embedding_ctx
        n_ctx = min(self.seq_capacity, EMBEDDING_MAX_CONTEXT)
        for pooling in (llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED, llama_cpp.LLAMA_POOLING_TYPE_MEAN):
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
            params.n_seq_max = 1
            params.n_threads = params.n_threads_batch = self.n_threads
            params.embeddings = True
            params.pooling_type = pooling
            params.no_perf = True
            ctx = llama_cpp.llama_init_from_model(self.model.handle, params)
            if not ctx:
                raise ModelLoadError("llama.cpp could not create a context for embeddings", "try a smaller --ctx")
            if llama_cpp.llama_pooling_type(ctx) != llama_cpp.LLAMA_POOLING_TYPE_NONE:
                self._embedding_ctx = ctx
                return ctx
            llama_cpp.llama_free(ctx)  # a generative model has no pooling of its own: take the mean
        raise ModelLoadError("this model cannot produce pooled embeddings")

    # -- raw decoding, for benchmarks ---------------------------------------------

    def clear_memory(self) -> None:
        """Empty the KV cache of every sequence."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), False)
        self.scheduler.slot_tokens = [[] for _ in self.scheduler.slot_tokens]

    def decode(self, tokens: list[int]) -> None:
        """Evaluate tokens on sequence 0 after what it holds, in one ``llama_decode`` (as llama-bench does)."""
        if len(tokens) == 1:  # the generation loop: no allocation per token
            self._one_token[0] = tokens[0]
            batch = self._one_token_batch
        else:
            array = (llama_cpp.llama_token * len(tokens))(*tokens)
            batch = llama_cpp.llama_batch_get_one(array, len(tokens))
        status = llama_cpp.llama_decode(self.ctx, batch)
        if status != 0:
            raise ModelLoadError(f"llama_decode failed with {status}", "try a smaller batch, or a larger --ctx")

    def synchronize(self) -> None:
        llama_cpp.llama_synchronize(self.ctx)

    def close(self) -> None:
        self.scheduler.close()
        if self.drafter is not None:
            self.drafter.close()
            self.drafter = None
        if self._embedding_ctx is not None:
            llama_cpp.llama_free(self._embedding_ctx)
            self._embedding_ctx = None
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        self.model.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
