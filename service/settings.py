"""Typed server settings.

Configuration enters once: environment variables with the ``ACTSERVE_`` prefix, then
command-line flags on top (see ``service.cli``), validated here and passed to
``create_app(settings)``. Nothing is built at import time.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_DEVICE_RE = re.compile(r"^(auto|cpu|all|cuda(:\d+)?)$")
_HOST_RE = re.compile(r"^(\*|(\*\.)?[A-Za-z0-9_.\-]+|\[?[0-9A-Fa-f:.]+\]?)$")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

ComputeDtypeName = Literal["float32", "float16", "bfloat16", "float64"]


class Settings(BaseSettings):
    """Every knob of the server, with the environment variable that sets it."""

    model_config = SettingsConfigDict(env_prefix="ACTSERVE_", extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(8000, ge=0, le=65535, description="listen port")
    device: str = Field(
        "cpu",
        description="auto | cpu | cuda | cuda:N | all | a comma-separated list (cuda:0,cuda:1)",
    )
    max_batch_elements: int = Field(4 * 1024 * 1024, ge=1,
                                    description="elements per batch; also the largest request")
    max_batch_requests: int = Field(256, ge=1, description="requests per batch (1: no batching)")
    max_delay_us: int = Field(0, ge=0, le=1_000_000,
                              description="hold a batch open this long to grow it (0: never)")
    max_queue_requests: int = Field(1024, ge=1, description="waiting requests before 503")
    default_timeout_s: float = Field(30.0, gt=0, description="deadline of requests that set none")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1,
                                   description="body limit, enforced while streaming")
    max_body_bytes_in_flight: int = Field(
        64 * 1024 * 1024, ge=1,
        description="bytes of large request bodies read and not yet answered; the rest wait "
                    "their turn, unread (service/exchange/budget.py)")
    torch_threads: int = Field(1, ge=1, le=256, description="intra-op threads of a compute thread")
    default_compute_dtype: ComputeDtypeName | None = Field(
        None, description="compute dtype of requests that set none (none: the input's)")
    default_amp: bool = Field(False, description="autocast for requests that do not say")
    default_inplace: bool = Field(False, description="in-place for requests that do not say")
    executor_restart_limit: int = Field(
        5, ge=0, description="restarts of a dead compute thread before staying not ready")
    metrics: bool = Field(True, description="Prometheus metrics and /v1/stats")
    metrics_window_s: float = Field(60.0, gt=0, description="sliding window of /v1/stats")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="level of every log line, the access log included")
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one JSON object a line; text: plain lines (uvicorn's too)")
    access_log: bool = Field(True, description="one line per request, written off the event loop")
    api_keys: str = Field("", description="comma-separated bearer tokens; empty = no auth")
    activations_file: str = Field(
        "", description="TOML file of [[activation]] tables (name, expr, params) registered "
        "at start-up as custom activations; empty = none")
    cors_origins: str = Field("", description="comma-separated origins; empty = CORS off")
    fault_injection: bool = Field(False, description="test-only compute fault hook")
    allow_profile: bool = Field(
        False, description="serve report=profile: a request run alone under torch.profiler "
                           "(docs/lab.md)")
    profile_trace_ttl_s: float = Field(
        300.0, gt=0, le=86400, description="how long a profile's Chrome trace can be downloaded")
    timeout_keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections close")
    backlog: int = Field(
        4096, ge=1, description="connections the kernel completes and queues for the server "
        "to accept (listen's backlog; the kernel caps it at net.core.somaxconn)")
    header_timeout_s: float = Field(10.0, gt=0, description="time to send request headers")
    body_timeout_s: float = Field(30.0, gt=0, description="time to send the request body")
    graceful_shutdown_s: int = Field(30, ge=1, description="longest drain on SIGTERM")
    workers: int | Literal["auto"] = Field(
        1, description="HTTP worker processes on the one port (auto: the usable cores); "
                       "1 runs a single process, no supervisor (service/process)")
    malloc_keep_mib: int = Field(
        128, ge=0, le=4096,
        description="freed memory glibc keeps for reuse (0: glibc defaults); see malloc_tuning")
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, le=1024 * 1024,
        description="request line and headers, in bytes; more is refused with 431")
    max_header_count: int = Field(
        100, ge=8, le=10_000, description="request headers; more is refused with 431")
    min_body_rate_bytes_s: int = Field(
        64 * 1024, ge=0,
        description="a large body that arrives slower than this on average (after a one-second "
                    "grace) loses its share of the body budget: 408 (0: no minimum)")
    max_priority: int = Field(
        100, ge=0, le=1_000_000, description="request priorities must lie in [-max, max]")
    allowed_hosts: str = Field(
        "", description="comma-separated Host names accepted (`*` any, `*.example.com`); "
                        "empty: local names when bound to loopback, any otherwise")
    forwarded_allow_ips: str = Field(
        "", description="comma-separated proxy addresses/networks whose X-Forwarded-* headers "
                        "are trusted; empty: none")
    engine: Literal["auto", "inline", "process"] = Field(
        "auto", description="inline: a compute thread in each server process; process: one "
                            "engine process owns the devices and batches every worker's "
                            "requests; auto: process on CUDA, inline on CPU")
    fusion: Literal["request", "auto", "off"] = Field(
        "request", description="custom activations: request (exact by default) compiles with "
                               "torch.compile only the registrations that ask (\"fusion\": "
                               "true, bit for bit, or {\"max_ulp\": N}); auto asks for every "
                               "registration, bit for bit; off: always eager. A compiled form "
                               "serves only within its accepted bound of the eager one")
    grpc_port: int = Field(
        8001, ge=0, le=65535,
        description="KServe v2 gRPC port (inference.GRPCInferenceService); 0 turns gRPC off")
    probe_port: int = Field(
        0, ge=0, le=65535,
        description="a port of its own for GET /healthz and /readyz, answered by a thread "
                    "(with several workers, the supervisor's) that never waits behind the "
                    "requests the event loop holds; 0: off (the API port still answers them)")
    probe_stall_s: float = Field(
        10.0, gt=0,
        description="on the probe port, an event loop that has not run for this long fails "
                    "/healthz and /readyz (wedged, not busy)")
    warm_autograd: bool = Field(
        True, description="at start-up, before readiness, import what torch's first "
                          "gradient needs (sympy: seconds of CPU), so the first gradient "
                          "request does not wait for it")
    grpc_max_concurrent_rpcs: int = Field(
        256, ge=1, le=65536,
        description="gRPC RPCs served at once by a process; more are refused at once with "
                    "RESOURCE_EXHAUSTED, before their messages are decoded")
    grpc_stream_inflight: int = Field(
        32, ge=1, le=4096,
        description="requests of one ModelStreamInfer stream in flight (read, computing or "
                    "answered but not yet taken by the client); the stream is read no further "
                    "until one is taken")
    shared_memory: bool = Field(
        True, description="Triton's system shared-memory extension (HTTP and gRPC)")
    shm_arena_mib: int = Field(
        256, ge=1, le=1 << 20,
        description="engine=process: shared memory per server process for request and "
                    "answer tensors (reserved in /dev/shm at start)")

    # -- overload (service/engine/admission.py, docs/reliability.md "Overload") ---------
    overload_admission: bool = Field(
        True, description="refuse at once (503 predicted_late) a request whose predicted "
                          "finish, from measured service times and the work queued ahead of "
                          "it, is past its deadline")
    overload_safety: float = Field(
        1.2, ge=1.0, le=10.0, description="predicted wait and service are multiplied by this "
                                          "before they are compared with the deadline")
    overload_target_delay_ms: float = Field(
        50.0, gt=0, description="queue delay (oldest waiting job) above which, held for "
                                "overload_interval_ms, the queue counts as overloaded")
    overload_interval_ms: float = Field(
        200.0, gt=0, description="how long the delay must stand above (or below) the target "
                                 "before the discipline switches (and back)")
    overload_max_wait_ms: float = Field(
        500.0, gt=0, description="while overloaded, the longest predicted wait admitted "
                                 "(503 queue_delay beyond it)")
    overload_fresh_fraction: float = Field(
        0.1, gt=0, le=1.0, description="while the server is congested, the HTTP protocol "
        "refuses a request when the requests already held would make it wait more than "
        "this fraction of its timeout (Little's law: held / the rate they are served at)")
    overload_lifo: bool = Field(
        False, description="while overloaded, serve the newest batch first and shed jobs that "
                           "waited past overload_max_wait_ms (adaptive LIFO)")
    front_delay_ms: float = Field(
        50.0, gt=0, description="the wait a front end's limits allow: /v1/stats "
        "overload.front_limits is, per size class, this delay x the rate the server "
        "answers that class at while saturated (scripts/nginx_limits.py keeps it in nginx)")
    trust_request_start: bool = Field(
        False, description="count a request's deadline from its X-Request-Start stamp (Unix "
        "time: HTTP header, or gRPC metadata of a unary call) when earlier than its arrival, so "
        "that time spent before the server read it (accept queue, a proxy) counts; for stamps "
        "from a clock in step with the server's")
    kernel_arrival: bool = Field(
        True, description="count a new connection's first request from when its bytes "
        "reached the kernel (Linux TCP_INFO), so its wait in the listener's accept queue "
        "counts against its deadline")
    fair_share: bool = Field(
        False, description="per client (API key, else address) share of a contended queue: "
                           "a client over its share is refused 429 client_share first")

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        parts = [p.strip() for p in v.split(",") if p.strip()]
        if not parts or not all(_DEVICE_RE.match(p) for p in parts):
            raise ValueError(
                f"ACTSERVE_DEVICE={v!r} is not a device; use auto, cpu, cuda, cuda:N, all, "
                "or a comma-separated list such as cuda:0,cuda:1"
            )
        return ",".join(parts)

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, v: str) -> str:
        if v and not any(k.strip() for k in v.split(",")):
            raise ValueError(
                f"ACTSERVE_API_KEYS={v!r} lists no usable key (only separators and spaces); "
                "set it empty to turn authentication off, or list at least one token"
            )
        return v

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, v: str) -> str:
        for h in (p.strip() for p in v.split(",")):
            if h and not _HOST_RE.match(h):
                raise ValueError(f"ACTSERVE_ALLOWED_HOSTS entry {h!r} is not a host name, "
                                 "an address, `*` or `*.domain`")
        return v

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _check_forwarded(cls, v: str) -> str:
        for p in (p.strip() for p in v.split(",")):
            if p and p != "*":
                try:
                    ipaddress.ip_network(p, strict=False)
                except ValueError:
                    raise ValueError(f"ACTSERVE_FORWARDED_ALLOW_IPS entry {p!r} is not an "
                                     "address or network (or `*`)") from None
        return v

    @field_validator("workers", mode="before")
    @classmethod
    def _check_workers(cls, v: object) -> int | str:
        text = str(v).strip().lower()
        if text == "auto":
            return "auto"
        if isinstance(v, bool) or not text.isdigit() or not 1 <= int(text) <= 1024:
            raise ValueError(f"ACTSERVE_WORKERS={v!r}: use a count from 1 to 1024, or auto")
        return int(text)

    @property
    def worker_count(self) -> int:
        """``workers`` as a number: ``auto`` is the cores this process may run on."""
        from service.cores import usable_cores

        return usable_cores() if self.workers == "auto" else int(self.workers)

    @model_validator(mode="after")
    def _check_batch_limits(self) -> Settings:
        if self.max_batch_requests > self.max_queue_requests:
            raise ValueError(
                f"max_batch_requests ({self.max_batch_requests}) exceeds max_queue_requests "
                f"({self.max_queue_requests}); raise ACTSERVE_MAX_QUEUE_REQUESTS or lower "
                "ACTSERVE_MAX_BATCH_REQUESTS"
            )
        return self

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @property
    def allowed_host_list(self) -> list[str]:
        """The Host names accepted; ``["*"]`` means any. Empty setting: the local names when
        the server listens on loopback only (no DNS rebinding), any host otherwise."""
        hosts = [h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip()]
        if hosts:
            return hosts
        if _is_loopback(self.host):
            return ["localhost", "127.0.0.1", "::1", "[::1]"]
        return ["*"]

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]
