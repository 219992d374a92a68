"""Overload policy of the batcher (docs/reliability.md, "Overload"): admission by
predicted finish, a queue that stays fresh, and per-client shares. Event loop only, torch-
and HTTP-free; every time is read from the clock the batcher hands in (a fake one in tests).

* ``ServiceModel`` learns what a request costs: per (activation, device, size class) an
  exponentially weighted mean of the seconds each request took, its share of its batch's
  time (``seconds * numel / batch elements``), so batching under load is in the figure.
  While work waits behind a batch, its time is the executor's *cycle*, from its dispatch
  to the dispatch of the next batch on that executor: the compute and everything the
  process does before the queue moves on (the event loop decoding, encoding and answering
  each request, on the same cores), which is the rate the queue really drains at (compute
  alone predicted waits 15 times too short on one core with small requests). With nothing
  waiting, it is the batch's compute wall time. A size class with no sample yet is scaled
  from the nearest class measured for that activation, then from the device's mean cost
  per element; nothing measured yet predicts zero (admitted until the first batch has been
  timed).
* ``Admission`` keeps the predicted seconds of work queued at each priority and running
  on each executor, so the wait of a new request is one sum: the work at its priority or
  above, divided by the executors, plus what remains of the running batches. A request
  whose predicted finish (``safety`` times the wait plus its own cost) is past its
  deadline is refused at once: 503 ``predicted_late`` with the seconds after which it
  would fit as ``Retry-After``. Before the body is read this uses the declared size;
  after decoding, the exact element count.
* The discipline (CoDel's rule): when the oldest waiting job has waited more than
  ``overload_target_delay_ms`` for ``overload_interval_ms`` the queue is *overloaded*:
  a request is then also refused (503 ``queue_delay``) when its predicted wait is over
  ``overload_max_wait_ms``, so the served ones stay fresh; with ``overload_lifo`` the
  newest batch is served first and a job that has waited past the cap is shed. When the
  oldest wait stays under the target for an interval (or the queue empties) it switches
  back to plain FIFO admission by deadline.
* Fair share (``fair_share``): while the queue is contended (its predicted wait over half
  of what the request may wait), a client whose queued work is over an equal share of
  that wait (among the clients with work queued, itself, and one share kept free for a
  client yet to come) is refused 429 ``client_share`` first.
"""

from __future__ import annotations

import bisect
import contextvars
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from service.errors import ActserveError, Unavailable
from service.settings import Settings

ALPHA = 0.3  # weight of the newest batch in the service model's moving means
# Signed buckets of (actual - predicted) queue wait, seconds.
ERROR_BUCKETS = (-1.0, -0.5, -0.25, -0.1, -0.05, -0.025, -0.01, -0.005, -0.001, 0.0, 0.001,
                 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
FIFO, CONTROLLED_DELAY, LIFO = "fifo", "controlled_delay", "adaptive_lifo"
DISCIPLINES = (FIFO, CONTROLLED_DELAY, LIFO)


class PredictedLate(Unavailable):
    """503: the work ahead of this request would not let it finish by its deadline."""

    type = "predicted_late"


class QueueDelay(Unavailable):
    """503: the queue stands above its target delay and this request would wait past
    the cap (or, served newest first, it has waited past it)."""

    type = "queue_delay"


class ClientShare(ActserveError):
    """429: this client holds more than its share of a contended queue."""

    status = 429
    type = "client_share"
    retry_after = 1


OVERLOAD_ERRORS: dict[str, type[ActserveError]] = {
    c.type: c for c in (PredictedLate, QueueDelay, ClientShare)}


def retry_after(retry_s: float) -> int:
    """``Retry-After`` for a refusal that could be retried in ``retry_s``: whole seconds,
    at least one."""
    return max(1, math.ceil(retry_s))


def refusal(cls: type[ActserveError], message: str, retry_s: float) -> ActserveError:
    exc = cls(message)
    exc.retry_after = retry_after(retry_s)
    return exc


def predicted_late(need: float, wait: float, room: float) -> ActserveError:
    """503 ``predicted_late``: ``need`` seconds (``wait`` of them queued ahead) against
    ``room`` left before the deadline."""
    return refusal(PredictedLate, (
        f"the server would finish this request in about {need * 1000:.0f} ms "
        f"({wait * 1000:.0f} ms of queued work ahead of it), after its deadline in "
        f"{max(room, 0) * 1000:.0f} ms; retry later or with a longer timeout"), need - room)


@dataclass(frozen=True, slots=True)
class Hint:
    """What is known of a request before its body is read."""

    activation: str | None = None
    elements: int | None = None
    deadline: float | None = None  # the batcher's clock
    priority: int = 0
    client: str | None = None
    timed: bool = False  # the deadline is the request's own (else the server's default)


# The hint of the request being handled in this task: ``admit`` sets it, the same task's
# ``submit`` reads it (the client for the share, and the deadline counted from arrival).
CURRENT: contextvars.ContextVar[Hint | None] = contextvars.ContextVar("actserve_hint",
                                                                      default=None)


def hint_from(activation: str | None, query: Mapping[str, str], headers: Mapping[str, str],
              client: str | None, now: float, default_timeout_s: float,
              api: str = "native") -> Hint:
    """A request's hint from its query string and headers (plain mappings). The timeout
    and priority are read from the query on the native API (elsewhere they are in the
    body: the deadline is then the server's default until it is decoded); the element
    count from Content-Length (about 8 bytes an element for JSON, the dtype's size for
    binary). Anything malformed is left out: the decoder refuses it later with a 400."""
    elements = None
    try:
        length = int(headers.get("content-length", ""))
    except ValueError:
        length = -1
    if length >= 0:
        if "json" in headers.get("content-type", ""):
            per = 8
        else:
            per = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}.get(
                query.get("dtype", "float32"), 4)
        elements = length // per
    timeout = default_timeout_s
    priority = 0
    timed = False
    if api == "native":
        try:
            t = float(query.get("timeout", ""))
            if 0 < t < 1e9:
                timeout, timed = t, True
        except ValueError:
            pass
        try:
            priority = int(query.get("priority", "0"))
        except ValueError:
            priority = 0
    token = headers.get("authorization", "")
    key = f"key:{hash(token)}" if token else (f"addr:{client}" if client else None)
    return Hint(activation, elements, now + timeout, priority, key, timed)


