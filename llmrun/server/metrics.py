"""Prometheus metrics of a server (``GET /metrics``), in a registry of its own."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from llmrun.server.inference import Usage
    from llmrun.server.pool import ModelPool
    from llmrun.server.upstream import Upstreams

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_GAP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _PoolCollector(Collector):
    """Read at scrape time: what is loaded, how busy, and the prefix cache."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        models = list(self.pool.models.values())
        loaded = GaugeMetricFamily("llmrun_models_loaded", "Models loaded now.")
        loaded.add_metric([], len(models))
        busy = GaugeMetricFamily("llmrun_slots_busy", "Sequence slots generating now.", labels=["model"])
        slots = GaugeMetricFamily("llmrun_slots", "Sequence slots of a loaded model.", labels=["model"])
        queued = GaugeMetricFamily("llmrun_queue_depth", "Requests waiting for a free slot.", labels=["model"])
        hits = CounterMetricFamily(
            "llmrun_prefix_cache_hit_tokens",
            "Prompt tokens found in the KV cache (own slot or copied from another) instead of evaluated.",
        )
        saved_bytes = GaugeMetricFamily(
            "llmrun_host_cache_bytes", "KV caches of slots saved in host memory (serve --cache-ram).", labels=["model"]
        )
        saved = GaugeMetricFamily(
            "llmrun_host_cache_entries", "Slots' KV caches saved in host memory, for their next turn.", labels=["model"]
        )
        hit_total = self.pool.prefix_hit_tokens_unloaded
        for model in models:
            scheduler = model.engine.scheduler
            busy.add_metric([model.name], model.worker.busy_slots)
            slots.add_metric([model.name], scheduler.n_slots)
            queued.add_metric([model.name], max(0, model.in_flight - model.worker.busy_slots))
            hit_total += scheduler.prefix_hit_tokens
            if scheduler.host_cache is not None:  # read from another thread: a snapshot, as any scrape is
                saved_bytes.add_metric([model.name], scheduler.host_cache.used)
                saved.add_metric([model.name], len(scheduler.host_cache.entries))
        hits.add_metric([], hit_total)
        yield from (loaded, busy, slots, queued, hits, saved_bytes, saved)
        if self.pool.upstreams is not None:
            yield from _upstream_metrics(self.pool.upstreams)


def _upstream_metrics(upstreams: Upstreams) -> Iterator[Metric]:
    labels = ["upstream", "url"]
    healthy = GaugeMetricFamily("llmrun_upstream_healthy", "1 while a replica passes its health check.", labels=labels)
    in_flight = GaugeMetricFamily("llmrun_upstream_in_flight", "Requests a replica is answering now.", labels=labels)
    sent = CounterMetricFamily("llmrun_upstream_requests", "Requests sent to a replica.", labels=labels)
    failed = CounterMetricFamily(
        "llmrun_upstream_failures", "Requests a replica failed (those not yet answered go to the next).", labels=labels
    )
    for upstream in upstreams.upstreams:
        for replica in upstream.replicas:
            key = [upstream.name, replica.url]
            healthy.add_metric(key, float(replica.healthy))
            in_flight.add_metric(key, replica.in_flight)
            sent.add_metric(key, replica.requests)
            failed.add_metric(key, replica.failures)
    yield from (healthy, in_flight, sent, failed)


class Metrics:
    """The counters and histograms a server updates as it serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "llmrun_requests", "HTTP requests by route and status.", ["route", "status"], registry=registry
        )
        self.prompt_tokens = Counter("llmrun_prompt_tokens", "Prompt tokens.", ["model"], registry=registry)
        self.generated_tokens = Counter("llmrun_generated_tokens", "Generated tokens.", ["model"], registry=registry)
        self.drafted_tokens = Counter(
            "llmrun_draft_tokens", "Tokens guessed by speculative decoding and verified.", ["model"], registry=registry
        )
        self.accepted_tokens = Counter(
            "llmrun_draft_accepted_tokens", "Guessed tokens that were right.", ["model"], registry=registry
        )
        self.time_to_first_token = Histogram(
            "llmrun_time_to_first_token_seconds",
            "From a request's arrival at its model to its first token.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "llmrun_inter_token_latency_seconds",
            "Mean time between tokens of a request.",
            ["model"],
            buckets=TOKEN_GAP_BUCKETS_S,
            registry=registry,
        )

    def watch(self, pool: ModelPool) -> None:
        self.registry.register(_PoolCollector(pool))

    def observe_generation(self, model: str, usage: Usage, ttft_s: float, generation_s: float) -> None:
        completion_tokens = usage.completion_tokens
        self.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        self.generated_tokens.labels(model).inc(completion_tokens)
        if usage.drafted_tokens:
            self.drafted_tokens.labels(model).inc(usage.drafted_tokens)
            self.accepted_tokens.labels(model).inc(usage.accepted_tokens)
        if completion_tokens > 0:
            self.time_to_first_token.labels(model).observe(ttft_s)
        if completion_tokens > 1:
            self.inter_token_latency.labels(model).observe(generation_s / (completion_tokens - 1))
