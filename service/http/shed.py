"""Overload refusals in the HTTP protocol, before the application runs.

Under overload a refusal has to cost far less than a served request, or refusing becomes
what overloads the server: through the application (an ASGI scope and task, the routes,
the body read and decoded, an error response through the framework's response class) a
refusal of a small request cost almost what serving it did, and at 5x offered load the
event loop spent its time refusing (``loadtest/refusal_cost.py``; docs/reliability.md,
"Cheap refusals").

So the HTTP protocol (``header_timeout.py``) refuses by itself, with one decision
(``Shed.decide``: the admission check the application would make, for an activation route,
native or v2 ``infer``, of a known activation) made in two places while the server is busy
(the engine's signal, or its own congestion state, see ``Shed``). From a request's raw
bytes, before the parser sees them, when its whole header block came in one read
(``ShedConnection.fast_refusal``; while congested with the application holding its limit,
the cheapest answer of all); else as soon as its headers are parsed (``Shed.refusal``).
A refused request is answered from the protocol: no ASGI scope, task or framework, its
body never decoded (dropped as it arrives), the connection kept. What the protocol cannot
decide (another route, an unknown activation, a request without a valid API key or an
allowed Host, a pipelined one) goes to the application, which applies the same policy
after decoding. With nothing waiting the check costs a few calls a request.

``ARRIVAL_KEY``: the protocol stamps every request's scope with the time its first bytes
were parsed (``time.monotonic``); deadlines count from it (``jobs.ARRIVED``).
"""

from __future__ import annotations

import contextvars
import math
import re
import time
from urllib.parse import unquote, unquote_plus

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from service.engine.admission import Hint, PredictedLate, hint_from, refusal, retry_after
from service.errors import ActserveError, DeadlineExceeded, error_body
from service.exchange import request_start
from service.exchange.auth import authorised
from service.exchange.services import Services
from service.http.guard import host_allowed, host_name
from service.http.middleware import REQUEST_ID

ARRIVAL_KEY = "actserve.arrived"
HINT_HEADERS = (b"content-length", b"content-type", b"authorization")
_HINT_QUERY = ("dtype", "timeout", "priority")
_NATIVE = re.compile(rb"/v1/activations/([^/?]+)")
_V2 = re.compile(rb"/v2/models/([^/?]+)(?:/versions/[^/?]+)?/infer")
_ID_RE = re.compile(REQUEST_ID.encode())
MIN_BUDGET_S = 0.05  # the shortest timeout the protocol's quick pre-check allows for
MEMO_MAX = 256  # request lines and Host values the unparsed path remembers (client-chosen
# bytes: the memo is emptied when full, so it can never grow past this)
RATE_DECAY = 0.98  # per interval: the remembered best rate halves in about 35 intervals


def query_hints(raw: bytes) -> dict[str, str]:
    """The query keys admission reads, from the raw query string (a malformed value is left
    for the decoder to refuse)."""
    if not raw:
        return {}
    out = {}
    for part in raw.split(b"&"):
        key, _, value = part.partition(b"=")
        name = key.decode("latin-1")
        if name in _HINT_QUERY:
            out[name] = unquote_plus(value.decode("latin-1"))
    return out


