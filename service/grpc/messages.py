"""The ``inference.*`` protobuf message classes, built from the committed descriptor
(``_descriptor.py``, generated from ``inference.proto``) in a private descriptor pool: a
process that also imports another copy of these definitions (a client library, in tests)
gets no duplicate-symbol clash."""

from __future__ import annotations

import base64

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from service.grpc._descriptor import FILE_DESCRIPTOR_SET_B64

SERVICE = "inference.GRPCInferenceService"

_files = descriptor_pb2.FileDescriptorSet.FromString(
    base64.b64decode(FILE_DESCRIPTOR_SET_B64))
POOL = descriptor_pool.DescriptorPool()
for _file in _files.file:
    POOL.Add(_file)
_classes = message_factory.GetMessageClassesForFiles([f.name for f in _files.file], POOL)


def message(name: str):
    """The class of ``inference.<name>`` (nested types as ``Outer.Inner``)."""
    return _classes[f"inference.{name}"]


def method_types(method: str) -> tuple[type, type]:
    """(request class, response class) of an RPC of the service."""
    desc = POOL.FindServiceByName(SERVICE).methods_by_name[method]
    return _classes[desc.input_type.full_name], _classes[desc.output_type.full_name]


def methods() -> list[tuple[str, bool, bool]]:
    """(name, client streaming, server streaming) of every RPC."""
    return [(m.name, m.client_streaming, m.server_streaming)
            for m in POOL.FindServiceByName(SERVICE).methods]


ModelInferRequest = message("ModelInferRequest")
ModelInferResponse = message("ModelInferResponse")
ModelStreamInferResponse = message("ModelStreamInferResponse")
InferParameter = message("InferParameter")
