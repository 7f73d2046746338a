"""The only package that imports llama_cpp. Import it lazily: loading the native library is slow."""

from llmrun.engine.engine import Engine, Generation, GenerationResult, LoadOptions
from llmrun.engine.sampling import SamplingParams
from llmrun.engine.scheduler import FinishReason, GenerationRequest

__all__ = [
    "Engine",
    "FinishReason",
    "Generation",
    "GenerationRequest",
    "GenerationResult",
    "LoadOptions",
    "SamplingParams",
]
