"""When a new connection's first request reached this host (Linux ``TCP_INFO``).

The HTTP protocol stamps a request's arrival when the event loop reads its first bytes,
and its deadline counts from there. A new connection waits before that in the listener's
accept queue, its request already in the kernel: under overload, seconds (the loop accepts
a connection or a few per iteration, and each iteration is long then). A request computed
and answered ``200`` "in time" by the server's clock may then reach a caller that gave up
long before (the late 200s of the overload bench, docs/benchmarks.md).

The kernel knows: ``tcpi_last_data_recv`` in ``struct tcp_info`` is the milliseconds
since the last segment carrying data arrived on the socket. Read once, at a connection's
first read, it dates that connection's first request: how long its bytes waited in the
kernel (the accept queue and the loop's lateness), never more (a later segment only makes
it shorter). One ``getsockopt`` per connection, none per request: a kept-alive
connection's later requests are read as they come, and their wait in the socket (the
loop's lateness) is not counted, as it was not before (counted for every request it made
deadlines refuse more than they kept honest; docs/benchmarks.md, fourth round).

Linux only; elsewhere, and for sockets that are not TCP (a UNIX socket behind a proxy), the
wait reads 0 and nothing changes. ``kernel_arrival`` (on by default) turns it off.
"""

from __future__ import annotations

import socket
import struct

TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux
# struct tcp_info: eight one-byte fields, nine u32 (rto .. fackets), then the times in
# milliseconds: last_data_sent, last_ack_sent, last_data_recv (this offset), last_ack_recv
_LAST_DATA_RECV = struct.Struct("=I")
_OFFSET = 52
_SIZE = _OFFSET + _LAST_DATA_RECV.size


def waited(sock) -> float:
    """Seconds since data last reached the kernel on ``sock`` (a connected TCP socket, or
    the transport's ``TransportSocket``); 0.0 when that cannot be read."""
    if TCP_INFO is None or sock is None:
        return 0.0
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _SIZE)
    except (OSError, ValueError, TypeError):  # not TCP, closed, or no such option here
        return 0.0
    if len(raw) < _SIZE:
        return 0.0
    return _LAST_DATA_RECV.unpack_from(raw, _OFFSET)[0] / 1000
