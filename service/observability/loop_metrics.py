"""Counters and histograms for series that only the event loop updates.

prometheus_client's own ``Counter``/``Histogram`` take a lock and validate on every
observation, which cost about 13 % of a small request's throughput in ``make bench``. Every
per-request series here is written on the event loop alone (one thread, so no lock is
needed) and read by the ``/metrics`` handler on the same loop; these classes keep plain
Python numbers and hand prometheus_client complete metric families at scrape time, so the
exposition format is exactly prometheus_client's.

Same surface as prometheus_client for what the server uses: ``labels(*values)`` returns a
child with ``inc(amount)`` / ``observe(value)``; an unlabelled family has them itself.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.sum += value


class _Family:
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        registry.register(self)

    def labels(self, *values: str):
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = self._new_child()
        return child

    def inc(self, amount: float = 1.0) -> None:  # unlabelled counters
        self.labels().inc(amount)

    def observe(self, value: float) -> None:  # unlabelled histograms
        self.labels().observe(value)

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            self._add(family, list(values), child)
        yield family

    def _new_child(self):
        raise NotImplementedError

    def _family(self) -> Metric:
        raise NotImplementedError

    def _add(self, family, values: list[str], child) -> None:
        raise NotImplementedError


class LoopCounter(_Family):
    """A counter; ``name`` ends in ``_total`` as in prometheus_client."""

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family, values, child) -> None:
        family.add_metric(values, child.value)


class LoopHistogram(_Family):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry, buckets: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        super().__init__(name, documentation, labelnames, registry=registry)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.bounds)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family, values, child) -> None:
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), child.counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric(values, buckets, child.sum)
