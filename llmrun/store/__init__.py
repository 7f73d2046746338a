"""Getting models onto disk and finding them again: the store, the Hub, the PyPI fallback, the catalog,
GGUF reading and quantization names. No llama_cpp and no rich here: store commands stay fast."""
