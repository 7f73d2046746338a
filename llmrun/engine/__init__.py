"""The only package that imports llama_cpp. Import it lazily: loading the native library is slow."""

from llmrun.engine.engine import Engine, Generation, LoadOptions
from llmrun.engine.scheduler import FinishReason, GenerationRequest
from llmrun.generation import GenerationResult, SamplingParams

__all__ = [
    "Engine",
    "FinishReason",
    "Generation",
    "GenerationRequest",
    "GenerationResult",
    "LoadOptions",
    "SamplingParams",
]
