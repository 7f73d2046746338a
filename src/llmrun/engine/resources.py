"""What this machine offers (cores, memory) and how big a context fits in it.

Pure functions, no llama_cpp: the numbers come from the caller.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmrun.settings import KV_CACHE_MEMORY_SHARE, MIN_AUTO_CONTEXT

CONTEXT_GRANULARITY = 256


def physical_cores() -> int:
    """Physical cores (llama.cpp's own default thread count); logical CPUs where that is unknown."""
    logical = os.cpu_count() or 1
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return logical
    cores: set[tuple[str, str]] = set()
    physical_id = core_id = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical_id = value.strip()
        elif key == "core id":
            core_id = value.strip()
            cores.add((physical_id, core_id))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    return max(1, min(len(cores) or logical, usable))


def available_memory_bytes() -> int | None:
    """Memory the OS could give us now (MemAvailable on Linux), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


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
