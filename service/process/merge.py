"""One server in the numbers: merge the workers' snapshots (pure functions, no I/O).

Metric families travel as plain tuples ``(name, documentation, type, samples)`` with
samples ``(sample name, labels, value)``, taken from a worker's prometheus_client registry.

* Counters and histograms (``actserve_*``) are summed over workers, sample by sample (the
  histograms share their buckets, so cumulative bucket counts, ``_count`` and ``_sum`` add).
* Gauges, and every ``process_*`` family (CPU seconds, memory, file descriptors), describe
  one process: each worker's samples are kept, with a ``worker`` label (its slot).
* Retired snapshots (the last periodic snapshot of workers that died) add to the sums and
  contribute no gauges.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

Family = tuple[str, str, str, list[tuple[str, dict, float]]]


def families_of(registry: CollectorRegistry) -> list[Family]:
    return [(m.name, m.documentation, m.type, [(s.name, dict(s.labels), s.value)
                                                for s in m.samples])
            for m in registry.collect()]


def summable(name: str, typ: str) -> bool:
    return typ in ("counter", "histogram") and not name.startswith("process_")


def _key(sample_name: str, labels: dict) -> tuple:
    return sample_name, tuple(sorted(labels.items()))


class _Merged:
    def __init__(self, name: str, doc: str, typ: str) -> None:
        self.name, self.doc, self.typ = name, doc, typ
        self.samples: dict[tuple, list] = {}  # key -> [name, labels, value], first-seen order

    def add(self, sname: str, labels: dict, value: float) -> None:
        key = _key(sname, labels)
        found = self.samples.get(key)
        if found is None:
            self.samples[key] = [sname, labels, value]
        else:
            found[2] += value


def _merge(live: Iterable[tuple[int, list[Family]]], retired: Iterable[list[Family]]
           ) -> dict[str, _Merged]:
    out: dict[str, _Merged] = {}
    for slot, families in live:
        for name, doc, typ, samples in families:
            fam = out.get(name) or out.setdefault(name, _Merged(name, doc, typ))
            per_worker = not summable(name, typ)
            for sname, labels, value in samples:
                if per_worker:
                    labels = {**labels, "worker": str(slot)}
                fam.add(sname, labels, value)
    for families in retired:
        for name, doc, typ, samples in families:
            if not summable(name, typ):
                continue
            fam = out.get(name) or out.setdefault(name, _Merged(name, doc, typ))
            for sname, labels, value in samples:
                fam.add(sname, labels, value)
    return out


def merge_families(live: Iterable[tuple[int, list[Family]]],
                   retired: Iterable[list[Family]] = ()) -> list[Metric]:
    """``live``: (slot, families) of each worker; ``retired``: dead workers' families."""
    metrics = []
    for fam in _merge(live, retired).values():
        m = Metric(fam.name, fam.doc, fam.typ)
        for sname, labels, value in fam.samples.values():
            m.add_sample(sname, labels, value)
        metrics.append(m)
    return metrics


def sum_families(snapshots: Iterable[list[Family]]) -> list[Family]:
    """The summable part of several snapshots, as one snapshot (for retiring a worker)."""
    merged = _merge((), snapshots)
    return [(f.name, f.doc, f.typ, [tuple(s) for s in f.samples.values()])
            for f in merged.values()]


class _Collector:
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> list[Metric]:
        return self._metrics


def registry_of(metrics: list[Metric]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(metrics))
    return registry


# -- the v2 statistics extension ------------------------------------------------------------
def _add_durations(into: dict, other: dict) -> None:
    for k, d in other.items():
        mine = into.setdefault(k, {"count": 0, "ns": 0})
        mine["count"] += d["count"]
        mine["ns"] += d["ns"]


def merge_model_stats(snapshots: Iterable[dict]) -> dict:
    """Sum ``ModelStats.snapshot()`` answers of several workers, model by model."""
    models: dict[str, dict] = {}
    for snap in snapshots:
        for m in snap["model_stats"]:
            mine = models.get(m["name"])
            if mine is None:
                mine = models[m["name"]] = {
                    **m, "inference_stats": {}, "batch_stats": [],
                    "inference_count": 0, "execution_count": 0, "last_inference": 0}
                mine["_batches"] = {}
            mine["inference_count"] += m["inference_count"]
            mine["execution_count"] += m["execution_count"]
            mine["last_inference"] = max(mine["last_inference"], m["last_inference"])
            _add_durations(mine["inference_stats"], m["inference_stats"])
            for b in m["batch_stats"]:
                slot = mine["_batches"].setdefault(b["batch_size"], {})
                _add_durations(slot, {k: v for k, v in b.items() if k != "batch_size"})
    out = []
    for m in models.values():
        batches = m.pop("_batches")
        m["batch_stats"] = [{"batch_size": size, **batches[size]} for size in sorted(batches)]
        out.append(m)
    return {"model_stats": out}
