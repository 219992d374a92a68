"""A response whose body leaves as several pieces, never joined: the v2 binary answer is a
JSON header followed by the tensor's bytes, and joining them would copy the whole tensor
(4 MiB for a million float32 values) only to send it. ``release`` is called once the
pieces have been sent or the send failed: the memory they view (a shared-memory slot
lent by the engine) may be reused from then on.

"Sent" must mean handed to the kernel: an event loop's transport keeps a reference to what
the socket did not take at once, and writes it later, from that memory. So with memory to
release, the pieces go out as ``more_body`` messages and an empty last message follows:
the server's connections pause writing whenever anything is left in user space
(``header_timeout.py`` sets their write buffer limits to zero), and uvicorn waits for the
transport to drain before it takes a message, so that last message returns only once the
kernel has every byte."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from starlette.responses import Response


class PartsResponse(Response):
    def __init__(self, parts: Sequence[bytes | memoryview], *, status_code: int = 200,
                 headers: dict[str, str] | None = None, media_type: str | None = None,
                 release: Callable[[], None] | None = None) -> None:
        self.parts = list(parts)
        self.release = release
        self.nbytes = sum(memoryview(p).nbytes for p in self.parts)
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.body = b""  # the pieces are the body; Content-Length counts them
        self.init_headers({**(headers or {}), "Content-Length": str(self.nbytes)})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            last = len(self.parts) - 1 if self.release is None else len(self.parts)
            for i, part in enumerate(self.parts):
                await send({"type": "http.response.body", "body": part, "more_body": i < last})
            if self.release is not None:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if self.release is not None:
                self.parts = []
                self.release()
