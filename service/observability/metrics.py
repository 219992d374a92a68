"""Prometheus metrics, one registry per app (no process-global state).

Names carry their units; labels are bounded: activation (the registry's names, or
"unknown"), api (native, v2, grpc), status class (2xx, 4xx, 5xx), device, rejection reason.
Nothing is timed on ``self``: callers time with locals and observe once.

Two kinds of series:

* events, observed on the event loop as they happen (requests, phases, batches, bytes,
  rejections, in-place savings);
* state, read from the server at scrape time by ``StateCollector`` (executor restarts,
  readiness, GPU memory), so a scrape never shows a stale value and nothing needs syncing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from service.engine.admission import DISCIPLINES
from service.observability.loop_metrics import LoopCounter, LoopHistogram

# Tens of microseconds up to seconds.
LATENCY_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ELEMENT_BUCKETS = tuple(4**i for i in range(0, 13))  # 1 .. 16.7M

# Refusal reasons: the error's type first, then its status, else "other" (bounded).
REASON_BY_TYPE = {
    "invalid_request": "invalid",
    "not_found": "not_found",
    "request_too_large": "too_large",
    "unsupported_media_type": "unsupported_media",
    "unauthorized": "unauthorized",
    "queue_full": "queue_full",
    "draining": "draining",
    "not_ready": "not_ready",
    "unavailable": "executor_lost",
    "deadline_exceeded": "deadline",
    "compute_error": "compute",
    "request_timeout": "timeout",
    # overload (service/engine/admission.py)
    "predicted_late": "predicted_late",
    "queue_delay": "queue_delay",
    "client_share": "client_share",
}
# The reasons of an overload refusal, and where on a request's way one is made (the later,
# the more it cost): ``actserve_overload_refusals_total{stage}`` (docs/observability.md).
OVERLOAD_REASONS = frozenset(("queue_full", "deadline", "predicted_late", "queue_delay",
                              "client_share"))
STAGES = ("unparsed", "unparsed_admission", "headers", "before_body", "queued", "answer")
REASON_BY_STATUS = {400: "invalid", 401: "unauthorized", 404: "not_found", 413: "too_large",
                    415: "unsupported_media", 503: "unavailable", 504: "deadline",
                    500: "compute", 429: "client_share"}
REJECT_REASONS = tuple(dict.fromkeys([*REASON_BY_TYPE.values(), *REASON_BY_STATUS.values(),
                                      "other"]))

# (device, allocated bytes, peak bytes) for each CUDA executor.
GpuMemory = Callable[[], Iterable[tuple[str, int, int]]]


def reject_reason(error_type: str, status: int) -> str:
    return REASON_BY_TYPE.get(error_type) or REASON_BY_STATUS.get(status, "other")


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class StateCollector:
    """Series read from the server's state at scrape time (on the event loop)."""

    def __init__(self, restarts: Callable[[], int], ready: Callable[[], bool],
                 gpu_memory: GpuMemory, fusion: Callable[[], dict] = dict) -> None:
        self._restarts = restarts
        self._ready = ready
        self._gpu_memory = gpu_memory
        self._fusion = fusion

    def describe(self) -> list[Metric]:
        return list(self._families(with_values=False))

    def collect(self) -> Iterator[Metric]:
        return self._families(with_values=True)

    def _families(self, with_values: bool) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            "actserve_executor_restarts", "Compute executors restarted after their thread died")
        ready = GaugeMetricFamily("actserve_ready", "1 when the server accepts work, else 0")
        allocated = GaugeMetricFamily(
            "actserve_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated after the "
            "device's last batch", labels=["device"])
        peak = GaugeMetricFamily(
            "actserve_gpu_memory_peak_bytes", "torch.cuda.max_memory_allocated since start",
            labels=["device"])
        fusion = CounterMetricFamily(
            "actserve_fusion_decisions", "Custom activations' fusion decisions by outcome: "
            "compiled, differs (over the accepted ULP bound), slower (bit for bit but not "
            "faster), no_compiler, failed", labels=["outcome"])
        if with_values:
            for outcome, n in self._fusion().items():
                fusion.add_metric([outcome], n)
            restarts.add_metric([], self._restarts())
            ready.add_metric([], 1.0 if self._ready() else 0.0)
            for device, alloc, top in self._gpu_memory():
                allocated.add_metric([device], alloc)
                peak.add_metric([device], top)
        yield from (restarts, ready, allocated, peak, fusion)


