"""How big a context fits in memory. A pure function: the numbers come from the caller."""

from __future__ import annotations

from dataclasses import dataclass

from llmrun.settings import KV_CACHE_MEMORY_SHARE, MIN_AUTO_CONTEXT

CONTEXT_GRANULARITY = 256


@dataclass(frozen=True)
class ContextChoice:
    """The context size chosen for a model, and why, in words for ``--verbose``."""

    n_ctx: int
    reason: str


def choose_context_size(
    requested: int | None,
    n_ctx_train: int,
    kv_bytes_per_token: int,
    available_bytes: int | None,
) -> ContextChoice:
    """The user's ``--ctx`` if given; else the training context, capped so the KV cache fits in memory."""
    if requested is not None:
        note = " (beyond the model's training context, quality may drop)" if requested > n_ctx_train > 0 else ""
        return ContextChoice(requested, f"context {requested} tokens as requested{note}")
    train = n_ctx_train if n_ctx_train > 0 else 4096
    if available_bytes is None or kv_bytes_per_token <= 0:
        return ContextChoice(train, f"context {train} tokens: the model's training context")
    budget_tokens = int(available_bytes * KV_CACHE_MEMORY_SHARE) // kv_bytes_per_token
    if budget_tokens >= train:
        kv_mib = train * kv_bytes_per_token / 2**20
        return ContextChoice(train, f"context {train} tokens: the model's training context (KV cache {kv_mib:.0f} MiB)")
    capped = max(MIN_AUTO_CONTEXT, budget_tokens // CONTEXT_GRANULARITY * CONTEXT_GRANULARITY)
    return ContextChoice(
        capped,
        f"context {capped} tokens: the training context {train} would need "
        f"{train * kv_bytes_per_token / 2**30:.1f} GiB of KV cache, more than half of the "
        f"{available_bytes / 2**30:.1f} GiB available (raise with --ctx)",
    )