def size_class(elements: int) -> int:
    return max(int(elements), 1).bit_length()  # powers of two


class ServiceModel:
    """Measured seconds per request by (activation, device, size class)."""

    def __init__(self) -> None:
        self.cost: dict[tuple[str, str, int], float] = {}
        self.per_element: dict[str, float] = {}  # device -> seconds per element
        # (activation, elements) -> prediction; cleared by every observation
        self._memo: dict[tuple[str | None, int], float] = {}

    def observe(self, activation: str, device: str, sizes: list[int], wall: float) -> None:
        total = sum(sizes)
        if total <= 0 or wall < 0:
            return
        rate = wall / total
        self._memo.clear()
        old = self.per_element.get(device)
        self.per_element[device] = rate if old is None else old + ALPHA * (rate - old)
        by_class: dict[int, list[int]] = {}
        for n in sizes:
            by_class.setdefault(size_class(n), []).append(n)
        for cls, ns in by_class.items():
            each = rate * sum(ns) / len(ns)
            key = (activation, device, cls)
            old = self.cost.get(key)
            self.cost[key] = each if old is None else old + ALPHA * (each - old)

    def predict(self, activation: str | None, elements: int | None) -> float:
        """Seconds of compute one request of ``elements`` adds (mean over devices)."""
        if elements is None or not self.per_element:
            return 0.0
        memo = self._memo.get((activation, elements))  # one lookup per request (hot)
        if memo is None:
            memo = self._memo[(activation, elements)] = self._predict(activation,
                                                                      size_class(elements))
        return memo

    def _predict(self, activation: str | None, cls: int) -> float:
        found = []
        for device in self.per_element:
            exact = self.cost.get((activation, device, cls)) if activation else None
            if exact is not None:
                found.append(exact)
                continue
            near = [(abs(c - cls), c, v) for (a, d, c), v in self.cost.items()
                    if a == activation and d == device]
            if near:
                # A lower bound, never an extrapolation upward: small requests' cost is
                # mostly fixed overhead, so scaling it up by size would predict a large
                # request late that is not (and refuse it). Scaled down from a larger
                # class; a larger request costs at least what a smaller one does.
                _, c, v = min(near)
                found.append(v * 2.0 ** min(0, cls - c))
            else:
                found.append(0.0)  # never measured: no refusal on a guess
        return sum(found) / len(found)


@dataclass(slots=True, eq=False)
class Entry:
    """A queued job's share of the backlog."""

    cost: float
    priority: int
    client: str | None
    t_in: float
    predicted_wait: float


