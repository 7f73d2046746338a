"""`llmrun serve`: the HTTP APIs (one module each) over one inference path, the model pool, metrics."""
