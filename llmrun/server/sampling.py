"""Sampling options from any API's fields: what a request leaves out takes llmrun's defaults (as ``run`` does)."""

from __future__ import annotations

from typing import Any

from llmrun.generation import SamplingParams


def sampling_from(**fields: Any) -> SamplingParams:
    """``SamplingParams`` with the given fields; None means the default."""
    given = {key: value for key, value in fields.items() if value is not None and value != ()}
    return SamplingParams(**given, explicit=frozenset(given))
