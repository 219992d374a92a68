"""The typed messages between workers and the engine process (``service/engine/ipc/
messages.py``): every message survives the framing field for field, the wire is the tag then
the fields in order, an unreadable frame is handed on (never raised in the protocol), and a
worker that speaks another protocol version is refused at hello with a clear error, by a
real engine process."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from service.engine.ipc import channel, messages
from service.engine.ipc.remote import RemoteEngine
from service.errors import InvalidRequest
from service.settings import Settings

BATCH = messages.Batch("relu", 2, 2048, "cpu", 1e-4, 1e-4, 0.0, 0.0)
SAMPLES = {
    messages.for_engine: [
        messages.Hello(messages.PROTOCOL, 1234, "actserve-1-abc"),
        messages.Job(7, "leaky_relu", (("negative_slope", 0.1),), "float32", (2, 3), 0, 64, 64,
                     None, False, None, False, 123.5, 0, "native", "r-1", None, ("value",),
                     frozenset({"numerics"}), False, None, None, ("region", 0, 24)),
        messages.Cancel(7),
        messages.Register(3, {"name": "mine", "expression": "x * 2", "params": {"a": 1.5}}),
        messages.Unregister(4, "mine"),
        messages.CudaRegister(5, "r", b"\x00\xff" * 32, 0, 1 << 20),
        messages.CudaUnregister(6, "r"),
    ],
    messages.for_worker: [
        messages.State(True, "", False, ["cpu"], [(("gelu", "float16", True, None, False),
                                                   "no kernel")], 1, 3),
        messages.Done(7, "float32", (2, 3), 1e-5, 2, 12, "cpu", 2e-6, {"h2d": 0.5}, BATCH,
                      "float32", {"numerics": {"max_ulp_error": 0.5}}, 0.25),
        messages.Error(7, "invalid_request", "no", BATCH, 0.125),
        messages.Cancelled(7),
        messages.Registered(3, None, None, {"name": "mine"}),
        messages.Activation({"name": "mine"}),
        messages.Removed("mine"),
    ],
}


@pytest.mark.parametrize("decode", list(SAMPLES), ids=["to_engine", "to_worker"])
def test_every_message_survives_the_framing(decode):
    sent = SAMPLES[decode]
    stream = b"".join(channel.pack(m) for m in sent)
    got: list = []
    link = channel.Link(got.append, lambda: None, decode)
    for at in range(0, len(stream), 5):  # cut anywhere
        link.data_received(stream[at:at + 5])
    assert got == sent
    assert [type(m) for m in got] == [type(m) for m in sent]


def test_the_wire_is_the_tag_then_the_fields_in_order():
    plain = msgspec.msgpack.decode(channel.pack(messages.Cancel(9))[channel.HEAD.size:])
    assert plain == ["cancel", 9]
    hello = msgspec.msgpack.decode(
        channel.pack(messages.Hello(messages.PROTOCOL, 1, "a"))[channel.HEAD.size:])
    assert hello == ["hello", messages.PROTOCOL, 1, "a"]  # the protocol first, always


def test_an_unreadable_frame_is_handed_on_not_raised():
    got: list = []
    link = channel.Link(got.append, lambda: None, messages.for_engine)
    link.data_received(channel.pack(["job", "not an id"]) + channel.pack(messages.Cancel(1)))
    assert isinstance(got[0], messages.Unreadable) and got[0].raw == ["job", "not an id"]
    assert got[1] == messages.Cancel(1)  # the stream goes on
    # a later version's hello is read as far as its leading fields (its protocol first)...
    later = messages.for_engine(
        channel.pack(["hello", messages.PROTOCOL + 1, 1, "a", "new field"])[channel.HEAD.size:])
    assert isinstance(later, messages.Hello) and later.protocol == messages.PROTOCOL + 1
    # ...and one whose fields changed is still known by its protocol
    changed = messages.for_engine(
        channel.pack(["hello", messages.PROTOCOL + 1, "a pid?"])[channel.HEAD.size:])
    assert messages.hello_protocol(changed) == messages.PROTOCOL + 1


@pytest.mark.slow
def test_a_worker_of_another_protocol_is_refused_with_a_clear_error(monkeypatch):
    """A worker whose messages are of another version than the engine process's: the
    engine answers its hello with a fatal state naming both versions, and the worker stops
    starting with that message (never a hang, never a silent misread)."""
    theirs = messages.PROTOCOL
    monkeypatch.setattr(messages, "PROTOCOL", theirs + 41)  # this worker only

    async def go():
        engine = RemoteEngine(Settings(engine="process"))
        with pytest.raises(InvalidRequest) as info:
            await asyncio.wait_for(engine.start(), 240)
        return info.value.message

    message = asyncio.run(go())
    assert f"protocol {theirs + 41}" in message and f"speaks {theirs}" in message
