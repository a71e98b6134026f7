"""The neuron's Prometheus metrics, and the token rates its heartbeat reports.

Counters and histograms are bumped where things happen (the device thread for steps and
prefills, the event loop for jobs and loads); prometheus_client is thread-safe. Gauges that
describe the node's state (memory, queues, models) are set from each heartbeat's snapshot,
so a scrape never touches a device or the event loop.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.decode_rate = Gauge(
            "neuron_decode_tokens_per_second", "Tokens generated per second, last few seconds.", ["model"], registry=r
        )
        self.prefill_rate = Gauge(
            "neuron_prefill_tokens_per_second",
            "Prompt tokens prefilled per second, last few seconds.",
            ["model"],
            registry=r,
        )
        self.jobs = Counter(
            "neuron_jobs",
            "Jobs ended, by outcome (a finish reason or an error code).",
            ["model", "outcome"],
            registry=r,
        )
        self.jobs_running = Gauge("neuron_jobs_running", "Jobs decoding now.", ["model"], registry=r)
        self.jobs_queued = Gauge(
            "neuron_jobs_queued", "Jobs accepted and waiting for a batch slot.", ["model"], registry=r
        )
        self.device_total = Gauge(
            "neuron_device_memory_total_bytes", "Memory models may use on the device.", ["device", "kind"], registry=r
        )
        self.device_free = Gauge(
            "neuron_device_memory_free_bytes", "What is left of it now.", ["device", "kind"], registry=r
        )
        self.model_memory = Gauge(
            "neuron_model_memory_bytes",
            "Memory a model takes (weights + KV budget).",
            ["model", "device", "state"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "neuron_model_load_seconds",
            "Model loads, from the request to ready (download included).",
            ["model", "outcome"],
            buckets=_LOAD_SECONDS,
            registry=r,
        )
        self.up = Gauge("neuron_up", "1 while the node serves; 0 while it drains.", registry=r)

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
        """Sets the state gauges from the snapshot the heartbeat is about to carry."""
        self.up.set(0 if heartbeat.draining else 1)
        for device in heartbeat.devices:
            self.device_total.labels(device.id, device.kind).set(device.total_mb * _MB)
            self.device_free.labels(device.id, device.kind).set(device.free_mb * _MB)
        # Models come and go: clear the per-model series so an unloaded one stops reporting.
        for gauge in (self.jobs_running, self.jobs_queued, self.model_memory, self.decode_rate, self.prefill_rate):
            gauge.clear()
        for model in heartbeat.models:
            self.jobs_running.labels(model.id).set(model.in_flight - model.queued)
            self.jobs_queued.labels(model.id).set(model.queued)
            self.model_memory.labels(model.id, model.device, model.state.value).set(model.memory_mb * _MB)
            self.decode_rate.labels(model.id).set(model.tokens_per_s)
        for model, rate in self.prefill_rates.rates().items():
            self.prefill_rate.labels(model).set(rate)
