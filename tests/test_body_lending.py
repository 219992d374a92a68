"""Request bodies read straight into the arena (``service/engine/ipc/lending.py``):
``RemoteEngine.submit``'s bookkeeping with a real arena. The channel to the engine is a
recording writer, so every message the worker would send is checked; the whole path through
a real engine process is in ``tests/test_engine_process.py``."""

from __future__ import annotations

import asyncio

import msgspec
import numpy as np
import pytest

from service.engine.ipc import channel, messages
from service.engine.ipc.arena import ALIGN, Arena
from service.engine.ipc.lending import Lender
from service.engine.ipc.remote import RemoteEngine
from service.engine.ipc.slots import Slots
from service.settings import Settings


class Recorded:
    """The worker's end of the channel: keeps every message it is given (as the bytes
    that would be sent, read back)."""

    open = True

    def __init__(self) -> None:
        self.messages: list[list] = []

    def send(self, message: object) -> None:
        data = channel.pack(message)
        self.messages.append(msgspec.msgpack.decode(data[channel.HEAD.size:]))

    def jobs(self) -> list[list]:
        return [m for m in self.messages if m[0] == "job"]


@pytest.fixture()
def engine():
    eng = RemoteEngine(Settings())
    eng._arena = Arena.create(1 << 20)
    eng._lender = Lender(eng._arena, eng._room_freed)
    eng._slots = Slots(eng._arena, eng._lender)
    eng._ready = True
    eng._link = Recorded()
    yield eng
    eng._arena.close()


def _job(eng: RemoteEngine, array: np.ndarray, dtype: str = "float32", **settings):
    return eng.jobs.build(eng.registry.get("relu"), array, dtype, settings, {}, api="native")


def _read(lent, data: np.ndarray, tensor_at: int = 0) -> np.ndarray:
    """What the HTTP layer does: the body's bytes land in the lent view; the codec's
    array is a view of them."""
    raw = data.reshape(-1).view(np.uint8)
    lent.view[tensor_at:tensor_at + raw.size] = raw
    return lent.view[tensor_at:tensor_at + raw.size].view(data.dtype)


def _answer(eng: RemoteEngine, jid: int, shape) -> None:
    eng._on_message(messages.Done(jid, "float32", tuple(shape), 0.0, 1, 1, "cpu", 0.0, {}, None,
                                  None, {}))


def test_a_body_read_into_the_arena_is_sent_where_it_lies(engine):
    async def go():
        x = np.arange(-5000, 5000, dtype=np.float32)
        lent = engine.lend_body(x.nbytes, 0)
        assert lent is not None and lent.view.nbytes == x.nbytes
        job = _job(engine, _read(lent, x))
        fut = engine.submit(job)
        (msg,) = engine._link.jobs()
        in_off = msg[6]
        assert in_off == lent.slot and in_off % ALIGN == 0
        assert np.array_equal(engine._arena.view(in_off, x.nbytes).view(np.float32), x)
        assert engine.bodies_in_place == 1 and engine._lender.held == 0
        lent.release()  # the request's own release is a no-op now: the job owns the slot
        assert engine._arena.used > x.nbytes
        _answer(engine, msg[1], x.shape)
        (await fut).release()
        assert engine._arena.used == 0

    asyncio.run(go())


def test_a_v2_tensor_after_its_header_starts_on_a_slot_boundary(engine):
    async def go():
        x = np.linspace(-3, 3, 20000, dtype=np.float32)
        header = 37  # bytes of JSON before the tensor
        lent = engine.lend_body(header + x.nbytes, header)
        assert (engine._lender.offset(lent.view) + header) % ALIGN == 0
        job = _job(engine, _read(lent, x, header))
        engine.submit(job)
        (msg,) = engine._link.jobs()
        assert msg[6] % ALIGN == 0 and engine.bodies_in_place == 1
        _answer(engine, msg[1], x.shape)

    asyncio.run(go())


def test_lent_bodies_hold_at_most_half_the_arena(engine):
    half = engine._arena.size // 2
    first = engine.lend_body(half - 4096, 0)
    assert first is not None
    assert engine.lend_body(8192, 0) is None  # over the share: read as usual
    first.release()
    assert engine._arena.used == 0 and engine._lender.held == 0
    again = engine.lend_body(8192, 0)
    assert again is not None
    again.release()


def test_no_room_for_the_answer_gives_the_lent_slot_back_and_waits_as_usual(engine):
    async def go():
        # float16 in, float64 out: the answer needs four times the input's room
        a = np.full(100_000, 1.5, dtype=np.float16)
        b = np.full(100_000, -2.0, dtype=np.float16)
        lent_a = engine.lend_body(a.nbytes, 0)
        lent_b = engine.lend_body(b.nbytes, 0)
        job_a = _job(engine, _read(lent_a, a), "float16", compute_dtype="float64")
        job_b = _job(engine, _read(lent_b, b), "float16", compute_dtype="float64")
        fut_a = engine.submit(job_a)  # 200 kB lent + 200 kB lent + 800 kB answer > 1 MiB
        assert engine.bodies_in_place == 0
        assert not engine._link.jobs() and len(engine._backlog) == 1
        assert np.array_equal(job_a.array, a)  # copied out of the slot it gave back
        assert not np.shares_memory(job_a.array, lent_a.view)
        fut_b = engine.submit(job_b)  # someone waits for room: b goes the usual way too
        assert engine._lender.held == 0 and engine.bodies_in_place == 0
        # b's lent slot came back, and that woke the request waiting for room: nothing is
        # in flight, yet nothing is stuck
        sent = engine._link.jobs()
        assert len(sent) == 1 and len(engine._backlog) == 1
        lent_a.release()  # the requests' own releases are no-ops now
        lent_b.release()
        _answer(engine, sent[0][1], a.shape)
        (await fut_a).release()
        sent = engine._link.jobs()
        assert len(sent) == 2
        _answer(engine, sent[1][1], b.shape)
        (await fut_b).release()
        assert engine._arena.used == 0

    asyncio.run(go())


def test_a_refused_request_gives_its_lent_slot_back_and_wakes_the_waiting(engine):
    async def go():
        lent = engine.lend_body(300_000, 0)
        big = np.ones(120_000, dtype=np.float32)  # 480 kB in + 480 kB out: waits for room
        fut = engine.submit(_job(engine, big))
        assert len(engine._backlog) == 1 and not engine._link.jobs()
        lent.release()  # its request was refused (a 400): the room comes back
        (msg,) = engine._link.jobs()
        _answer(engine, msg[1], big.shape)
        (await fut).release()
        assert engine._arena.used == 0

    asyncio.run(go())
