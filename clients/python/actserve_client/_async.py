"""``AsyncClient``: the asyncio shell around the shared core. It only sends and sleeps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
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


class AsyncClient:
    """The asyncio twin of ``Client``: same arguments, same methods, awaited. Use it as an
    async context manager (or ``await aclose()``) to release its connections."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, *, timeout: float = DEFAULT_TIMEOUT_S,
                 max_retries: int = DEFAULT_MAX_RETRIES, api_key: str | None = None,
                 protocol: str = "v2", connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 retry_policy: RetryPolicy | None = None, headers: Mapping[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, shared_memory: str = "off",
                 shared_memory_threshold: int = _shm.DEFAULT_THRESHOLD,
                 stamp_start: bool = False) -> None:
        self._core = ClientCore(base_url, timeout=timeout, max_retries=max_retries,
                                api_key=api_key, protocol=protocol,
                                connect_timeout=connect_timeout, max_connections=max_connections,
                                retry_policy=retry_policy, headers=headers,
                                shared_memory=shared_memory,
                                shared_memory_threshold=shared_memory_threshold,
                                stamp_start=stamp_start)
        self._http = httpx.AsyncClient(**self._core.http_options(), transport=transport)
        self._regions = _shm.RegionPool()
        self._shm_ok: bool | None = None  # None: not probed yet
        self._probe_lock = asyncio.Lock()

    @property
    def base_url(self) -> str:
        return self._core.base_url

    # -- the one place that does I/O ------------------------------------------------------
    async def _execute(self, call: Call) -> Any:
        retries = 0
        while True:
            req = call.request
            try:
                response = await self._http.request(
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
            await asyncio.sleep(outcome.retry_in)
            retries += 1

    # -- the API (see Client for the full descriptions) -----------------------------------
    async def activate(self, name: str, x: Any, /, *, compute_dtype: Any = None,
                       amp: bool | None = False, inplace: bool | None = False,
                       timeout: float | None = None, protocol: str | None = None,
                       outputs: Any = None, grad_output: Any = None, report: Any = None,
                       **params: Any) -> Any:
        """Apply activation ``name`` to ``x``; the result is the same kind and shape as ``x``
        (an ``Answer`` when ``outputs``, ``grad_output`` or ``report`` is given)."""
        if outputs is not None or grad_output is not None or report is not None:
            return await self._execute(self._core.activate_call(
                name, x, compute_dtype=compute_dtype, amp=amp, inplace=inplace,
                timeout=timeout, options=params, outputs=outputs, grad_output=grad_output,
                report=report))
        need = self._core.shm_bytes(x, compute_dtype, amp, protocol)
        if need and await self._shared_memory_works():
            region = await self._lease(need)
            try:
                return await self._execute(self._core.activate_call(
                    name, x, compute_dtype=compute_dtype, amp=amp, inplace=inplace,
                    timeout=timeout, protocol=protocol, options=params, region=region))
            finally:
                self._regions.give_back(region)
        return await self._execute(self._core.activate_call(
            name, x, compute_dtype=compute_dtype, amp=amp, inplace=inplace, timeout=timeout,
            protocol=protocol, options=params))

    @property
    def uses_shared_memory(self) -> bool:
        return bool(self._shm_ok)

    async def _shared_memory_works(self) -> bool:
        if self._shm_ok is not None:
            return self._shm_ok
        async with self._probe_lock:
            if self._shm_ok is None:
                self._shm_ok = await self._probe()
        return self._shm_ok

    async def _probe(self) -> bool:
        values = _shm.probe_values()
        try:
            region = await self._lease(2 * values.nbytes)
        except (ActserveError, OSError):
            return False
        try:
            back = await self._execute(self._core.activate_call("relu", values, region=region))
            return bool(np.array_equal(back, values))
        except ActserveError:
            return False
        finally:
            self._regions.give_back(region)

    async def _lease(self, nbytes: int) -> _shm.Region:
        region = self._regions.take(nbytes)
        if region is not None:
            return region
        region = self._regions.new(nbytes)
        try:
            await self._execute(self._core.register_call(region))
        except BaseException:
            _shm.destroy(region)
            raise
        self._regions.adopt(region)
        return region

    async def activate_many(self, name: str, xs: Iterable[Any], /, *,
                            concurrency: int | None = None, compute_dtype: Any = None,
                            amp: bool | None = False, inplace: bool | None = False,
                            timeout: float | None = None, protocol: str | None = None,
                            **params: Any) -> list[Any]:
        """``activate`` for each of ``xs``, at most ``concurrency`` in flight; results in
        order. On the first error the other requests are cancelled and the error raised."""
        items = list(xs)
        if not items:
            return []
        gate = asyncio.Semaphore(self._core.concurrency(concurrency))

        async def one(x: Any) -> Any:
            async with gate:
                return await self.activate(name, x, compute_dtype=compute_dtype, amp=amp,
                                           inplace=inplace, timeout=timeout, protocol=protocol,
                                           **params)

        tasks = [asyncio.ensure_future(one(x)) for x in items]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def register(self, name: str, expr: str, /, **params: Any) -> ActivationInfo:
        """``Client.register``: a custom activation; its catalogue entry."""
        return await self._execute(self._core.add_activation_call(name, expr, params))

    async def unregister(self, name: str, /) -> None:
        await self._execute(self._core.delete_activation_call(name))

    async def activations(self) -> dict[str, ActivationInfo]:
        return await self._execute(self._core.catalogue_call())

    async def stats(self) -> dict[str, Any]:
        return await self._execute(self._core.stats_call())

    async def health(self) -> bool:
        return await self._execute(self._core.probe_call("/healthz"))

    async def ready(self) -> bool:
        return await self._execute(self._core.probe_call("/readyz"))

    async def wait_until_ready(self, timeout: float = 30.0, *, interval: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while not await self.ready():
            left = deadline - time.monotonic()
            if left <= 0:
                raise APITimeoutError(f"{self.base_url} was not ready within {timeout:g} s")
            await asyncio.sleep(min(interval, left))

    # -- lifetime -------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Release the shared-memory regions and close every pooled connection."""
        for region in self._regions.drain():
            try:
                await self._execute(self._core.unregister_call(region))
            except ActserveError:
                pass
            _shm.destroy(region)
        await self._http.aclose()

    close = aclose

    @property
    def is_closed(self) -> bool:
        return self._http.is_closed

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncClient({self.base_url!r}, protocol={self._core.protocol!r})"
