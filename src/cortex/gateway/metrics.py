"""Per-request Prometheus metrics of the gateway, on their own registry and port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: from a few ms (cached, tiny models) to minutes (long generations, cold loads).
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cortex_requests", "Requests by outcome.", ["model", "node", "api", "status"], registry=r
        )
        self.duration = Histogram(
            "cortex_request_duration_seconds", "Request latency, end to end.", ["model"], buckets=_LATENCY, registry=r
        )
        self.ttft = Histogram(
            "cortex_time_to_first_token_seconds", "Time to first token.", ["model"], buckets=_LATENCY, registry=r
        )
        self.tokens_per_second = Histogram(
            "cortex_tokens_per_second",
            "Decode rate of each request.",
            ["model"],
            buckets=(1, 5, 10, 20, 40, 80, 160, 320, 640, 1280),
            registry=r,
        )
        self.prompt_tokens = Counter("cortex_prompt_tokens", "Prompt tokens.", ["model"], registry=r)
        self.completion_tokens = Counter("cortex_completion_tokens", "Generated tokens.", ["model"], registry=r)
        self.in_flight = Gauge("cortex_in_flight_requests", "Requests being served.", registry=r)
        self.cold_starts = Counter(
            "cortex_cold_starts", "Loads this gateway started for a request.", ["model"], registry=r
        )
        self.evictions = Counter(
            "cortex_evictions", "Models this gateway evicted, by strategy.", ["reason"], registry=r
        )
