"""Prometheus metrics, one registry in the HTTP process: the other processes report on their messages.

Names follow Prometheus conventions (prefix `embedserve_`, base units, `_total` counters,
`_seconds` durations); the only labels are `model_name` and bounded sets (endpoint, status code).
Every series exists from start-up, so the first scrape is already complete.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedserve.messages import SchedulerStats

POWERS_OF_TWO = tuple(float(2**i) for i in range(0, 17))  # 1 .. 65536
LATENCY_BUCKETS = tuple(round(1e-4 * 2**i, 6) for i in range(0, 20))  # 100 µs .. ~52 s
ENDPOINTS = (
    "/v1/embeddings",
    "/encode",
    "/v1/models",
    "/get_model_info",
    "/get_server_info",
    "/health",
    "/health_generate",
    "/metrics",
    "/flush_cache",
)
CONTENT_TYPE = CONTENT_TYPE_LATEST

# NOTE: `_created` series double the output and no dashboard reads them.
disable_created_metrics()


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        # NOTE: the launcher's warm-up request and checks come before the server is ready: not user
        # traffic, so the request series start counting once it is (the pipeline's own series count
        # the warm-up's batch, which ran).
        self.counting_requests = False
        self._series: list = []  # metrics labelled by model_name alone: created at start-up
        self.requests = Counter(
            "embedserve_requests",
            "HTTP requests by endpoint and status code.",
            ["model_name", "endpoint", "status"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "embedserve_request_latency_seconds",
            "End-to-end latency of embedding requests answered without a client error (4xx), as HTTP sees it.",
            ["model_name", "endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.inputs_per_request = self._histogram("inputs_per_request", "Inputs in each accepted request.")
        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens of answered requests.")
        self.cached_tokens = self._counter("cached_tokens", "Prompt tokens answered from a cache.")
        self.cache_hit_ratio = self._gauge("cache_hit_ratio", "Cached tokens / prompt tokens since start.")
        self.in_flight = self._gauge("in_flight_requests", "Requests accepted and not yet answered.")
        self.queue_sequences = self._gauge("queue_sequences", "Inputs waiting for the model.")
        self.queue_tokens = self._gauge("queue_tokens", "Tokens waiting for the model.")
        self.running_sequences = self._gauge("running_sequences", "Inputs at the model executor.")
        self.used_tokens = self._gauge("used_tokens", "Tokens held by the model executor.")
        self.max_total_tokens = self._gauge("max_total_tokens", "Tokens the executor may hold at once.")
        self.token_usage = self._gauge("token_usage_ratio", "used_tokens / max_total_tokens.")
        self.batch_sequences = self._histogram("batch_size_sequences", "Inputs in each forward batch.")
        self.batch_tokens = self._histogram("batch_size_tokens", "Tokens in each forward batch.")
        self.queue_wait = self._histogram(
            "queue_wait_seconds", "Time an input waited for its batch.", LATENCY_BUCKETS
        )
        self.tokenize_time = self._histogram(
            "tokenize_seconds", "Tokenizer time per request.", LATENCY_BUCKETS
        )
        self.forward_time = self._histogram(
            "forward_seconds", "Model forward time per batch.", LATENCY_BUCKETS
        )
        self.output_time = self._histogram(
            "output_seconds", "Output process time per request: encoding its response body.", LATENCY_BUCKETS
        )
        self._prompt_total = 0
        self._cached_total = 0
        self._touch_every_series()

    def _counter(self, name: str, doc: str) -> Counter:
        return self._keep(Counter(f"embedserve_{name}", doc, ["model_name"], registry=self.registry))

    def _gauge(self, name: str, doc: str) -> Gauge:
        return self._keep(Gauge(f"embedserve_{name}", doc, ["model_name"], registry=self.registry))

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...] = POWERS_OF_TWO) -> Histogram:
        return self._keep(
            Histogram(f"embedserve_{name}", doc, ["model_name"], buckets=buckets, registry=self.registry)
        )

    def _keep(self, metric):  # any of the three metric types
        self._series.append(metric)
        return metric

    def _touch_every_series(self) -> None:
        for metric in self._series:
            metric.labels(self.model_name)
        for endpoint in ("/v1/embeddings", "/encode"):
            self.request_latency.labels(self.model_name, endpoint)
            self.requests.labels(self.model_name, endpoint, "200")

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        if not self.counting_requests:
            return
        self.requests.labels(self.model_name, endpoint, str(status)).inc()
        # NOTE: a 400 or a 429 is answered in about a millisecond; timed, a misbehaving client would
        # pull the latency of the requests served down.
        if endpoint in ("/v1/embeddings", "/encode") and not 400 <= status < 500:
            self.request_latency.labels(self.model_name, endpoint).observe(seconds)

    def observe_inputs(self, count: int) -> None:
        if self.counting_requests:
            self.inputs_per_request.labels(self.model_name).observe(count)

    def observe_served(self, prompt_tokens: int, cached_tokens: int, output_seconds: float = 0.0) -> None:
        if not self.counting_requests:
            return
        self.output_time.labels(self.model_name).observe(output_seconds)
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        self.cached_tokens.labels(self.model_name).inc(cached_tokens)
        self._prompt_total += prompt_tokens
        self._cached_total += cached_tokens
        self.cache_hit_ratio.labels(self.model_name).set(self._cached_total / max(1, self._prompt_total))

    def apply(self, stats: SchedulerStats) -> None:
        name = self.model_name
        self.queue_sequences.labels(name).set(stats.waiting_seqs)
        self.queue_tokens.labels(name).set(stats.waiting_tokens)
        self.running_sequences.labels(name).set(stats.running_seqs)
        self.used_tokens.labels(name).set(stats.running_tokens)
        self.max_total_tokens.labels(name).set(stats.max_total_tokens)
        self.token_usage.labels(name).set(stats.running_tokens / max(1, stats.max_total_tokens))
        for values, histogram in (
            (stats.batch_seqs, self.batch_sequences),
            (stats.batch_tokens, self.batch_tokens),
            (stats.queue_wait_seconds, self.queue_wait),
            (stats.tokenize_seconds, self.tokenize_time),
            (stats.forward_seconds, self.forward_time),
        ):
            child = histogram.labels(name)
            for value in values:
                child.observe(value)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Counts every HTTP response by endpoint and status, and times the embedding endpoints."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"  # NOTE: bounded label values, whatever the path
        if path.startswith("/v1/models/"):
            endpoint = "/v1/models/{model}"
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.observe_request(endpoint, status, time.perf_counter() - started)
