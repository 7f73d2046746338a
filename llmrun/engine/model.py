"""A loaded model: weights, vocabulary, tokenizer and chat template."""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path
from typing import Any

from llmrun.engine.native import NATIVE_LOG, amx_notice_silenced, extra_buffers_allowed, llama_cpp, supports_gpu_offload
from llmrun.errors import ModelLoadError, UsageError

ALL_LAYERS = 999
# Special tokens that chat formats write in their output as markers: thinking (Qwen3's <think>, Magistral's
# [THINK], Seed-OSS, Command R7B, gpt-oss's harmony headers) and tool calls (Hermes, Mistral, Llama 3). Where a
# vocabulary has one as a control token, it is rendered as its text (as llama-server's "preserved tokens"
# are), so the parsers see it; other control tokens render as nothing.
OUTPUT_MARKERS = (
    "<think>", "</think>", "[THINK]", "[/THINK]", "<seed:think>", "</seed:think>",
    "<|START_THINKING|>", "<|END_THINKING|>",
    "<|channel|>", "<|message|>", "<|start|>", "<|end|>", "<|constrain|>",
    "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<|python_tag|>",
)  # fmt: skip


def resolve_gpu_layers(gpu_layers: str | int) -> int:
    """``auto`` offloads every layer when llama.cpp has a GPU backend, none on CPU builds."""
    if isinstance(gpu_layers, int):
        return gpu_layers
    value = gpu_layers.strip().lower()
    if value == "auto":
        return ALL_LAYERS if supports_gpu_offload() else 0
    if value in {"all", "max"}:
        return ALL_LAYERS
    try:
        layers = int(value)
    except ValueError:
        raise UsageError(f"--gpu-layers {gpu_layers!r} is not a number", "give a number of layers, or auto") from None
    if layers < 0:
        raise UsageError(f"--gpu-layers {layers} is negative", "give 0 or more, or auto")
    return layers


class Model:
    """Model weights and vocabulary, shared by every context created on them."""

    def __init__(self, path: Path, gpu_layers: str | int = "auto") -> None:
        self.path = Path(path)
        self.n_gpu_layers = resolve_gpu_layers(gpu_layers)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = self.n_gpu_layers
        params.use_extra_bufts = extra_buffers_allowed()
        NATIVE_LOG.clear_errors()
        with amx_notice_silenced():
            handle = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not handle:
            detail = NATIVE_LOG.first_error()
            raise ModelLoadError(
                f"llama.cpp could not load {self.path.name}" + (f": {detail}" if detail else ""),
                "run with --debug to see llama.cpp's log",
            )
        self.handle: Any = handle
        self.vocab: Any = llama_cpp.llama_model_get_vocab(handle)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(handle))
        self.n_layer = int(llama_cpp.llama_model_n_layer(handle))
        self.n_embd = int(llama_cpp.llama_model_n_embd(handle))
        self.n_head = int(llama_cpp.llama_model_n_head(handle))
        self.n_head_kv = int(llama_cpp.llama_model_n_head_kv(handle))
        self.bos_token = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos_token = int(llama_cpp.llama_vocab_eos(self.vocab))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.chat_template = self._meta_string("tokenizer.chat_template")
        self.description = self._description()
        self.size_bytes = int(llama_cpp.llama_model_size(handle))
        self.n_params = int(llama_cpp.llama_model_n_params(handle))
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._piece_cache = lru_cache(maxsize=65536)(self._token_bytes_uncached)
        self._shown_specials = self._marker_tokens()

    def _marker_tokens(self) -> frozenset[int]:
        """The control tokens among OUTPUT_MARKERS (each one token, rendered as nothing by default)."""
        found = set()
        for marker in OUTPUT_MARKERS:
            tokens = self.tokenize(marker, add_special=False, parse_special=True)
            if len(tokens) == 1 and not self._token_bytes_uncached(tokens[0], special=False):
                found.add(tokens[0])
        return frozenset(found)

    def _meta_string(self, key: str) -> str | None:
        size = llama_cpp.llama_model_meta_val_str(self.handle, key.encode(), None, 0)
        if size < 0:
            return None
        buffer = ctypes.create_string_buffer(size + 1)
        llama_cpp.llama_model_meta_val_str(self.handle, key.encode(), buffer, size + 1)
        return buffer.value.decode("utf-8", errors="replace") or None

    def _description(self) -> str:
        buffer = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.handle, buffer, 256)
        return buffer.value.decode("utf-8", errors="replace")

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes per context token at f16 (keys and values, every layer)."""
        if not self.n_head:
            return 0
        head_dim = self.n_embd // self.n_head
        return 2 * self.n_layer * self.n_head_kv * head_dim * 2

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if count < 0:
            capacity = -count
            tokens = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, capacity, add_special, parse_special)
        return list(tokens[:count])

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for; special tokens render as nothing, but for format markers."""
        return self._piece_cache(token, token in self._shown_specials)

    def _token_bytes_uncached(self, token: int, special: bool) -> bytes:
        buffer = self._piece_buffer
        size = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, special)
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, -size, 0, special)
        return buffer.raw[:size]

    def token_text(self, token: int) -> str:
        """A token's text including special tokens (for BOS/EOS strings in templates)."""
        if token < 0:
            return ""
        return bytes(llama_cpp.llama_vocab_get_text(self.vocab, token)).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        if self.handle is not None:
            llama_cpp.llama_model_free(self.handle)
            self.handle = None
