"""Load tests of any OpenAI-compatible server: concurrent streaming chat requests, latency percentiles.

Each worker thread sends ``/v1/chat/completions`` requests with ``stream: true`` and a fixed
``max_tokens``; every streamed content chunk counts as a token (one per token on llama.cpp
servers). Time to first token is from sending the request to the first content chunk;
inter-token latency is the gap between consecutive chunks. Standard library only.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from llmrun.errors import LlmrunError, UsageError

DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def api_base(url: str) -> str:
    """``http://host:port``, ``…/v1`` or ``…/v1/`` to ``http://host:port/v1``."""
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"{url!r} is not an http(s) URL", "e.g. --server http://127.0.0.1:8080")
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def _request(url: str, body: dict[str, Any] | None, api_key: str | None, timeout: float) -> Any:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    return urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout)


def first_model(base: str, api_key: str | None, timeout: float = 10) -> str:
    """The server's first model id (``GET /v1/models``); also proves the server is there."""
    try:
        with _request(f"{base}/models", None, api_key, timeout) as response:
            models = json.load(response).get("data") or []
    except urllib.error.HTTPError as error:
        raise LlmrunError(
            f"{base}/models answered {error.code} {error.reason}", "check the URL and --api-key"
        ) from None
    except (OSError, ValueError) as error:
        raise LlmrunError(f"cannot reach an OpenAI-compatible server at {base}: {error}", "is it running?") from None
    if not models:
        raise LlmrunError(f"{base}/models lists no model", "give one with --model")
    return str(models[0]["id"])


@dataclass
class _Sample:
    ok: bool
    tokens: int = 0
    ttft_s: float = 0.0
    gaps_s: list[float] | None = None


def _one_request(base: str, model: str, max_tokens: int, prompt: str, api_key: str | None, timeout: float) -> _Sample:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0.8,
        "seed": 1,
    }
    start = time.perf_counter()
    last = start
    tokens = 0
    ttft = 0.0
    gaps: list[float] = []
    try:
        with _request(f"{base}/chat/completions", body, api_key, timeout) as response:
            for raw in response:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    break
                choices = json.loads(payload).get("choices") or [{}]
                if "content" not in (choices[0].get("delta") or {}):
                    continue
                now = time.perf_counter()
                if tokens == 0:
                    ttft = now - start
                else:
                    gaps.append(now - last)
                last = now
                tokens += 1
    except (OSError, ValueError):
        return _Sample(ok=False)
    return _Sample(ok=tokens > 0, tokens=tokens, ttft_s=ttft, gaps_s=gaps)


def _percentile(values: list[float], percent: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(percent / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass(frozen=True)
class LoadResult:
    server: str
    model: str
    concurrency: int
    requests: int
    errors: int
    max_tokens: int
    duration_s: float
    output_tokens: int
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p95_ms: float
    itl_p99_ms: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_load(
    base: str, model: str, concurrency: int, requests: int, max_tokens: int,
    prompt: str = DEFAULT_PROMPT, api_key: str | None = None, timeout: float = 300,
) -> LoadResult:  # fmt: skip
    """``requests`` requests through ``concurrency`` workers; aggregate throughput and latency percentiles."""
    samples: list[_Sample] = []
    lock = threading.Lock()
    remaining = [requests]

    def worker() -> None:
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            sample = _one_request(base, model, max_tokens, prompt, api_key, timeout)
            with lock:
                samples.append(sample)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    duration = time.perf_counter() - start
    good = [sample for sample in samples if sample.ok]
    ttfts = [sample.ttft_s * 1000 for sample in good]
    gaps = [gap * 1000 for sample in good for gap in sample.gaps_s or []]
    tokens = sum(sample.tokens for sample in good)
    return LoadResult(
        server=base, model=model, concurrency=concurrency, requests=len(samples), errors=len(samples) - len(good),
        max_tokens=max_tokens, duration_s=duration, output_tokens=tokens, tokens_per_s=tokens / duration,
        requests_per_s=len(good) / duration,
        ttft_p50_ms=_percentile(ttfts, 50), ttft_p95_ms=_percentile(ttfts, 95), ttft_p99_ms=_percentile(ttfts, 99),
        itl_p50_ms=statistics.median(gaps) if gaps else 0.0, itl_p95_ms=_percentile(gaps, 95),
        itl_p99_ms=_percentile(gaps, 99),
    )  # fmt: skip
