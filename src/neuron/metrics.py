"""The neuron's Prometheus metrics, and the token rates its heartbeat reports.

Counters and histograms are bumped where things happen (the device thread for steps and
prefills, the event loop for jobs and loads); prometheus_client is thread-safe. Gauges that
describe the node's state (memory, queues, models) come from the latest heartbeat's snapshot,
so a scrape never touches a device or the event loop.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cortex.protocol.messages import Heartbeat

_MB = 1024 * 1024
# Model loads take from under a second (a cached tiny model) to many minutes (a 70B download).
_LOAD_SECONDS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800)
_BATCH_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class TokenRates:
    """Tokens per second per model over a sliding window, from running totals.

    The device thread adds (`add`); the event loop samples (`rates`). A window of a few
    seconds smooths the step-by-step jitter without hiding a stall for long.
    """

    def __init__(self, window_s: float = 5.0) -> None:
        self._window = window_s
        self._totals: dict[str, int] = {}
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, dict[str, int]]] = deque()

    def add(self, model: str, tokens: int) -> None:
        with self._lock:
            self._totals[model] = self._totals.get(model, 0) + tokens

    def rates(self, now: float | None = None) -> dict[str, float]:
        now = time.monotonic() if now is None else now
        with self._lock:
            totals = dict(self._totals)
        self._samples.append((now, totals))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()
        then, old = self._samples[0]
        if now - then <= 0:
            return {model: 0.0 for model in totals}
        return {model: (count - old.get(model, 0)) / (now - then) for model, count in totals.items()}


class NeuronMetrics:
    def __init__(self, node: str) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        r = self.registry
        self.decode_rates = TokenRates()
        self.prefill_rates = TokenRates()
        self.batch_size = Histogram(
            "neuron_batch_size", "Jobs decoded together in one step.", ["model"], buckets=_BATCH_ROWS, registry=r
        )
        self.decode_tokens = Counter("neuron_decode_tokens", "Tokens generated.", ["model"], registry=r)
        self.prefill_tokens = Counter("neuron_prefill_tokens", "Prompt tokens prefilled.", ["model"], registry=r)
        self.jobs = Counter(
            "neuron_jobs",
            "Jobs ended, by outcome (a finish reason or an error code).",
            ["model", "outcome"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "neuron_model_load_seconds",
            "Model loads, from the request to ready (download included).",
            ["model", "outcome"],
            buckets=_LOAD_SECONDS,
            registry=r,
        )
        self._state = _StateCollector()
        r.register(self._state)

    # --- from the device thread -------------------------------------------------------------

    def stepped(self, model: str, rows: int) -> None:
        self.batch_size.labels(model).observe(rows)
        self.decode_tokens.labels(model).inc(rows)
        self.decode_rates.add(model, rows)

    def prefilled(self, model: str, tokens: int) -> None:
        self.prefill_tokens.labels(model).inc(tokens)
        self.prefill_rates.add(model, tokens)

    # --- from the event loop ----------------------------------------------------------------

    def observe(self, heartbeat: Heartbeat) -> None:
        """Keeps the snapshot the heartbeat is about to carry, for the state gauges of the next scrape."""
        prefill = self.prefill_rates.rates()
        self._state.latest = (heartbeat, {m.id: prefill.get(m.id, 0.0) for m in heartbeat.models})


class _StateCollector(Collector):
    """The node's state as its last heartbeat described it: one reference, swapped whole, so a
    scrape on the telemetry thread sees one snapshot and models that left are simply absent."""

    def __init__(self) -> None:
        self.latest: tuple[Heartbeat, dict[str, float]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        latest = self.latest
        if latest is None:
            return
        heartbeat, prefill = latest
        up = GaugeMetricFamily("neuron_up", "1 while the node serves; 0 while it drains.")
        up.add_metric([], 0 if heartbeat.draining else 1)
        device = ["device", "kind"]
        total = GaugeMetricFamily("neuron_device_memory_total_bytes", "Memory models may use.", labels=device)
        free = GaugeMetricFamily("neuron_device_memory_free_bytes", "What is left of it now.", labels=device)
        for d in heartbeat.devices:
            total.add_metric([d.id, d.kind], d.total_mb * _MB)
            free.add_metric([d.id, d.kind], d.free_mb * _MB)
        running = GaugeMetricFamily("neuron_jobs_running", "Jobs decoding now.", labels=["model"])
        queued = GaugeMetricFamily("neuron_jobs_queued", "Jobs waiting for a batch slot.", labels=["model"])
        memory = GaugeMetricFamily(
            "neuron_model_memory_bytes",
            "Memory a model takes (weights + KV budget).",
            labels=["model", "device", "state"],
        )
        decode = GaugeMetricFamily(
            "neuron_decode_tokens_per_second", "Tokens generated per second, last few seconds.", labels=["model"]
        )
        prefill_rate = GaugeMetricFamily(
            "neuron_prefill_tokens_per_second",
            "Prompt tokens prefilled per second, last few seconds.",
            labels=["model"],
        )
        for m in heartbeat.models:
            running.add_metric([m.id], m.in_flight - m.queued)
            queued.add_metric([m.id], m.queued)
            memory.add_metric([m.id, m.device, m.state.value], m.memory_mb * _MB)
            decode.add_metric([m.id], m.tokens_per_s)
            prefill_rate.add_metric([m.id], prefill.get(m.id, 0.0))
        yield from (up, total, free, running, queued, memory, decode, prefill_rate)
