"""Prometheus metrics, one registry per app (no process-global state).

Names carry their units; labels are bounded: activation (the registry's names, or
"unknown"), api (native, v2), status class (2xx, 4xx, 5xx), device, rejection reason.
Nothing is timed on ``self``: callers time with locals and observe once.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

# Tens of microseconds up to seconds.
LATENCY_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ELEMENT_BUCKETS = tuple(4**i for i in range(0, 13))  # 1 .. 16.7M
REJECT_REASONS = ("queue_full", "deadline", "invalid", "not_found", "too_large",
                  "unsupported_media", "unauthorized", "draining", "not_ready", "compute")


class Metrics:
    def __init__(self, activations: list[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._known = set(activations)
        r = self.registry
        self.requests = Counter(
            "actserve_requests_total", "Activation requests answered",
            ["activation", "api", "status_class"], registry=r)
        self.request_seconds = Histogram(
            "actserve_request_duration_seconds", "Request time from body read to response",
            ["activation", "api", "status_class"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram(
            "actserve_queue_wait_seconds", "Time a request waited for its batch to start",
            ["activation"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram(
            "actserve_compute_seconds", "Compute time of a batch (CUDA events on GPU)",
            ["activation", "device"], buckets=LATENCY_BUCKETS, registry=r)
        self.decode_seconds = Histogram(
            "actserve_decode_seconds", "Body decode and validation time",
            ["api"], buckets=LATENCY_BUCKETS, registry=r)
        self.encode_seconds = Histogram(
            "actserve_encode_seconds", "Response encode time",
            ["api"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_requests = Histogram(
            "actserve_batch_size_requests", "Requests per executed batch",
            ["activation"], buckets=REQUEST_BUCKETS, registry=r)
        self.batch_elements = Histogram(
            "actserve_batch_size_elements", "Elements per executed batch",
            ["activation"], buckets=ELEMENT_BUCKETS, registry=r)
        self.batches = Counter(
            "actserve_batches_total", "Batches executed", ["activation", "device"], registry=r)
        self.queue_depth = Gauge(
            "actserve_queue_depth", "Requests waiting for a batch", registry=r)
        self.inflight = Gauge(
            "actserve_inflight_requests", "Activation requests being handled", registry=r)
        self.bytes_in = Counter(
            "actserve_request_bytes_total", "Request body bytes", ["api"], registry=r)
        self.bytes_out = Counter(
            "actserve_response_bytes_total", "Response body bytes", ["api"], registry=r)
        self.rejections = Counter(
            "actserve_rejections_total", "Requests refused, by reason", ["reason"], registry=r)
        self.restarts = Counter(
            "actserve_executor_restarts_total", "Compute executor restarts", registry=r)
        self.inplace_saved = Counter(
            "actserve_inplace_saved_bytes_total",
            "Output allocations avoided by in-place computation", registry=r)
        self.gpu_allocated = Gauge(
            "actserve_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated",
            ["device"], registry=r)
        self.gpu_peak = Gauge(
            "actserve_gpu_memory_peak_bytes", "torch.cuda.max_memory_allocated",
            ["device"], registry=r)
        for reason in REJECT_REASONS:
            self.rejections.labels(reason)

    def activation_label(self, name: str | None) -> str:
        return name if name in self._known else "unknown"

    def track_queue_depth(self, fn: Callable[[], int]) -> None:
        self.queue_depth.set_function(fn)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def status_class(status: int) -> str:
    return f"{status // 100}xx"
