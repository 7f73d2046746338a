"""llmrun: a local-first command-line model runner on llama.cpp."""

__version__ = "0.1.0"