def hint_headers(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The headers admission reads, from a request's raw (lower-case) headers."""
    return {key.decode(): value.decode("latin-1") for key, value in headers
            if key in HINT_HEADERS}


def raw_hint(name: str, api: str, query_string: bytes, headers: list[tuple[bytes, bytes]],
             client: str | None, now: float, default_timeout_s: float) -> Hint:
    """``admission.hint_from`` of a request's raw (lower-case) headers and query string."""
    query = query_hints(query_string) if api == "native" else {}
    return hint_from(name, query, hint_headers(headers), client, now, default_timeout_s, api)


class Shed:
    """The protocol's question: refuse this request now? One per app (one event loop).

    Two signals say the server is busy. The engine's (``Engine.busy``: queue full, or a
    new request's predicted wait over the target delay): the protocol then makes the
    admission check the application would make. And the server's *standing delay*: the
    least time a request the application answered waited in the server (from its
    arrival until the application reached it, plus its wait in the engine's queue; for an
    overload refusal, all its time), over each ``overload_interval_ms`` — CoDel's
    measure, taken over the whole server because with one core shared by the loop and the
    compute thread, small requests wait in the loop as much as in the queue.
    Once it is over the target (and until it falls under half of it: hysteresis, as a
    state that flipped every interval lets a flood in every other one; and not after two
    intervals idle with nothing held), a request is refused 503 ``predicted_late`` when
    the application already holds more than it can answer within a fraction of the
    request's timeout: ``rate x timeout x overload_fresh_fraction`` (Little's law;
    ``rate``: the best rate it served at lately, remembered with a slow decay so the limit
    does not follow the rate down when it is the refusing that slows the loop; ``timeout``:
    the query's, else the default). So the served stay fresh in proportion to what their
    callers allow: under a 1 s timeout a request waits at most about 100 ms, and a burst
    of requests with the default 30 s is held and served, not refused. Over the shortest
    budget's limit the protocol makes this check on the raw bytes, unparsed
    (``ShedConnection.fast_refusal``). At or below capacity some request is answered
    quickly in every interval and nothing is refused."""

    def __init__(self, services: Services, clock=time.monotonic) -> None:
        s = services.settings
        self.engine = services.engine
        self.recorder = services.recorder
        self.clock = clock
        self.enabled = s.overload_admission
        self.target = s.overload_target_delay_ms / 1000
        self.interval = s.overload_interval_ms / 1000
        self.fraction = s.overload_fresh_fraction
        self.default_timeout_s = s.default_timeout_s
        self.api_keys = [k.encode() for k in s.api_key_list]
        self.hosts = None if "*" in s.allowed_host_list else s.allowed_host_list
        self.refused = 0  # answered here (not by the application)
        self.services = services  # its ``readiness``: the probes' answers while congested
        self.cap = 1 << 30  # the limit on held requests, refreshed every interval
        self._unflushed = 0  # fast refusals not yet in the metrics (``flush``)
        self._routes: dict[bytes, tuple[str, str, dict, float] | None] = {}  # ``route``
        self._hosts: dict[bytes, bool] = {}  # ``host_ok``
        # the server's default headers (its list, and them as bytes): ``ShedConnection._answer``
        self.defaults: tuple[list | None, bytes] = (None, b"")
        if self.recorder.metrics is not None:
            self.recorder.metrics.before_scrape(self.flush)
        # the standing delay: the least delay of the last interval (CoDel's measure)
        self._window = 0.0  # the current interval's start
        self._min_now = math.inf  # the least delay of the current one so far
        self.standing = 0.0
        self.congested = False
        self._seen = 0  # requests that reached the application this interval
        self.rate = 0.0  # ... a second, over the last interval

    def observe(self, delay: float, served: bool = True) -> None:
        """The application answered a request ``delay`` seconds after it arrived: served,
        or refused for overload (its wait counts, its answer not in the rate). Without the
        refusals, a server refusing everything it reads would measure nothing, look idle,
        and let everything in again."""
        if served:
            self._seen += 1
        if delay < self._min_now:
            self._min_now = delay
        now = self.clock()
        if now - self._window >= self.interval:
            self._roll(now)

    def _roll(self, now: float) -> None:
        """An interval is over: its least delay decides the state, with hysteresis (in
        over the target, out under half of it: a state that flipped every interval would
        let a flood in every other one); its answers a second, the rate."""
        span = now - self._window
        self.standing = self._min_now
        if self.standing > self.target:
            self.congested = True
        elif self.standing < self.target / 2:
            self.congested = False
        # the best rate lately, decaying: the limit must not follow the rate down when
        # it is the limit that holds the rate down (refusing slows the loop)
        seen = self._seen / span if span < 2 * self.interval else 0.0
        self.rate = max(seen, self.rate * RATE_DECAY)
        self.cap = self.limit(MIN_BUDGET_S)
        self._window, self._min_now, self._seen = now, math.inf, 0

    def limit(self, budget_s: float) -> int:
        """Requests the application may hold for a new request with ``budget_s`` seconds
        to its deadline to wait at most ``overload_fresh_fraction`` of them (Little's law:
        the wait is about what is held over the rate it is served at)."""
        return max(8, int(self.rate * budget_s * self.fraction))

    def budget(self, query: bytes) -> float:
        """The request's own timeout from its raw query string (native API), else the
        default: the seconds it has."""
        i = query.find(b"timeout=")
        if i >= 0 and (i == 0 or query[i - 1:i] == b"&"):
            try:
                t = float(query[i + 8:].partition(b"&")[0])
            except ValueError:
                return self.default_timeout_s
            if 0 < t < 1e9:
                return t
        return self.default_timeout_s

    def shedding(self, held: int) -> bool:
        """Refuse activation requests unparsed now: the server is congested and the
        application holds at least the shortest budget's limit
        (``ShedConnection.fast_refusal`` then checks each request's own)."""
        return held >= self.cap and self.congested and self.enabled

    def late(self, held: int, budget: float) -> ActserveError:
        """503 ``predicted_late``: ``held`` requests ahead, answered at ``rate``, leave no
        room within ``budget`` seconds."""
        return refusal(PredictedLate, self._late_text(held, budget),
                       self._late_retry_s(held, budget))

    def _late_retry_s(self, held: int, budget: float) -> float:
        """How long until ``held`` requests, answered at ``rate``, fit in ``budget``."""
        wait = held / self.rate if self.rate else budget  # unmeasured: retry soon
        return wait - budget * self.fraction

    def _late_text(self, held: int, budget: float) -> str:
        return (f"the server is overloaded: {held} requests ahead of this one, answered at "
                f"about {self.rate:.0f} a second, would keep it waiting for more than "
                f"{self.fraction:.0%} of its {budget * 1000:.0f} ms timeout; retry later")

    def fast_answer(self, api: str, held: int, budget: float) -> tuple[bytes, int]:
        """The unparsed refusal's JSON body for ``api`` and its ``Retry-After``: what
        ``late`` says, without building the exception."""
        return (error_body(api == "v2", PredictedLate.type, self._late_text(held, budget)),
                retry_after(self._late_retry_s(held, budget)))

    def count_fast(self) -> None:
        self.refused += 1
        self._unflushed += 1

    def flush(self) -> None:
        """Fast refusals into ``actserve_rejections_total`` (a plain count until a scrape)."""
        n, self._unflushed = self._unflushed, 0
        m = self.recorder.metrics
        if n and m is not None:
            m.child(m.rejections, "predicted_late").inc(n)
            m.child(m.overload_stages, "unparsed").inc(n)

    def refusal(self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]],
                client: str | None, arrived: float,
                held: int) -> tuple[str, str, ActserveError] | None:
        """(api, activation, the refusal) for a request the server would refuse now; None
        to let the application handle it. ``held``: the requests the application holds."""
        if not self.enabled or method != b"POST":
            return None
        congested = self.congested_now(held, arrived)
        # arrived (its bytes in the kernel, or its caller's stamp) longer ago than the
        # shortest budget: it may be late
        now = self.clock()
        if not congested and now - arrived <= MIN_BUDGET_S and not self.engine.busy():
            return None
        route = self.route(url)
        if route is None:
            return None
        api, name, query, budget = route
        activation = self.engine.registry.find(name)
        if activation is None or not self._let_through(headers):
            return None  # the application answers 404, 401 or 400 as it always does
        exc = self.decide(api, activation.name, query, budget, hint_headers(headers), client,
                          arrived, now, held, congested, "headers")
        return None if exc is None else (api, activation.name, exc)

    def congested_now(self, held: int, arrived: float) -> bool:
        """``congested``, ended when nothing was answered for two intervals and nothing is
        held: idle since (a stall holds requests, and stays congested)."""
        if self.congested and not held and arrived - self._window >= 2 * self.interval:
            self.congested = False
        return self.congested

    def unparsed(self, held: int) -> bool:
        """Try refusing a new request from its raw bytes now
        (``ShedConnection.fast_refusal``): congested with the application holding the
        shortest budget's limit, or the engine busy (its queue full, or a new request's
        predicted wait over the target)."""
        return self.shedding(held) or (self.enabled and self.engine.busy())

    def decide(self, api: str, name: str, query: dict[str, str], budget: float,
               headers: dict[str, str], client: str | None, arrived: float, now: float,
               held: int, congested: bool, stage: str) -> ActserveError | None:
        """The refusal of a request for the known activation ``name`` from what its
        request line and headers say (``query``: the keys admission reads, ``budget``: its
        timeout in seconds, ``headers``: ``hint_headers``), or None: its deadline already
        passed (counted from ``arrived``: when its bytes reached the kernel for a new
        connection's first request, or a trusted stamp), more held than it can wait for while
        congested, or what the engine's ``admit`` refuses. Counted as the application
        counts its refusals, at ``stage`` (``unparsed_admission``: from the raw bytes;
        ``headers``: after parsing them)."""
        try:
            if now - arrived > MIN_BUDGET_S and arrived + budget <= now:
                raise DeadlineExceeded(request_start.STALE)
            if congested and held >= self.limit(budget):
                raise self.late(held, budget)
            hint = hint_from(name, query, headers, client, arrived, self.default_timeout_s, api)
            # a copy: admit keeps the hint in a context variable for the request's own
            # task, and this runs in the protocol's callback, not in that task
            contextvars.copy_context().run(self.engine.admit, hint)
        except ActserveError as exc:
            self.refused += 1
            recorder = self.recorder
            recorder.reject(exc, stage)  # counted as the application counts its refusals
            recorder.request_started()
            recorder.record(api, name, exc.status, total=self.clock() - arrived)
            return exc
        return None

    def _let_through(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """The checks the application makes before overload: a valid API key, an allowed
        Host (only when configured)."""
        if not self.api_keys and self.hosts is None:
            return True
        token = host = None
        for key, value in headers:
            if key == b"authorization":
                token = value
            elif key == b"host":
                host = value
        if self.api_keys and (token is None or not authorised(token, self.api_keys)):
            return False
        return self.hosts is None or (
            host is not None and host_allowed(host_name(host.decode("latin-1")), self.hosts))

    def host_ok(self, head: bytes) -> bool:
        """The ``Host`` check of ``_let_through`` on a raw, lower-cased header block
        (memoised by the header's value)."""
        if self.hosts is None:
            return True
        i = head.find(b"\r\nhost:")
        if i < 0:
            return False
        j = head.find(b"\r\n", i + 2)
        value = head[i + 7:j if j > 0 else len(head)]
        ok = self._hosts.get(value)
        if ok is None:
            ok = host_allowed(host_name(value.strip().decode("latin-1")), self.hosts)
            if len(self._hosts) >= MEMO_MAX:
                self._hosts.clear()
            self._hosts[value] = ok
        return ok

    def route(self, target: bytes) -> tuple[str, str, dict[str, str], float] | None:
        """(api, activation name, the query's keys admission reads, the request's budget in
        seconds) of a raw request target (path and query) when it is an activation route
        the protocol may refuse, else None (memoised: a function of the target's bytes
        alone; the name is looked up in the registry at each use, so a registration counts
        at once; the caller must not change the mapping)."""
        got = self._routes.get(target, self)
        if got is self:
            got = self._route(target)
            if len(self._routes) >= MEMO_MAX:
                self._routes.clear()
            self._routes[target] = got
        return got

    def _route(self, target: bytes) -> tuple[str, str, dict[str, str], float] | None:
        path, _, query = target.partition(b"?")
        if (match := _NATIVE.fullmatch(path)) is not None:
            api = "native"
        elif (match := _V2.fullmatch(path)) is not None:
            api = "v2"
        else:
            return None
        native = api == "native"
        return (api, unquote(match.group(1).decode("latin-1")),
                query_hints(query) if native else {},
                self.budget(query) if native else self.default_timeout_s)


def _line_end(head: bytes, at: int) -> int:
    """Where the header line that starts at ``at`` (its CRLF) ends in ``head``."""
    j = head.find(b"\r\n", at + 2)
    return j if j > 0 else len(head)


def _hint_headers(data: bytes, head: bytes, first: int, length: int) -> dict[str, str]:
    """``hint_headers`` of a raw header block: ``head`` is ``data[first:end]`` lower-cased
    (the names are found there; an ``Authorization`` value is taken from ``data``, its
    case kept); ``length``: its Content-Length, already read."""
    out = {"content-length": str(length)}
    i = head.find(b"\r\ncontent-type:")
    if i >= 0:
        out["content-type"] = head[i + 15:_line_end(head, i)].strip().decode("latin-1")
    i = head.find(b"\r\nauthorization:")
    if i >= 0:
        out["authorization"] = data[first + i + 16:first + _line_end(head, i)].strip().decode(
            "latin-1")
    return out


def _client_id(data: bytes, head: bytes, first: int) -> bytes | None:
    """The client's ``X-Request-Id`` from a raw header block when it is one the server
    keeps (as the application and ``shed_send`` keep it), else None."""
    i = head.find(b"\r\nx-request-id:")
    if i < 0:
        return None
    value = data[first + i + 15:first + _line_end(head, i)].strip()
    return value if _ID_RE.match(value) else None


class _Answered:
    """The cycle of a request answered from the protocol: complete, so uvicorn drops the
    body that follows (``on_body`` and ``on_message_complete`` return early)."""

    __slots__ = ("disconnected", "keep_alive", "response_complete")

    class _NoEvent:
        def set(self) -> None:
            pass

    message_event = _NoEvent()  # uvicorn sets it when the connection is lost

    def __init__(self) -> None:
        self.response_complete = True
        self.keep_alive = True
        self.disconnected = False


class ShedConnection:
    """Mixin for uvicorn's httptools protocol (before it in the bases; ``header_timeout.py``
    calls it): answers the refusals ``Shed`` makes. Refused after its headers were parsed,
    the answer goes out when the request's body has arrived (dropped, unparsed), keeping the
    connection, or at the end of a read with ``Connection: close`` when the body is still
    arriving, closed after a linger so the client reads the answer first. Refused
    unparsed, the answer goes out at once and the rest of the body is skipped as it
    arrives, keeping the connection (closing it would have the client connect again while
    the server is busiest)."""

    shed: Shed | None = None
    request_ids = None  # () -> a new request id (bytes)
    access = None  # the AccessLog, or None
    linger_s = 1.0
    _shed_answer: tuple[str, str, ActserveError] | None = None
    _skip = 0  # body bytes of a request refused unparsed still to drop
    _admitted = False  # the raw bytes' decision let this request through: not asked again
    kernel_wait = 0.0  # seconds a new connection's first read waited in the kernel (during it)

    def fast_probe(self, data: bytes) -> bool:
        """While congested: ``GET /healthz`` and ``GET /readyz`` answered from the raw bytes,
        as their routes answer (``Services.readiness``: a worker's asks the cluster's
        flags), where a prober would otherwise wait behind every request the application
        holds, its task hopping through the loop's queue several times. True when
        answered."""
        shed = self.shed
        if data.startswith(b"GET /healthz "):
            path = "/healthz"
        elif data.startswith(b"GET /readyz "):
            path = "/readyz"
        else:
            return False
        if not data.endswith(b"\r\n\r\n") or data.find(b"\r\n\r\n") != len(data) - 4:
            return False  # partial, with a body, or pipelined: the parser's
        head = data[:len(data) - 4].lower()
        if not shed.host_ok(head):
            return False
        keep_alive = (head[:head.find(b"\r\n")].endswith(b"http/1.1")
                      and b"\r\nconnection: close" not in head)
        status, body, retry = shed.services.readiness(path)
        rid = self.request_ids()
        self.transport.write(self._answer(status, body, rid, retry, keep_alive))
        self._disarm()
        if self.access is not None and self.access.enabled():
            self.access.write({
                "id": rid.decode(), "client": self.client[0] if self.client else None,
                "transport": "http",
                "method": "GET", "path": path,
                "status": status})
        if keep_alive:
            self.on_response_complete()
        else:
            self.server_state.total_requests += 1
            self.transport.close()  # nothing unread: the request was whole
        return True

    def _answer(self, status: int, body: bytes, rid: bytes, retry: int | None,
                keep_alive: bool) -> bytes:
        """A whole JSON answer: status line, the server's default headers, the id,
        ``Retry-After`` when given, ``Connection: close`` unless kept."""
        defaults = self.server_state.default_headers  # a new list each second (the date)
        shed = self.shed
        if shed.defaults[0] is not defaults:
            shed.defaults = (defaults, b"".join(b"%s: %s\r\n" % (name, value)
                                                for name, value in defaults))
        out = [STATUS_LINE[status], shed.defaults[1],
               b"content-type: application/json\r\ncontent-length: ",
               str(len(body)).encode(), b"\r\nx-request-id: ", rid, b"\r\n"]
        if retry is not None:
            out.extend([b"retry-after: ", str(retry).encode(), b"\r\n"])
        out.extend([b"\r\n" if keep_alive else b"connection: close\r\n\r\n", body])
        return b"".join(out)

    def skip_body(self, data: bytes) -> bytes:
        """Drop the rest of a body refused unparsed; what follows it (the next request)."""
        n = min(self._skip, len(data))
        self._skip -= n
        return data[n:] if n < len(data) else b""

    def fast_refusal(self, data: bytes) -> bool:
        """Called while ``Shed.unparsed``: refuse a new activation request in ``data``
        without parsing it (a few byte searches and one short answer: no parser callbacks,
        no scope) when what the application holds leaves it no time, or when what its
        request line and headers say is refused (``Shed.decide``: the engine's admission,
        a trusted stamp already past its deadline). True when answered. Anything unusual (a
        partial header block, another route, chunked, pipelined, API keys to check) is left
        to the parser and ``Shed.refusal``."""
        shed = self.shed
        if shed.api_keys or not data.startswith(b"POST /"):
            return False
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        first = data.find(b"\r\n")
        line = data[5:first]  # the target and the version
        target = line[:line.rfind(b" ")]
        route = shed.route(target)
        if route is None:
            return False
        api, name, query, budget = route
        activation = shed.engine.registry.find(name)
        if activation is None:
            return False
        head = data[first:end].lower()
        if not shed.host_ok(head):
            return False
        i = head.find(b"\r\ncontent-length:")
        if i < 0 or b"\r\ntransfer-encoding:" in head:
            return False
        j = head.find(b"\r\n", i + 2)
        try:
            length = int(head[i + 17:j if j > 0 else len(head)])
        except ValueError:
            return False
        have = len(data) - end - 4
        if have > length:
            return False  # pipelined: another request follows
        keep_alive = (line.endswith(b"HTTP/1.1") and b"\r\nconnection: close" not in head
                      # a client that sent Expect holds its body back until a 100 it never
                      # gets: skipping that body would swallow its next request
                      and (have == length or b"\r\nexpect:" not in head))
        held = len(self.tasks)
        now = shed.clock()
        arrived = now - self.kernel_wait  # a new connection's first request: its wait too
        congested = shed.congested_now(held, now)
        if congested and held >= shed.limit(budget):
            # the cheapest answer: counted in the metrics at the next scrape
            status, error = 503, PredictedLate.type
            body, retry = shed.fast_answer(api, held, budget)
            shed.count_fast()
        else:
            waited = None
            starts = shed.services.starts  # None unless the server trusts the stamps
            if starts is not None and (k := head.find(b"\r\nx-request-start:")) >= 0:
                arrived, waited = starts.moved(arrived, head[k + 18:_line_end(head, k)])
            exc = shed.decide(api, activation.name, query, budget,
                              _hint_headers(data, head, first, length),
                              self.client[0] if self.client else None, arrived, now, held,
                              congested, "unparsed_admission")
            if exc is None:  # it may finish in time: the parser and the application, the
                self._admitted = True  # same decision not made again (``refused_early``)
                return False
            if starts is not None:
                starts.count(waited)  # read here, never by the parser
            status, error, retry = exc.status, exc.type, exc.retry_after
            body = error_body(api == "v2", exc.type, exc.message)
        rid = _client_id(data, head, first) or self.request_ids()
        self.transport.write(self._answer(status, body, rid, retry, keep_alive))
        self._disarm()
        if self.access is not None and self.access.enabled():
            path = unquote(target.partition(b"?")[0].decode("latin-1"))
            self.access.write({
                "id": rid.decode(), "client": self.client[0] if self.client else None,
                "transport": "http",
                "method": "POST", "path": path, "status": status,
                "api": api, "activation": activation.name, "error": error})
        if keep_alive:
            # the rest of the body, still arriving, is dropped unparsed (``skip_body``):
            # cheaper than closing, which would have the client connect again while the
            # server is busiest
            self._skip = length - have
            self.on_response_complete()  # the keep-alive timer, as after any answer
        else:
            # the rest of the body is never read: reading is paused, and the connection
            # closed after a linger (the client reads the answer first; closing at once
            # with unread bytes would reset it)
            self._discarding = True
            self.transport.pause_reading()
            self.server_state.total_requests += 1
            self.loop.call_later(self.linger_s, self.transport.close)
        return True

    def refused_early(self) -> bool:
        """At the end of a request's headers: True when ``Shed.refusal`` refused it (its
        answer goes out with ``shed_send`` when its body has arrived, or at the end of the
        read)."""
        if self._admitted:  # decided from its raw bytes in this same read (fast_refusal)
            self._admitted = False
            return False
        if (self._drain_requested or not (self.cycle is None or self.cycle.response_complete)
                or self.parser.should_upgrade()):
            return False
        refused = self.shed.refusal(self.parser.get_method(), self.url, self.headers,
                                    self.client[0] if self.client else None,
                                    self.scope[ARRIVAL_KEY], len(self.tasks))
        if refused is None:
            return False
        self._mid_request = False
        self._shed_answer = refused
        self.cycle = _Answered()
        return True

    def shed_send(self, keep_alive: bool) -> None:
        api, activation, exc = self._shed_answer
        self._shed_answer = None
        rid = None
        for name, value in self.headers:
            if name == b"x-request-id":
                rid = value if _ID_RE.match(value) else None
                break
        rid = rid or self.request_ids()
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(self._answer(exc.status, error_body(api == "v2", exc.type, exc.message),
                                     rid, exc.retry_after, keep_alive))
        if self.access is not None and self.access.enabled():
            self.access.write({
                "id": rid.decode("latin-1"), "client": self.client[0] if self.client else None,
                "transport": "http", "method": self.scope["method"],
                "path": unquote(self.url.partition(b"?")[0].decode("latin-1")),
                "status": exc.status,
                "ms": round((time.monotonic() - self.scope[ARRIVAL_KEY]) * 1000, 3),
                "api": api, "activation": activation, "error": exc.type})
        if keep_alive:
            self.on_response_complete()  # the keep-alive timer, as after any answer
            return
        self.server_state.total_requests += 1
        # drop what the client still sends, then close (closing with unread bytes would
        # reset the connection, and the client could lose the answer)
        self._discarding = True
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(self.linger_s, transport.close)
