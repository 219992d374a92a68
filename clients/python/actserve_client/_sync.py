"""``Client``: the blocking shell around the shared core. It only sends and sleeps."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np

from . import _shm
from ._base import (
    DEFAULT_BASE_URL,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_TIMEOUT_S,
    ActivationInfo,
    Call,
    ClientCore,
)
from ._exceptions import ActserveError, APITimeoutError
from ._retry import DEFAULT_MAX_RETRIES, RetryPolicy


class Client:
    """A blocking actserve client with a connection pool. Thread-safe; use it as a context
    manager (or call ``close()``) to release its connections.

    ``timeout``: seconds to wait for each answer (``connect_timeout`` to connect).
    ``max_retries``: extra tries after a connection failure, 503 or 504.
    ``api_key``: sent as ``Authorization: Bearer <key>``.
    ``protocol``: "v2" (binary tensors, default), "v2-json", "native" or "native-json".
    ``max_connections``: size of the connection pool.
    ``retry_policy``: backoff details (overrides ``max_retries``); ``headers``: sent with
    every request; ``transport``: an httpx transport (tests, proxies, ASGI apps).
    ``shared_memory``: "auto" sends tensors of ``shared_memory_threshold`` bytes (1 MiB) and
    more through system shared memory when the server is on this host (checked once with
    a probe region the server must read back; otherwise, and for "off", over HTTP).
    ``stamp_start``: every try carries ``X-Request-Start`` (its send time), so a server run
    with ``trust_request_start`` counts the request's ``timeout`` from then, time spent in
    queues before it read the request included.
    """

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_retries: int = DEFAULT_MAX_RETRIES, api_key: str | None = None,
                 protocol: str = "v2", connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 retry_policy: RetryPolicy | None = None, headers: Mapping[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None, shared_memory: str = "off",
                 shared_memory_threshold: int = _shm.DEFAULT_THRESHOLD,
                 stamp_start: bool = False) -> None:
        self._core = ClientCore(base_url, timeout=timeout, max_retries=max_retries,
                                api_key=api_key, protocol=protocol,
                                connect_timeout=connect_timeout, max_connections=max_connections,
                                retry_policy=retry_policy, headers=headers,
                                shared_memory=shared_memory,
                                shared_memory_threshold=shared_memory_threshold,
                                stamp_start=stamp_start)
        self._http = httpx.Client(**self._core.http_options(), transport=transport)
        self._regions = _shm.RegionPool()
        self._shm_ok: bool | None = None  # None: not probed yet
        self._probe_lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return self._core.base_url

    # -- the one place that does I/O ------------------------------------------------------
    def _execute(self, call: Call) -> Any:
        retries = 0
        while True:
            req = call.request
            try:
                response = self._http.request(
                    req.method, req.path, content=req.content, params=req.params,
                    headers=self._core.headers_at(req, time.time()),
                    timeout=self._core.http_timeout(call) or httpx.USE_CLIENT_DEFAULT)
            except httpx.RequestError as exc:
                outcome = self._core.on_transport_error(call, retries, exc)
            else:
                outcome = self._core.on_response(call, retries, response.status_code,
                                                 response.headers, response.content)
            if outcome.retry_in is None:
                return outcome.unwrap()
            time.sleep(outcome.retry_in)
            retries += 1

    # -- the API --------------------------------------------------------------------------
    def activate(self, name: str, x: Any, /, *, compute_dtype: Any = None,
                 amp: bool | None = False, inplace: bool | None = False,
                 timeout: float | None = None, protocol: str | None = None,
                 outputs: Any = None, grad_output: Any = None, report: Any = None,
                 **params: Any) -> Any:
        """Apply activation ``name`` to ``x`` on the server and return the result as the
        same kind as ``x`` (numpy array, torch tensor, nested list or number), same shape.

        ``**params`` are the activation's parameters (``negative_slope=0.1``, ...).
        ``compute_dtype``: "float32", "float16", "bfloat16", "float64" (or a numpy/torch
        dtype): the dtype the activation runs in and the result's dtype; None: the input's.
        ``amp``: run under autocast on the server; ``inplace``: use the in-place variant on
        the server's copy (None for either: the server's default).
        ``timeout``: seconds; the server's deadline for this request and the wait for it.
        ``protocol``: override the client's wire format for this call.

        The lab (docs/lab.md): ``outputs`` ("value", "grad" or both), ``grad_output`` (the
        upstream gradient of a vector-Jacobian product, the input's dtype and shape) and
        ``report`` ("numerics", "profile") make the call return an ``Answer`` with
        ``value``, ``grad`` and ``report``; such calls travel in the native binary format.
        """
        if outputs is not None or grad_output is not None or report is not None:
            return self._execute(self._core.activate_call(
                name, x, compute_dtype=compute_dtype, amp=amp, inplace=inplace,
                timeout=timeout, options=params, outputs=outputs, grad_output=grad_output,
                report=report))
        need = self._core.shm_bytes(x, compute_dtype, amp, protocol)
        if need and self._shared_memory_works():
            region = self._lease(need)
            try:
                return self._execute(self._core.activate_call(
                    name, x, compute_dtype=compute_dtype, amp=amp, inplace=inplace,
                    timeout=timeout, protocol=protocol, options=params, region=region))
            finally:
                self._regions.give_back(region)
        return self._execute(self._core.activate_call(
            name, x, compute_dtype=compute_dtype, amp=amp, inplace=inplace, timeout=timeout,
            protocol=protocol, options=params))

    @property
    def uses_shared_memory(self) -> bool:
        """True once the probe showed the server reads this host's shared memory."""
        return bool(self._shm_ok)

    def _shared_memory_works(self) -> bool:
        if self._shm_ok is not None:
            return self._shm_ok
        with self._probe_lock:
            if self._shm_ok is None:
                self._shm_ok = self._probe()
        return self._shm_ok

    def _probe(self) -> bool:
        values = _shm.probe_values()
        try:
            region = self._lease(2 * values.nbytes)
        except (ActserveError, OSError):
            return False  # another host, the extension off, no /dev/shm here
        try:
            back = self._execute(self._core.activate_call("relu", values, region=region))
            return bool(np.array_equal(back, values))
        except ActserveError:
            return False
        finally:
            self._regions.give_back(region)

    def _lease(self, nbytes: int) -> _shm.Region:
        region = self._regions.take(nbytes)
        if region is not None:
            return region
        region = self._regions.new(nbytes)
        try:
            self._execute(self._core.register_call(region))
        except BaseException:
            _shm.destroy(region)
            raise
        self._regions.adopt(region)
        return region

    def activate_many(self, name: str, xs: Iterable[Any], /, *, concurrency: int | None = None,
                      compute_dtype: Any = None, amp: bool | None = False,
                      inplace: bool | None = False, timeout: float | None = None,
                      protocol: str | None = None, **params: Any) -> list[Any]:
        """``activate`` for each of ``xs``, at most ``concurrency`` (default 8, capped at
        ``max_connections``) in flight at once; results in the order of ``xs``. The first
        error is raised once the requests already in flight have finished; requests not
        yet started are dropped."""
        items = list(xs)
        if not items:
            return []
        workers = min(self._core.concurrency(concurrency), len(items))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="actserve-client")
        try:
            futures = [pool.submit(self.activate, name, x, compute_dtype=compute_dtype, amp=amp,
                                   inplace=inplace, timeout=timeout, protocol=protocol, **params)
                       for x in items]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def register(self, name: str, expr: str, /, **params: Any) -> ActivationInfo:
        """Register a custom activation ``expr`` (docs/custom-activations.md) as ``name``;
        ``**params``: its declared params, each a default or ``{"default", "min", "max",
        "doc"}``. Returns its catalogue entry; ConflictError (409) if the name exists."""
        return self._execute(self._core.add_activation_call(name, expr, params))

    def unregister(self, name: str, /) -> None:
        """Remove the custom activation ``name`` (built-in ones: BadRequestError)."""
        self._execute(self._core.delete_activation_call(name))

    def activations(self) -> dict[str, ActivationInfo]:
        """The server's catalogue: activation name -> formula, parameters, in-place support."""
        return self._execute(self._core.catalogue_call())

    def stats(self) -> dict[str, Any]:
        """The server's ``/v1/stats`` snapshot (latency percentiles, throughput, queue)."""
        return self._execute(self._core.stats_call())

    def health(self) -> bool:
        """True when the server process answers its liveness probe; never raises."""
        return self._execute(self._core.probe_call("/healthz"))

    def ready(self) -> bool:
        """True when the server accepts work (warmed up, not draining); never raises."""
        return self._execute(self._core.probe_call("/readyz"))

    def wait_until_ready(self, timeout: float = 30.0, *, interval: float = 0.1) -> None:
        """Poll ``ready()`` until it is true; ``APITimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            left = deadline - time.monotonic()
            if left <= 0:
                raise APITimeoutError(f"{self.base_url} was not ready within {timeout:g} s")
            time.sleep(min(interval, left))

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Release the shared-memory regions and close every pooled connection. The client
        cannot be used afterwards."""
        for region in self._regions.drain():
            try:
                self._execute(self._core.unregister_call(region))
            except ActserveError:
                pass  # the server is gone: it released its side
            _shm.destroy(region)
        self._http.close()

    @property
    def is_closed(self) -> bool:
        return self._http.is_closed

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.base_url!r}, protocol={self._core.protocol!r})"
