"""The gateway's Prometheus metrics, on their own registry and port (`metrics_listen`).

Per request: counted and timed once, where the request ends (exchange.Exchange). Fleet: read from
the heartbeats in the FleetView at scrape time, so they are as fresh as the last heartbeat.
Label values are bounded: `model` is always a catalogue id or a model some node reports
(routes resolve the client's name first), never raw client input.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cortex.placement.fleet import FleetView
from cortex.protocol.messages import Heartbeat, ModelState

# Seconds: from a few ms (cached, tiny models) to minutes (long generations, cold loads).
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Between two tokens: ~1 ms (a small model on a big GPU) to ~1 s (a big model on a CPU).
_INTER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
_MB = 1024 * 1024
_HEARTBEAT_LAG = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
_DECISION = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cortex_requests",
            "Requests by outcome (HTTP status; 499: the client left).",
            ["model", "node", "api", "status"],
            registry=r,
        )
        self.heartbeat_lag = Histogram(
            "cortex_heartbeat_lag_seconds",
            "A heartbeat's sending (by its node's clock) to its entering this gateway's view: how fresh "
            "routing is (clock skew between hosts included).",
            buckets=_HEARTBEAT_LAG,
            registry=r,
        )
        self.decisions = Histogram(
            "cortex_routing_decision_seconds",
            "Time to decide where a job goes (`route`: ranking the holders of its model) or where a model "
            "that is not loaded goes (`place`: planning over every node): work that grows with the fleet.",
            ["decision"],
            buckets=_DECISION,
            registry=r,
        )
        self.moved = Counter(
            "cortex_jobs_moved",
            "Answers that went on on another node because theirs was lost (`lost`) or fell silent (`silent`).",
            ["model", "reason"],
            registry=r,
        )
        self.errors = Counter(
            "cortex_request_errors",
            "Failed requests by error code (the `code` of the error envelope).",
            ["model", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "cortex_request_duration_seconds",
            "Request latency, end to end.",
            ["model", "api"],
            buckets=_LATENCY,
            registry=r,
        )
        self.ttft = Histogram(
            "cortex_time_to_first_token_seconds",
            "Request arrival to its first generated token.",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.inter_token = Histogram(
            "cortex_inter_token_latency_seconds",
            "Gap between two streamed pieces of one answer, as sent.",
            ["model"],
            buckets=_INTER_TOKEN,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "cortex_tokens_per_second",
            "Decode rate of each request (tokens after the first / decode time).",
            ["model"],
            buckets=(1, 5, 10, 20, 40, 80, 160, 320, 640, 1280),
            registry=r,
        )
        self.prompt_tokens = Counter("cortex_prompt_tokens", "Prompt tokens.", ["model"], registry=r)
        self.prompt_cached_tokens = Counter(
            "cortex_prompt_cached_tokens",
            "Prompt tokens the node read from its prefix cache, by node (a node's hit rate is this over "
            "cortex_prompt_node_tokens).",
            ["model", "node"],
            registry=r,
        )
        self.prompt_node_tokens = Counter(
            "cortex_prompt_node_tokens", "Prompt tokens, by the node that ran them.", ["model", "node"], registry=r
        )
        self.completion_tokens = Counter("cortex_completion_tokens", "Generated tokens.", ["model"], registry=r)
        self.queue_wait = Histogram(
            "cortex_queue_wait_seconds",
            "Time a job waited in its node's queue before its first forward pass.",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.in_flight = Gauge("cortex_in_flight_requests", "Requests being served.", registry=r)
        # Per API key (its configured name; bounded by the config), for who-used-what accounting.
        self.key_requests = Counter(
            "cortex_key_requests", "Requests per API key, by outcome.", ["key", "model", "status"], registry=r
        )
        self.key_tokens = Counter(
            "cortex_key_tokens",
            "Tokens per API key (`kind`: prompt or completion).",
            ["key", "model", "kind"],
            registry=r,
        )
        self.cold_starts = Counter(
            "cortex_cold_starts", "Loads this gateway started for a request.", ["model"], registry=r
        )
        self.evictions = Counter(
            "cortex_evictions", "Models this gateway evicted, by strategy.", ["reason"], registry=r
        )

    def heartbeat_seen(self, heartbeat: Heartbeat) -> None:
        self.heartbeat_lag.observe(max(time.time() - heartbeat.sent_at, 0.0))

    def watch_fleet(self, fleet: FleetView) -> Callable[[], None]:
        """Reports the fleet's gauges from `fleet` at each scrape; returns a function that stops it."""
        collector = FleetCollector(fleet)
        self.registry.register(collector)
        return lambda: self.registry.unregister(collector)


