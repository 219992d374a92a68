"""Typed server settings.

Configuration enters once: environment variables with the ``ACTSERVE_`` prefix, then
command-line flags on top (see ``service.cli``), validated here and passed to
``create_app(settings)``. Nothing is built at import time.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_DEVICE_RE = re.compile(r"^(auto|cpu|all|cuda(:\d+)?)$")

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
                    "their turn, unread (service/http/body_budget.py)")
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
    cors_origins: str = Field("", description="comma-separated origins; empty = CORS off")
    fault_injection: bool = Field(False, description="test-only compute fault hook")
    timeout_keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections close")
    header_timeout_s: float = Field(10.0, gt=0, description="time to send request headers")
    body_timeout_s: float = Field(30.0, gt=0, description="time to send the request body")
    graceful_shutdown_s: int = Field(30, ge=1, description="longest drain on SIGTERM")
    malloc_keep_mib: int = Field(
        128, ge=0, le=4096,
        description="freed memory glibc keeps for reuse (0: glibc defaults); see malloc_tuning")

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
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]
