"""Sampling options from any API's fields: what a request leaves out takes llmrun's defaults (as ``run`` does)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmrun.engine import SamplingParams


def sampling_from(**fields: Any) -> SamplingParams:
    """``SamplingParams`` with the given fields; None means the default."""
    from llmrun.engine import SamplingParams

    return SamplingParams(**{key: value for key, value in fields.items() if value is not None})
