"""``inference.ModelInferRequest`` <-> the v2 codec's ``V2Request``, so a gRPC request is
validated by the same functions as an HTTP one (``service.codecs.v2``): the same parameters
(activation params, ``compute_dtype``, ``amp``, ``inplace``, ``timeout`` in microseconds,
``priority``), the same checks, the same messages. Torch-free.

Inputs come as ``raw_input_contents`` (raw little-endian bytes, any datatype), as
``contents`` (``fp32_contents`` / ``fp64_contents``), or from a registered shared-memory
region (input parameters ``shared_memory_region`` / ``_byte_size`` / ``_offset``). The output
goes back as ``raw_output_contents``, or into the region its parameters name.
"""

from __future__ import annotations

import math

import numpy as np
import orjson

from service import dtypes
from service.codecs import v2
from service.codecs.cuda_regions import CudaRegions
from service.codecs.shm_regions import SystemRegions
from service.engine import reports
from service.errors import InvalidRequest, UnknownActivation, echo
from service.grpc import messages

CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents"}


def param_value(p) -> object:
    """An ``InferParameter`` as the Python value JSON would have given."""
    choice = p.WhichOneof("parameter_choice")
    return None if choice is None else getattr(p, choice)


def param_dict(params) -> dict:
    return {key: param_value(value) for key, value in params.items()}


def decode(request, max_elements: int, regions: SystemRegions | None,
           cuda: CudaRegions | None = None) -> v2.V2Request:
    inputs = request.inputs
    raw = request.raw_input_contents
    if not inputs:
        raise InvalidRequest("'inputs' must be a non-empty list of tensors")
    if raw and len(raw) != len(inputs):
        raise InvalidRequest(f"raw_input_contents has {len(raw)} entries for {len(inputs)} "
                             "inputs; send one per input, in the order of inputs")
    order = v2.input_order([t.name for t in inputs])
    settings, params, _ = v2.parameters(param_dict(request.parameters))
    wanted = v2.requested_outputs(
        [{"name": o.name, "parameters": param_dict(o.parameters)} for o in request.outputs],
        True)
    first = order[0]
    array, wire, in_cuda = _tensor(inputs[first], raw[first] if raw else None, max_elements,
                                   regions, cuda=cuda)
    out_shm, out_cuda = v2.region_output(wanted.shm, regions, cuda)
    req = v2.V2Request(request.id or None, array, wire, settings, params, True, out_shm,
                       wanted.names, True, input_cuda=in_cuda, output_cuda=out_cuda)
    if len(order) == 2:
        i = order[1]
        req.grad_output, grad_wire, _ = _tensor(inputs[i], raw[i] if raw else None,
                                                max_elements, regions, v2.GRAD_INPUT)
        if grad_wire != wire or req.grad_output.shape != array.shape:
            raise InvalidRequest(f"input {v2.GRAD_INPUT!r} must have the datatype and shape "
                                 f"of input {v2.INPUT_NAME!r}")
    return req


def _tensor(tensor, raw: bytes | None, max_elements: int, regions: SystemRegions | None,
            expected: str = v2.INPUT_NAME,
            cuda: CudaRegions | None = None) -> tuple[np.ndarray, str, object]:
    wire, shape, where = v2.tensor_meta(tensor.name, tensor.datatype, list(tensor.shape),
                                        max_elements, expected)
    params = param_dict(tensor.parameters)
    has_contents = tensor.HasField("contents")
    sources = (raw is not None) + has_contents + (v2.SHM_REGION in params)
    if sources > 1:
        raise InvalidRequest(f"{where}: set one of raw_input_contents, contents or "
                             f"parameters.{v2.SHM_REGION}")
    if v2.SHM_REGION in params:
        array, ref = v2.region_input(params, wire, shape, regions, cuda, where)
        return array, wire, ref
    if raw is not None:
        return v2.array_from_bytes(raw, wire, shape, len(raw), where,
                                   what="raw_input_contents"), wire, None
    count = math.prod(shape)
    field = CONTENTS.get(tensor.datatype)
    if not has_contents:
        if count == 0:
            return np.empty(shape, dtype=dtypes.STORAGE[wire]), wire, None
        raise InvalidRequest(f"{where}: send its data in raw_input_contents, contents or a "
                             "shared memory region")
    if field is None:
        raise InvalidRequest(f"{where}: {tensor.datatype} data cannot travel in contents; "
                             "send it in raw_input_contents")
    values = getattr(tensor.contents, field)
    for other in CONTENTS.values():
        if other != field and len(getattr(tensor.contents, other)):
            raise InvalidRequest(f"{where}: a {tensor.datatype} tensor carries its values in "
                                 f"contents.{field}, not contents.{other}")
    if len(values) != count:
        raise InvalidRequest(f"{where}: contents.{field} has {len(values)} values but shape "
                             f"{list(shape)} needs {count}")
    return np.array(values, dtype=dtypes.STORAGE[wire]).reshape(shape), wire, None


def encode(model: str, req: v2.V2Request, array: np.ndarray, dtype: str,
           regions: SystemRegions | None):
    """The ``ModelInferResponse``: the output as raw bytes, or written to its region."""
    resp = messages.ModelInferResponse(model_name=model, model_version=v2.MODEL_VERSION,
                                       id=req.id or "")
    out = resp.outputs.add(name=v2.OUTPUT_NAME, datatype=dtypes.NAME_TO_V2[dtype],
                           shape=list(array.shape))
    if req.output_cuda is not None:  # the engine wrote it into the CUDA region
        out.parameters[v2.SHM_REGION].string_param = req.output_cuda.region
        out.parameters[v2.SHM_SIZE].int64_param = array.nbytes
        return resp
    if req.output_shm is not None and regions is not None:
        nbytes = v2.write_output(regions, req.output_shm, array)
        out.parameters[v2.SHM_REGION].string_param = req.output_shm.region.name
        out.parameters[v2.SHM_SIZE].int64_param = nbytes
        return resp
    resp.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    return resp


def encode_lab(model: str, req: v2.V2Request, job, result):
    """The response of a request that asked for a gradient or a report: the outputs asked
    for (``output``, ``grad``) as raw contents, the reports as string parameters
    (``report_numerics``, ``report_profile``: JSON text), as over HTTP."""
    resp = messages.ModelInferResponse(model_name=model, model_version=v2.MODEL_VERSION,
                                       id=req.id or "")
    tensors = []
    if "value" in job.outputs:
        tensors.append((v2.OUTPUT_NAME, result.array, result.dtype))
    if result.grad is not None:
        tensors.append((v2.GRAD_OUTPUT, result.grad, result.grad_dtype))
    for name, array, dtype in tensors:
        resp.outputs.add(name=name, datatype=dtypes.NAME_TO_V2[dtype], shape=list(array.shape))
        resp.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    for key, report in result.reports.items():  # every report (service/engine/reports)
        resp.parameters[reports.parameter(key)].string_param = orjson.dumps(report).decode()
    return resp


def check_version(model: str, version: str) -> None:
    if version and version != v2.MODEL_VERSION:
        raise UnknownActivation(f"model {model!r} has no version {echo(version)}; its one "
                                f"version is {v2.MODEL_VERSION!r}")
