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

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: str = Field(
        "cpu",
        description="auto | cpu | cuda | cuda:N | all | a comma-separated list (cuda:0,cuda:1)",
    )
    max_batch_elements: int = Field(4 * 1024 * 1024, ge=1)
    max_batch_requests: int = Field(256, ge=1)
    max_delay_us: int = Field(0, ge=0, le=1_000_000)
    max_queue_requests: int = Field(1024, ge=1)
    default_timeout_s: float = Field(30.0, gt=0)
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_body_bytes_in_flight: int = Field(
        64 * 1024 * 1024, ge=1,
        description="bytes of large request bodies read and not yet answered; the rest wait "
                    "their turn, unread (service/http/body_budget.py)")
    torch_threads: int = Field(1, ge=1, le=256)
    default_compute_dtype: ComputeDtypeName | None = None
    default_amp: bool = False
    default_inplace: bool = False
    executor_restart_limit: int = Field(5, ge=0)
    metrics: bool = Field(True, description="Prometheus metrics and /v1/stats")
    metrics_window_s: float = Field(60.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    access_log: bool = True
    api_keys: str = Field("", description="comma-separated bearer tokens; empty = no auth")
    activations_file: str = Field(
        "", description="TOML file of [[activation]] tables (name, expr, params) registered "
        "at start-up as custom activations; empty = none")
    cors_origins: str = Field("", description="comma-separated origins; empty = CORS off")
    fault_injection: bool = Field(False, description="test-only compute fault hook")
    timeout_keep_alive_s: int = Field(5, ge=1)
    header_timeout_s: float = Field(10.0, gt=0, description="time to send request headers")
    body_timeout_s: float = Field(30.0, gt=0, description="time to send the request body")
    graceful_shutdown_s: int = Field(30, ge=1)
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
    grpc_port: int = Field(
        8001, ge=0, le=65535,
        description="KServe v2 gRPC port (inference.GRPCInferenceService); 0 turns gRPC off")
    shared_memory: bool = Field(
        True, description="Triton's system shared-memory extension (HTTP and gRPC)")
    shm_arena_mib: int = Field(
        256, ge=1, le=1 << 20,
        description="engine=process: shared memory per server process for request and "
                    "answer tensors (reserved in /dev/shm at start)")

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
