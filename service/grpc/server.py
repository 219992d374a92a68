"""The gRPC server: grpcio's asyncio server in the event loop that runs uvicorn, started
and stopped by the app's lifespan (``service.http.app``).

Messages over ``max_request_bytes`` are refused by grpcio itself (RESOURCE_EXHAUSTED), and
so are RPCs beyond ``grpc_max_concurrent_rpcs`` at once, before their messages are decoded;
an inference message within both is charged to the same byte budget as an HTTP body
(``service.grpc.inference``). The port is shared across processes (``SO_REUSEPORT``) only
when the settings ask for several HTTP workers; a single server refuses to start on a port
another process holds.
"""

from __future__ import annotations

import logging

import grpc

from service.exchange.services import Services
from service.grpc.service import InferenceService

log = logging.getLogger("actserve")


class GrpcServer:
    def __init__(self, services: Services) -> None:
        self.settings = services.settings
        self.service = InferenceService(services)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        s = self.settings
        shared = int(getattr(s, "workers", 1) or 1) > 1
        self.server = grpc.aio.server(maximum_concurrent_rpcs=s.grpc_max_concurrent_rpcs,
                                      options=[
            ("grpc.max_receive_message_length", s.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1 if shared else 0),
        ])
        self.server.add_generic_rpc_handlers((self.service.handler(),))
        address = f"{s.host}:{s.grpc_port}"
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen for gRPC on {address} (ACTSERVE_GRPC_PORT): "
                               f"{exc}") from None
        if not self.port:
            raise RuntimeError(f"cannot listen for gRPC on {address} (ACTSERVE_GRPC_PORT)")
        await self.server.start()
        log.info("gRPC (KServe v2) on %s", address)

    async def stop(self, grace_s: float) -> None:
        """New RPCs are refused at once; running ones get ``grace_s`` to finish."""
        if self.server is not None:
            await self.server.stop(grace_s)
            self.server = None