class OverloadCollector:
    """The overload policy's state (``Engine.overload``), read at scrape time: the queue's
    discipline, its switches, the predicted backlog, and the prediction error of the
    queue wait (actual minus predicted, a histogram). Refusals by reason are
    ``actserve_rejections_total``."""

    def __init__(self, state: Callable[[], dict]) -> None:
        self._state = state

    def describe(self) -> list[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        return self._families(self._state())

    def _families(self, s: dict) -> Iterator[Metric]:
        discipline = GaugeMetricFamily(
            "actserve_queue_discipline", "The queue's current discipline: 0 fifo; while "
            "overloaded 1 controlled_delay, 2 adaptive_lifo")
        switches = CounterMetricFamily(
            "actserve_queue_discipline_switches", "Switches between the normal and the "
            "overloaded discipline")
        backlog = GaugeMetricFamily(
            "actserve_queue_predicted_backlog_seconds", "Predicted seconds of work queued")
        error = HistogramMetricFamily(
            "actserve_queue_wait_prediction_error_seconds", "Actual minus predicted queue "
            "wait of each dispatched request")
        if s:
            discipline.add_metric([], float(DISCIPLINES.index(s["discipline"])))
            switches.add_metric([], s["switches"])
            backlog.add_metric([], s["backlog_s"])
            e = s["prediction_error"]
            cumulative, buckets = 0, []
            for bound, n in zip((*e["buckets"], float("inf")), e["counts"], strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            error.add_metric([], buckets, e["sum"])
        yield from (discipline, switches, backlog, error)


class FrontLimitCollector:
    """``actserve_front_limit``: a front end's limit per size class
    (``front_limits.FrontLimits.snapshot``), read at scrape time; absent until measured."""

    def __init__(self, state: Callable[[], dict]) -> None:
        self._state = state

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for name, cls in self._state().items():
            if isinstance(cls, dict) and cls["limit"] is not None:
                family.add_metric([name], cls["limit"])
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "actserve_front_limit", "Requests in flight a front end should pass to this "
            "server at once per size class: the rate it answers that class at while "
            "saturated x front_delay_ms (absent until measured)", labels=["size_class"])


class AnsweredSeries:
    """The children one answered request updates, resolved once per label set."""

    __slots__ = ("bytes_in", "bytes_out", "decode", "encode", "queue", "requests", "seconds")

    def __init__(self, m: Metrics, activation: str, api: str, status_class: str) -> None:
        self.requests = m.requests.labels(activation, api, status_class)
        self.seconds = m.request_seconds.labels(activation, api, status_class)
        self.decode = m.decode_seconds.labels(api)
        self.encode = m.encode_seconds.labels(api)
        self.bytes_in = m.bytes_in.labels(api)
        self.bytes_out = m.bytes_out.labels(api)
        self.queue = m.queue_seconds.labels(activation)


class Metrics:
    def __init__(self, activations: list[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._known = set(activations)
        self._before: list[Callable[[], None]] = []
        r = self.registry
        self.requests = LoopCounter(
            "actserve_requests_total", "Activation requests answered",
            ["activation", "api", "status_class"], registry=r)
        self.request_seconds = LoopHistogram(
            "actserve_request_duration_seconds", "Request time from body read to response",
            ["activation", "api", "status_class"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = LoopHistogram(
            "actserve_queue_wait_seconds", "Time a request waited for its batch to start",
            ["activation"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_seconds = LoopHistogram(
            "actserve_compute_seconds", "Compute time of a batch (CUDA events on GPU)",
            ["activation", "device"], buckets=LATENCY_BUCKETS, registry=r)
        self.decode_seconds = LoopHistogram(
            "actserve_decode_seconds", "Body read, decode and validation time of requests "
            "that decoded", ["api"], buckets=LATENCY_BUCKETS, registry=r)
        self.encode_seconds = LoopHistogram(
            "actserve_encode_seconds", "Response encode time",
            ["api"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_requests = LoopHistogram(
            "actserve_batch_size_requests", "Requests per executed batch",
            ["activation"], buckets=REQUEST_BUCKETS, registry=r)
        self.batch_elements = LoopHistogram(
            "actserve_batch_size_elements", "Elements per executed batch",
            ["activation"], buckets=ELEMENT_BUCKETS, registry=r)
        self.batches = LoopCounter(
            "actserve_batches_total", "Batches executed", ["activation", "device"], registry=r)
        self.queue_depth = Gauge(
            "actserve_queue_depth", "Requests waiting for a batch", registry=r)
        self.inflight = Gauge(
            "actserve_inflight_requests", "Activation requests being handled", registry=r)
        self.body_bytes = Gauge(
            "actserve_body_bytes_in_flight",
            "Bytes of large request bodies admitted and not yet answered", registry=r)
        self.body_waiting = Gauge(
            "actserve_body_waiting_requests",
            "Requests whose large body waits, unread, for the body byte budget", registry=r)
        self.bytes_in = LoopCounter(
            "actserve_request_bytes_total", "Request body bytes (after Content-Encoding)",
            ["api"], registry=r)
        self.bytes_out = LoopCounter(
            "actserve_response_bytes_total", "Response body bytes of answered requests",
            ["api"], registry=r)
        self.request_start_wait = LoopHistogram(
            "actserve_request_start_wait_seconds", "Time from a request's trusted "
            "X-Request-Start to the server reading it (trust_request_start)",
            buckets=LATENCY_BUCKETS, registry=r)
        self.rejections = LoopCounter(
            "actserve_rejections_total", "Requests refused, by reason", ["reason"], registry=r)
        self.overload_stages = LoopCounter(
            "actserve_overload_refusals_total", "Overload refusals (queue_full, deadline, "
            "predicted_late, queue_delay, client_share) by where on the request's way they "
            "were made: unparsed (the protocol, from the raw bytes, the held limit), "
            "unparsed_admission (the same, the admission check), headers (the protocol, "
            "after parsing the headers), before_body (the application, before reading the "
            "body), queued (after the body was read: at submit, in the queue, or its batch "
            "done past the deadline), answer (its answer encoded past the deadline)",
            ["stage"], registry=r)
        self.inplace_saved = LoopCounter(
            "actserve_inplace_saved_bytes_total",
            "Output allocations avoided by in-place computation", registry=r)
        self._children: dict[tuple, object] = {}
        self._answered: dict[tuple[str, str, int], AnsweredSeries] = {}
        ProcessCollector(registry=r)  # process_cpu_seconds_total, RSS, open fds
        for reason in REJECT_REASONS:
            self.rejections.labels(reason)
        for stage in STAGES:
            self.overload_stages.labels(stage)

    def child(self, metric, *values: str):
        """``metric.labels(*values)``, memoised: label sets are bounded, and ``labels()``
        (validation, a lock) would otherwise be most of the cost of a request's metrics.
        Event loop only."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def answered(self, activation: str, api: str, status: int) -> AnsweredSeries:
        """The series of a request that got a result, memoised by label set (bounded:
        activations × APIs × statuses). Event loop only."""
        key = (activation, api, status)
        found = self._answered.get(key)
        if found is None:
            found = self._answered[key] = AnsweredSeries(self, activation, api,
                                                         status_class(status))
        return found

    def activation_label(self, name: str | None) -> str:
        return name if name in self._known else "unknown"

    def track_queue_depth(self, fn: Callable[[], int]) -> None:
        self.queue_depth.set_function(fn)

    def track_bodies(self, held: Callable[[], int], waiting: Callable[[], int]) -> None:
        self.body_bytes.set_function(held)
        self.body_waiting.set_function(waiting)

    def track_state(self, restarts: Callable[[], int], ready: Callable[[], bool],
                    gpu_memory: GpuMemory, fusion: Callable[[], dict] = dict) -> None:
        self.registry.register(StateCollector(restarts, ready, gpu_memory, fusion))

    def track_overload(self, state: Callable[[], dict]) -> None:
        """``state``: ``Engine.overload`` (an empty dict where the queue lives in another
        process: nothing is exposed then)."""
        self.registry.register(OverloadCollector(state))

    def track_front_limits(self, state: Callable[[], dict]) -> None:
        self.registry.register(FrontLimitCollector(state))

    def reject(self, error_type: str, status: int, stage: str | None = None) -> None:
        """One refusal, by reason; an overload one also by ``stage`` (``STAGES``) when
        given."""
        reason = reject_reason(error_type, status)
        self.child(self.rejections, reason).inc()
        if stage is not None and reason in OVERLOAD_REASONS:
            self.child(self.overload_stages, stage).inc()

    def before_scrape(self, fn: Callable[[], None]) -> None:
        """``fn()`` runs before every exposition (counts kept as plain ints elsewhere)."""
        self._before.append(fn)

    def settle(self) -> None:
        """Counts kept elsewhere as plain ints into the registry (``before_scrape``): before
        any read of it, the exposition's or a worker's snapshot for the others."""
        for fn in self._before:
            fn()

    def exposition(self) -> bytes:
        self.settle()
        return generate_latest(self.registry)