class Admission:
    def __init__(self, settings: Settings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self.enabled = settings.overload_admission
        self.safety = settings.overload_safety
        self.target = settings.overload_target_delay_ms / 1000
        self.interval = settings.overload_interval_ms / 1000
        self.max_wait = settings.overload_max_wait_ms / 1000
        self.lifo = settings.overload_lifo
        self.fair = settings.fair_share
        self.model = ServiceModel()
        self.backlog: dict[int, float] = {}  # priority -> predicted seconds queued
        self.clients: dict[str, list] = {}  # client -> [jobs queued, predicted seconds]
        self.running: dict[int, tuple[float, float]] = {}  # executor id -> (start, cost)
        # executor id -> (start, activation, device, sizes) of a batch that finished while
        # work waited: observed at the executor's next dispatch, as a whole cycle
        self._cycle: dict[int, tuple[float, str, str, list[int]]] = {}
        self.executors = 1
        self.overloaded = False
        self.switches = 0
        self._above_since: float | None = None
        self._below_since: float | None = None
        self.error_counts = [0] * (len(ERROR_BUCKETS) + 1)
        self.error_sum = 0.0
        self.error_n = 0

    # -- the discipline -------------------------------------------------------------------
    @property
    def discipline(self) -> str:
        if not self.overloaded:
            return FIFO
        return LIFO if self.lifo else CONTROLLED_DELAY

    def observe_delay(self, oldest_wait: float | None) -> None:
        """The oldest waiting job's wait so far (None: the queue is empty), seen whenever
        a batch is taken; switches the discipline after an interval above or below the
        target."""
        now = self.clock()
        if oldest_wait is None or oldest_wait < self.target:
            self._above_since = None
            if self.overloaded:
                if oldest_wait is None:  # drained
                    self._switch(False)
                elif self._below_since is None:
                    self._below_since = now
                elif now - self._below_since >= self.interval:
                    self._switch(False)
            return
        self._below_since = None
        if self._above_since is None:
            self._above_since = now
        elif not self.overloaded and now - self._above_since >= self.interval:
            self._switch(True)

    def _switch(self, overloaded: bool) -> None:
        self.overloaded = overloaded
        self.switches += 1
        self._above_since = self._below_since = None

    # -- prediction ------------------------------------------------------------------------
    def wait_ahead(self, priority: int, now: float | None = None) -> float:
        """Predicted seconds before a new job of ``priority`` starts (FIFO within a level,
        higher levels first). Plain loops: this runs for every request."""
        if now is None:
            now = self.clock()
        ahead = 0.0
        for p, s in self.backlog.items():
            if p >= priority:
                ahead += s
        for t, c in self.running.values():
            left = t + c - now
            if left > 0.0:
                ahead += left
        return ahead / self.executors if self.executors > 1 else ahead

    def check(self, cost: float, deadline: float, priority: int, client: str | None,
              now: float | None = None) -> float:
        """Raise the refusal a request of predicted ``cost`` gets ``now`` (the clock's time
        when not given), or return its predicted wait."""
        if now is None:
            now = self.clock()
        wait = self.wait_ahead(priority, now)
        if not self.enabled:
            return wait
        room = deadline - now  # what it may spend in all
        if self.fair and client is not None:
            self._check_share(client, cost, wait, room)
        need = self.safety * (wait + cost)
        if need > room:
            raise predicted_late(need, wait, room)
        if self.overloaded and wait > self.max_wait:
            raise refusal(QueueDelay, (
                f"the queue is overloaded (its delay stood above "
                f"{self.target * 1000:.0f} ms); this request would wait about "
                f"{wait * 1000:.0f} ms, over the cap of {self.max_wait * 1000:.0f} ms"),
                wait - self.max_wait)
        return wait

    def _check_share(self, client: str, cost: float, wait: float, room: float) -> None:
        bound = min(room, self.max_wait) if self.overloaded else room
        if wait + cost <= bound / 2:
            return  # not contended: anyone may use the whole queue
        held = self.clients.get(client)
        # every client with work queued, this one, and room kept for one more: a newcomer
        # always finds its share free
        active = len(self.clients) + (held is None) + 1
        share = bound / active
        mine = held[1] if held is not None else 0.0
        if mine + cost > share:
            raise refusal(ClientShare, (
                f"this client has {mine * 1000:.0f} ms of work queued, over its share of "
                f"{share * 1000:.0f} ms while {active} clients wait; retry later"),
                mine + cost - share)

    # -- accounting ------------------------------------------------------------------------
    def queued(self, cost: float, priority: int, client: str | None, wait: float,
               now: float | None = None) -> Entry:
        entry = Entry(cost, priority, client if self.fair else None,
                      self.clock() if now is None else now, wait)
        self.backlog[priority] = self.backlog.get(priority, 0.0) + cost
        if entry.client is not None:
            held = self.clients.setdefault(entry.client, [0, 0.0])
            held[0] += 1
            held[1] += cost
        return entry

    def left(self, entry: Entry) -> None:
        """``entry``'s job left the queue (taken, expired, shed, abandoned)."""
        left = self.backlog.get(entry.priority, 0.0) - entry.cost
        if left <= 1e-12 or entry.priority not in self.backlog:
            self.backlog.pop(entry.priority, None)
        else:
            self.backlog[entry.priority] = left
        if entry.client is not None:
            held = self.clients.get(entry.client)
            if held is not None:
                held[0] -= 1
                held[1] -= entry.cost
                if held[0] <= 0:
                    del self.clients[entry.client]

    def waited(self, entry: Entry, now: float) -> None:
        """``entry``'s job starts ``now``: its actual wait against the predicted one."""
        err = now - entry.t_in - entry.predicted_wait
        self.error_counts[bisect.bisect_left(ERROR_BUCKETS, err)] += 1
        self.error_sum += err
        self.error_n += 1

    def clear(self) -> None:
        self.backlog.clear()
        self.clients.clear()

    def started(self, executor: object, cost: float) -> None:
        now = self.clock()
        key = id(executor)
        cycle = self._cycle.pop(key, None)
        if cycle is not None:  # the previous batch's whole cycle, dispatch to dispatch
            start, activation, device, sizes = cycle
            self.model.observe(activation, device, sizes, now - start)
        self.running[key] = (now, cost)

    def finished(self, executor: object, activation: str, device: str, sizes: list[int],
                 wall: float, waiting: bool = False) -> None:
        """``executor``'s batch (``sizes``: its requests' element counts, empty when not
        all succeeded) took ``wall`` seconds of compute; ``waiting``: work is queued."""
        run = self.running.pop(id(executor), None)
        if not sizes:
            return
        if run is not None and waiting:  # the queue waits on this executor: a whole cycle
            self._cycle[id(executor)] = (run[0], activation, device, sizes)
        else:
            self.model.observe(activation, device, sizes, wall)

    def lost(self, executor: object) -> None:
        """``executor`` died with its batch: nothing of it is measured."""
        self.running.pop(id(executor), None)
        self._cycle.pop(id(executor), None)

    def snapshot(self) -> dict:
        """The state ``/metrics`` reads at scrape time."""
        return {"discipline": self.discipline, "switches": self.switches,
                "backlog_s": round(sum(self.backlog.values()), 6),
                "clients": len(self.clients),
                "prediction_error": {"buckets": ERROR_BUCKETS, "counts": list(self.error_counts),
                                     "sum": self.error_sum, "count": self.error_n}}


class RemoteWait:
    """A worker's view of the engine process's queue (``--engine process``): the predicted
    wait of a new request there (``Admission.wait_ahead(0)``), carried on every answer the
    engine sends, drained at one second a second since it was seen. A request whose
    deadline is nearer than that is refused before its body is read, as the inline engine
    refuses it. A lower bound: its own cost and work other workers queued since are left
    out, so it never refuses what the engine would admit."""

    def __init__(self, settings: Settings, clock: Callable[[], float]) -> None:
        self.enabled = settings.overload_admission
        self.safety = settings.overload_safety
        self.target = settings.overload_target_delay_ms / 1000
        self.clock = clock
        self.wait_s = 0.0
        self.seen = 0.0

    def observe(self, wait_s: float) -> None:
        self.wait_s, self.seen = wait_s, self.clock()

    def left(self, now: float) -> float:
        """The engine's wait as last seen, drained since."""
        return self.wait_s - (now - self.seen)

    def busy(self) -> bool:
        """The engine's wait, drained since it was seen, is above the target delay."""
        return self.enabled and self.wait_s > self.target and self.left(self.clock()) > self.target

    def check(self, hint: Hint | None) -> None:
        if (not self.enabled or hint is None or hint.deadline is None or hint.priority > 0
                or self.wait_s <= 0.0):
            return  # a higher priority may pass the queued work: no bound to go by
        now = self.clock()
        wait = self.left(now)
        room = hint.deadline - now
        if wait > 0.0 and self.safety * wait > room:
            raise predicted_late(self.safety * wait, wait, room)
