"""The engine channel's framing (``service/engine/ipc/channel.py``, ``Link``): messages cut
anywhere by the socket come out whole and in order, one loop turn's messages leave in one
write, an oversized frame ends the connection; and two real ends over a socket pair."""

from __future__ import annotations

import asyncio
import socket

from service.engine.ipc import channel


class Transport:
    """Records what a Link writes (the other end is the test)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_messages_cut_anywhere_come_out_whole_and_in_order():
    messages = [["job", i, "relu", [], "float32", [i] * (i % 5), "x" * (i * 7)]
                for i in range(40)]
    stream = b"".join(channel.pack(m) for m in messages)
    for step in (1, 3, 7, 64, len(stream)):
        got: list[list] = []
        link = channel.Link(got.append, lambda: None)
        for at in range(0, len(stream), step):
            link.data_received(stream[at:at + step])
        assert got == messages, step


def test_what_one_loop_turn_sends_leaves_in_one_write():
    async def go():
        link = channel.Link(lambda m: None, lambda: None)
        transport = Transport()
        link.connection_made(transport)
        for i in range(3):
            link.send(["done", i])
        assert transport.writes == []  # nothing yet: the turn is not over
        await asyncio.sleep(0)
        assert transport.writes == [b"".join(channel.pack(["done", i]) for i in range(3))]
        link.send(["cancelled", 9])
        await asyncio.sleep(0)
        assert transport.writes[1] == channel.pack(["cancelled", 9])

    asyncio.run(go())


def test_an_oversized_frame_ends_the_connection():
    async def go():
        got: list[list] = []
        link = channel.Link(got.append, lambda: None)
        transport = Transport()
        link.connection_made(transport)
        link.data_received(channel.HEAD.pack(channel.MAX_MESSAGE + 1) + b"[]")
        assert transport.closed and got == []

    asyncio.run(go())


def test_two_ends_over_a_socket_pair():
    async def go():
        loop = asyncio.get_running_loop()
        a_sock, b_sock = socket.socketpair()
        got: list[list] = []
        gone = asyncio.Event()
        all_in = asyncio.Event()

        def on_b(message: list) -> None:
            got.append(message)
            if len(got) == 500:
                all_in.set()

        a = channel.Link(lambda m: None, gone.set)
        b = channel.Link(on_b, lambda: None)
        await loop.connect_accepted_socket(lambda: a, a_sock)
        await loop.connect_accepted_socket(lambda: b, b_sock)
        big = "y" * 100_000  # frames larger than one read
        for i in range(500):
            a.send(["job", i, big if i % 50 == 0 else ""])
        await asyncio.wait_for(all_in.wait(), 30)
        assert [m[1] for m in got] == list(range(500))
        assert all(m[2] == (big if m[1] % 50 == 0 else "") for m in got)
        b.close()
        await asyncio.wait_for(gone.wait(), 30)
        a.close()

    asyncio.run(go())
