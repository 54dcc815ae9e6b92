"""Prometheus metrics with a registry per app (tests build many apps), and a pure ASGI timing middleware."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The methods of RFC 9110 and PATCH. Any other token from the request line is counted as "other": a label taken
# verbatim from the client would let it create one series per made-up method.
STANDARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})


def method_label(method: str) -> str:
    """The request's method as a metrics label: itself when standard, else "other"."""
    return method if method in STANDARD_METHODS else "other"


class Metrics:
    """Requests and latency per route, bytes ingested, merges, verification failures."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ckpt_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "ckpt_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.bytes_ingested = Counter("ckpt_bytes_ingested", "Bytes of newly stored artifacts", registry=self.registry)
        self.merges = Counter("ckpt_merges", "Merge requests by outcome", ["outcome"], registry=self.registry)
        self.verification_failures = Counter(
            "ckpt_verification_failures", "Failed strict verifications", registry=self.registry
        )
        # Set to read each pool's count when the pools exist (`create_app`).
        self.heavy_admitted = Gauge(
            "ckpt_heavy_requests_admitted",
            "Requests admitted to a heavy-work pool (receiving, queued or running)",
            ["pool"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route: Any = scope.get("route")
            # The route template, never the raw path: ids and names would explode label cardinality.
            name = getattr(route, "path", None) or "unmatched"
            method = method_label(scope.get("method", ""))
            self.metrics.requests.labels(method, name, str(status)).inc()
            self.metrics.latency.labels(method, name).observe(time.perf_counter() - start)