class FleetCollector(Collector):
    """The fleet as the heartbeats describe it, at scrape time."""

    def __init__(self, fleet: FleetView) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "cortex_node_up", "1: heartbeats arrive; 0: lost (silent, or gone without a clean stop).", labels=["node"]
        )
        draining = GaugeMetricFamily("cortex_node_draining", "1 while the node stops.", labels=["node"])
        stalled = GaugeMetricFamily(
            "cortex_node_stalled", "1 while the node's running jobs make no progress (no new work).", labels=["node"]
        )
        total = GaugeMetricFamily(
            "cortex_device_memory_total_bytes", "Memory models may use.", labels=["node", "device", "kind"]
        )
        used = GaugeMetricFamily(
            "cortex_device_memory_used_bytes", "Memory in use (total less free).", labels=["node", "device", "kind"]
        )
        state = GaugeMetricFamily(
            "cortex_model_state", "1 for the state each model is in on each node.", labels=["node", "model", "state"]
        )
        memory = GaugeMetricFamily("cortex_model_memory_bytes", "Memory a model takes.", labels=["node", "model"])
        in_flight = GaugeMetricFamily(
            "cortex_model_jobs_in_flight", "Jobs on the node (running + queued).", labels=["node", "model"]
        )
        queued = GaugeMetricFamily(
            "cortex_model_jobs_queued", "Jobs waiting for a batch slot.", labels=["node", "model"]
        )
        rate = GaugeMetricFamily(
            "cortex_model_tokens_per_second",
            "Tokens the node generates per second for the model, lately.",
            labels=["node", "model"],
        )
        cache = GaugeMetricFamily(
            "cortex_model_prefix_cache_tokens",
            "Tokens a model's prefix cache keeps for reuse.",
            labels=["node", "model"],
        )
        hit_rate = GaugeMetricFamily(
            "cortex_model_prefix_cache_hit_ratio",
            "Prompt tokens the node read from the model's prefix cache / its prompt tokens, since it loaded.",
            labels=["node", "model"],
        )
        live, lost = self._fleet.census()
        for name in lost:
            up.add_metric([name], 0)
        for hb in live:
            up.add_metric([hb.node], 1)
            draining.add_metric([hb.node], int(hb.draining))
            stalled.add_metric([hb.node], int(hb.stalled))
            for d in hb.devices:
                total.add_metric([hb.node, d.id, d.kind], d.total_mb * _MB)
                used.add_metric([hb.node, d.id, d.kind], (d.total_mb - d.free_mb) * _MB)
            for m in hb.models:
                for s in ModelState:
                    state.add_metric([hb.node, m.id, s.value], int(m.state is s))
                memory.add_metric([hb.node, m.id], m.memory_mb * _MB)
                in_flight.add_metric([hb.node, m.id], m.in_flight)
                queued.add_metric([hb.node, m.id], m.queued)
                rate.add_metric([hb.node, m.id], m.tokens_per_s)
                if m.prefix_cache is not None:
                    cache.add_metric([hb.node, m.id], m.prefix_cache.tokens)
                    hit_rate.add_metric([hb.node, m.id], m.prefix_cache.hit_rate)
        yield from (up, draining, stalled, total, used, state, memory, in_flight, queued, rate, cache, hit_rate)
