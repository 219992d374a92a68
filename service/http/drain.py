"""SIGTERM without connection resets.

A client of a draining server sees an answer, a 503 with ``Retry-After``, or a refused
connection; never a reset on a connection the kernel had accepted for it.

* ``stop_accepting(server)``, first thing on SIGTERM: the listening sockets stop being
  served, every connection already completed in the kernel's accept queue is taken (closing
  a listener resets those), then the listener is closed, so later connects are refused. The
  taken connections are served like any other (their requests get 503 + ``Retry-After``).
  The only window left is between the last ``accept`` finding the queue empty and the
  ``close`` right after it: a few system calls.
* ``DrainingConnection`` (mixed into the HTTP protocol): uvicorn's shutdown closes every
  connection between requests at once, which resets a client whose request is already on
  its way (and a fresh connection whose request has not been read yet). Here such a
  connection gets ``IDLE_GRACE_S``: a request arriving in that time is answered with
  ``Connection: close``; a connection still silent after it is closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger("actserve")

IDLE_GRACE_S = 1.0


def take_backlog(fds: list[int]) -> list[socket.socket]:
    """Accept every completed connection waiting on the listeners ``fds`` (duplicates the
    caller owns), then close them: the kernel listener goes away with its last descriptor."""
    taken: list[socket.socket] = []
    for fd in fds:
        listener = socket.socket(fileno=fd)
        listener.setblocking(False)
        try:
            while True:
                try:
                    conn, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionAbortedError:  # reset by its client while queued
                    continue
                except OSError as exc:  # e.g. out of descriptors: the rest are refused
                    log.warning("drain: could not take queued connections: %s", exc)
                    break
                taken.append(conn)
        finally:
            listener.close()
    return taken


def stop_accepting(servers: list, loop: asyncio.AbstractEventLoop, protocol_factory) -> int:
    """Event loop: stop ``servers`` (asyncio or uvloop ``Server`` objects) accepting, and
    hand the connections already queued to ``protocol_factory``. Returns how many."""
    dups = [os.dup(s.fileno()) for server in servers for s in (server.sockets or ())]
    for server in servers:
        server.close()  # the library stops watching its descriptor and closes it
    taken = take_backlog(dups)  # ... while ours keeps the queue alive until now
    for conn in taken:
        conn.setblocking(False)
        task = loop.create_task(loop.connect_accepted_socket(protocol_factory, conn))
        task.add_done_callback(_log_failure)
    return len(taken)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("drain: a queued connection could not be served: %s", task.exception())


class DrainingConnection:
    """Mixin for uvicorn's httptools protocol (before it in the bases)."""

    _drain_requested = False
    _mid_request = False

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self._mid_request = True  # the headers of a new request are arriving
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._mid_request = False
        super().on_headers_complete()
        if self._drain_requested and self.cycle is not None:
            self.cycle.keep_alive = False  # answered with Connection: close

    def shutdown(self) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self._drain_requested = True
            self.loop.call_later(IDLE_GRACE_S, self._close_if_idle)
        else:
            super().shutdown()

    def _close_if_idle(self) -> None:
        if self.transport.is_closing() or self._mid_request:
            return  # closes after its answer (or at the header timeout)
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()
