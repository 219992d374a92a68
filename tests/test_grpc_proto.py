"""The gRPC contract: the committed descriptor is what inference.proto compiles to, every
message and field of it has the name, number and type of the published definitions (as the
stock client compiles them), and the server never imports the client library."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tritonclient.grpc import service_pb2

from service.grpc import messages

from .conftest import ROOT


def test_committed_descriptor_is_up_to_date():
    proc = subprocess.run([sys.executable, "scripts/gen_grpc_proto.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _messages(desc, out):
    out[desc.full_name] = desc
    for nested in desc.nested_types:
        _messages(nested, out)
    return out


def _ours() -> dict:
    found: dict = {}
    for desc in messages.POOL.FindFileByName("inference.proto").message_types_by_name.values():
        _messages(desc, found)
    return found


@pytest.mark.parametrize("name", sorted(_ours()))
def test_every_field_matches_the_published_definition(name):
    ours = _ours()[name]
    theirs = service_pb2.DESCRIPTOR.pool.FindMessageTypeByName(name)
    for field in ours.fields:
        other = theirs.fields_by_name.get(field.name)
        assert other is not None, f"{name}.{field.name} is not in the published definition"
        assert (field.number, field.type, field.is_repeated) == \
            (other.number, other.type, other.is_repeated), f"{name}.{field.name}"
        if field.message_type is not None:
            assert field.message_type.full_name == other.message_type.full_name


def test_every_rpc_matches_the_published_service():
    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for name, client_streams, server_streams in messages.methods():
        other = theirs.methods_by_name[name]
        assert (client_streams, server_streams) == (other.client_streaming,
                                                    other.server_streaming)
        req, resp = messages.method_types(name)
        assert req.DESCRIPTOR.full_name == other.input_type.full_name
        assert resp.DESCRIPTOR.full_name == other.output_type.full_name


def test_the_server_does_not_import_tritonclient():
    code = ("import sys, service.http.app, service.grpc.server; "
            "bad = [m for m in sys.modules if m.startswith('tritonclient')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
