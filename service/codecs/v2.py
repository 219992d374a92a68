"""KServe v2 / Open Inference Protocol wire format, with the binary tensor data extension.

Torch-free. A request body is a JSON object, optionally followed by raw little-endian
tensor bytes::

    | JSON header (Inference-Header-Content-Length bytes) | input 0 bytes | input 1 bytes | ...

Every input that carries ``parameters.binary_data_size`` takes exactly that many bytes from
the binary section, in the order of ``inputs``, with no padding; the section must be used
up exactly. Without the header the whole body is JSON. Each activation is a model with one
input (``input``) and one output (``output``) of any shape.

Decoding validates everything before anything is queued; every problem is an
``InvalidRequest`` (400) whose message names the field or input at fault. ``decode`` and
``encode`` are the format; ``V2Codec`` is its codec (``service.codecs.base``).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from service import dtypes
from service.codecs.base import Encoded, Wire
from service.codecs.fields import SETTING_NAMES, check_shape, refuse_simple_type
from service.codecs.jsonio import array_from_json, dumps, loads_object
from service.engine import reports
from service.engine.device_refs import placeholder
from service.errors import InvalidRequest, UnknownActivation, echo

if TYPE_CHECKING:
    from service.codecs.cuda_regions import CudaRegions
    from service.codecs.shm_regions import Region, SystemRegions
    from service.engine.activations import Activation
    from service.engine.device_refs import DeviceRef
    from service.engine.job import Job, JobResult
    from service.engine.jobs import JobFactory

INPUT_NAME = "input"
OUTPUT_NAME = "output"
GRAD_INPUT = "grad_output"  # the upstream gradient of a vector-Jacobian product (docs/lab.md)
GRAD_OUTPUT = "grad"
OUTPUT_KINDS = {OUTPUT_NAME: "value", GRAD_OUTPUT: "grad"}
MODEL_VERSION = "1"
PLATFORM = "actserve_torch"
HEADER = "inference-header-content-length"
DATATYPES = tuple(dtypes.V2_TO_NAME)  # FP16, BF16, FP32, FP64
JSON_DATATYPES = ("FP32", "FP64")  # 16-bit floats only travel as binary, as Triton does
UNSUPPORTED = ("sequence_id", "sequence_start", "sequence_end")
BINARY_OUTPUT = "binary_data_output"
MAX_ID = 256  # characters of a request 'id' (echoed whole in the response)


SHM_REGION, SHM_SIZE, SHM_OFFSET = (
    "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
SHM_KEYS = (SHM_REGION, SHM_SIZE, SHM_OFFSET)


@dataclass(slots=True)
class ShmOutput:
    """Where the output goes when the request names a shared-memory region for it."""

    region: Region
    offset: int
    byte_size: int


@dataclass(slots=True)
class V2Request:
    """A decoded inference request: the one input and what the response should look like."""

    id: str | None
    array: np.ndarray  # wire storage, C-contiguous, writable, aligned
    wire: str  # our dtype name
    settings: dict[str, Any]
    params: dict[str, Any]
    binary_output: bool
    output_shm: ShmOutput | None = None
    # the lab: the outputs asked for by name ("value", "grad"; None: not named), whether
    # the gradient goes back as binary, and the upstream gradient
    outputs: tuple[str, ...] | None = None
    grad_binary: bool = False
    grad_output: np.ndarray | None = None
    # CUDA shared memory (cuda_regions.py): the input and/or the output in a CUDA region
    input_cuda: DeviceRef | None = None
    output_cuda: DeviceRef | None = None


# -- framing -------------------------------------------------------------------------------
def header_length(raw: str | None, body_size: int) -> int | None:
    """The ``Inference-Header-Content-Length`` value, checked against the body."""
    if raw is None:
        return None
    text = raw.strip()
    if not text.isdigit() or not text.isascii():
        sign = "negative" if text.startswith("-") and text[1:].isdigit() else "not a number"
        raise InvalidRequest(
            f"Inference-Header-Content-Length {echo(raw)} is {sign}; it must be the byte "
            "length of the JSON header (an integer >= 0)"
        )
    length = int(text)
    if length > body_size:
        raise InvalidRequest(
            f"Inference-Header-Content-Length {length} is beyond the body of {body_size} bytes"
        )
    return length


def _binary_size(tensor: dict, where: str) -> int | None:
    params = tensor.get("parameters")
    if params is None:
        return None
    if not isinstance(params, dict):
        raise InvalidRequest(f"{where}: parameters must be an object")
    size = params.get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidRequest(f"{where}: binary_data_size must be an integer >= 0, got {echo(size)}")
    return size


def _frame(inputs: list, body: bytearray, start: int, header_given: bool) -> list[int | None]:
    """Byte offset of each binary input's data (None for JSON inputs); checks that the binary
    section holds exactly the bytes the inputs declare."""
    offsets: list[int | None] = []
    pos = start
    last = None
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise InvalidRequest(f"inputs[{i}] must be an object")
        where = _input_where(tensor, i)
        size = _binary_size(tensor, where)
        if size is None:
            offsets.append(None)
            continue
        if "data" in tensor:
            raise InvalidRequest(f"{where}: set either 'data' or parameters.binary_data_size, not both")
        if size and not header_given:
            raise InvalidRequest(
                f"{where} has binary_data_size={size} but the request has no "
                "Inference-Header-Content-Length header saying where the JSON ends"
            )
        remaining = len(body) - pos
        if size > remaining:
            raise InvalidRequest(
                f"{where}: binary_data_size is {size} bytes but only {remaining} bytes of "
                "binary data are left in the body"
            )
        offsets.append(pos)
        pos += size
        last = where
    extra = len(body) - pos
    if extra:
        after = f"after the binary data of {last}" if last else "after the JSON header, but no " \
            "input has parameters.binary_data_size"
        raise InvalidRequest(f"the body has {extra} unexpected bytes {after}")
    return offsets


def _input_where(tensor: dict, i: int) -> str:
    name = tensor.get("name")
    return f"input {echo(name)}" if isinstance(name, str) else f"inputs[{i}]"


# -- requests ------------------------------------------------------------------------------
def decode(body: bytearray, header: str | None, max_elements: int,
           regions: SystemRegions | None = None, cuda: CudaRegions | None = None) -> V2Request:
    """A whole (already inflated) request body -> ``V2Request``. ``regions`` / ``cuda``: the
    registered system / CUDA shared-memory regions inputs and outputs may name."""
    length = header_length(header, len(body))
    obj = loads_object(bytes(memoryview(body)[:length]) if length is not None else body,
                       max_elements)
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest("'inputs' must be a non-empty list of tensors")
    offsets = _frame(inputs, body, length if length is not None else len(body),
                     length is not None)
    order = input_order([t.get("name") for t in inputs])
    request_id = obj.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > MAX_ID):
        raise InvalidRequest(f"'id' must be a string of at most {MAX_ID} characters (it is "
                             f"echoed in the response), got {echo(request_id)}")
    settings, params, binary_default = parameters(obj.get("parameters"))
    wanted = requested_outputs(obj.get("outputs"), binary_default)
    first = order[0]
    array, wire, in_cuda = _tensor(inputs[first], body, offsets[first], max_elements, regions,
                                   cuda=cuda)
    out_shm, out_cuda = region_output(wanted.shm, regions, cuda)
    req = V2Request(request_id, array, wire, settings, params, wanted.binary.get("value", False),
                    out_shm, wanted.names, wanted.binary.get("grad", binary_default),
                    input_cuda=in_cuda, output_cuda=out_cuda)
    if len(order) == 2:
        i = order[1]
        req.grad_output, grad_wire, _ = _tensor(inputs[i], body, offsets[i], max_elements,
                                                regions, GRAD_INPUT)
        if grad_wire != wire or req.grad_output.shape != array.shape:
            raise InvalidRequest(f"input {GRAD_INPUT!r} must have the datatype and shape of "
                                 f"input {INPUT_NAME!r}")
    return req


def input_order(names: list) -> list[int]:
    """Indexes of ``input`` and, when sent, ``grad_output`` among the request's inputs."""
    if len(names) > 2:
        raise InvalidRequest(f"the model's inputs are {INPUT_NAME!r} and, for a gradient, "
                             f"{GRAD_INPUT!r}; the request has {len(names)}")
    if len(names) == 2:
        if sorted(map(str, names)) != sorted([INPUT_NAME, GRAD_INPUT]):
            raise InvalidRequest(f"two inputs must be {INPUT_NAME!r} and {GRAD_INPUT!r}, got "
                                 f"{echo(names)}")
        return [names.index(INPUT_NAME), names.index(GRAD_INPUT)]
    return [0]


def parameters(raw: object) -> tuple[dict, dict, bool]:
    """Request parameters -> (per-request settings, activation params, binary output)."""
    if raw is None:
        return {}, {}, False
    if not isinstance(raw, dict):
        raise InvalidRequest("'parameters' must be an object")
    settings: dict[str, Any] = {}
    params: dict[str, Any] = {}
    binary = False
    for key, value in raw.items():
        if key == BINARY_OUTPUT:
            if not isinstance(value, bool):
                raise InvalidRequest(f"parameters.{BINARY_OUTPUT} must be true or false")
            binary = value
        elif key in UNSUPPORTED:
            if value not in (0, "", False):
                raise InvalidRequest(f"parameters.{key}: sequences are not supported; every "
                                     "request is independent")
        elif key in SETTING_NAMES:  # the rest are activation params
            settings[key] = value
        else:
            params[key] = value
    return settings, params, binary


@dataclass(slots=True)
class Wanted:
    """The requested outputs: their kinds in canonical order (None: the request named
    none), each one's binary choice, and the value's shared-memory parameters."""

    names: tuple[str, ...] | None
    binary: dict[str, bool]
    shm: dict


def requested_outputs(raw: object, binary_default: bool) -> Wanted:
    """The ``outputs`` of a request: ``output`` (the value) and/or ``grad`` (docs/lab.md)."""
    everything = {"value": binary_default, "grad": binary_default}
    if raw is None:
        return Wanted(None, everything, {})
    if not isinstance(raw, list):
        raise InvalidRequest("'outputs' must be a list of requested outputs")
    if not raw:
        return Wanted(None, everything, {})
    binary: dict[str, bool] = {}
    shm: dict = {}
    for i, out in enumerate(raw):
        name = out.get("name") if isinstance(out, dict) else out
        if not isinstance(out, dict) or not isinstance(name, str) or name not in OUTPUT_KINDS:
            raise InvalidRequest(f"unknown output {echo(name)}; the model's output is named "
                                 f"{OUTPUT_NAME!r} (and {GRAD_OUTPUT!r}, its gradient)")
        kind = OUTPUT_KINDS[name]
        if kind in binary:
            raise InvalidRequest(f"output {name!r} is requested twice")
        params = out.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidRequest(f"outputs[{i}].parameters must be an object")
        allowed = ("binary_data", *SHM_KEYS) if kind == "value" else ("binary_data",)
        for key in params:
            if key not in allowed:
                raise InvalidRequest(f"outputs[{i}].parameters.{key} is not supported; only "
                                     f"{', '.join(allowed)}")
        if kind == "value":
            shm = {k: params[k] for k in SHM_KEYS if k in params}
        value = params.get("binary_data", binary_default)
        if not isinstance(value, bool):
            raise InvalidRequest(f"outputs[{i}].parameters.binary_data must be true or false")
        binary[kind] = value
    return Wanted(tuple(k for k in ("value", "grad") if k in binary), binary, shm)


# -- shared memory -------------------------------------------------------------------------
def _input_bytes(params: dict, wire: str, shape: tuple[int, ...], where: str) -> int:
    need = math.prod(shape) * dtypes.itemsize(wire)
    size = params.get(SHM_SIZE)
    if size != need or isinstance(size, bool):
        raise InvalidRequest(
            f"{where}: {SHM_SIZE} is {echo(size)} but shape {list(shape)} of "
            f"{dtypes.NAME_TO_V2[wire]} needs {need} bytes"
        )
    return need


def region_input(params: dict, wire: str, shape: tuple[int, ...],
                 regions: SystemRegions | None, cuda: CudaRegions | None,
                 where: str) -> tuple[np.ndarray, DeviceRef | None]:
    """The input named by ``shared_memory_region``: a CUDA region (a placeholder array of
    its shape and the window's ref; the bytes stay on the device) or a system one (copied)."""
    name = params.get(SHM_REGION)
    if cuda is not None and name in cuda:
        need = _input_bytes(params, wire, shape, where)
        ref = cuda.ref(name, params.get(SHM_OFFSET, 0), need, where)
        return placeholder(dtypes.STORAGE[wire], shape), ref
    return shm_input(params, wire, shape, regions, where), None


def shm_input(params: dict, wire: str, shape: tuple[int, ...],
              regions: SystemRegions | None, where: str) -> np.ndarray:
    """The input tensor copied out of the shared-memory region its parameters name."""
    if regions is None:
        raise InvalidRequest(f"{where}: shared memory is not available here")
    count = math.prod(shape)
    need = _input_bytes(params, wire, shape, where)
    offset = params.get(SHM_OFFSET, 0)
    region = regions.check(params.get(SHM_REGION), offset, need, where)
    array = np.empty(count, dtype=dtypes.STORAGE[wire])
    regions.read_into(region, offset, memoryview(array.view(np.uint8)), where)
    return array.reshape(shape)


def region_output(params: dict, regions: SystemRegions | None,
                  cuda: CudaRegions | None) -> tuple[ShmOutput | None, DeviceRef | None]:
    """The output's destination: a system region, a CUDA region, or neither."""
    name = params.get(SHM_REGION)
    if cuda is None or name not in cuda:
        return shm_output(params, regions), None
    where = f"output {OUTPUT_NAME!r}"
    return None, cuda.ref(name, params.get(SHM_OFFSET, 0), _output_size(params, where), where)


def shm_output(params: dict, regions: SystemRegions | None) -> ShmOutput | None:
    """The output's shared-memory destination, checked against the region, or None."""
    if not params:
        return None
    where = f"output {OUTPUT_NAME!r}"
    if SHM_REGION not in params:
        raise InvalidRequest(f"{where}: {SHM_SIZE}/{SHM_OFFSET} need {SHM_REGION}")
    if regions is None:
        raise InvalidRequest(f"{where}: shared memory is not available here")
    size = _output_size(params, where)
    offset = params.get(SHM_OFFSET, 0)
    region = regions.check(params[SHM_REGION], offset, size, where)
    return ShmOutput(region, offset, size)


def _output_size(params: dict, where: str) -> int:
    size = params.get(SHM_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidRequest(f"{where}: {SHM_SIZE} must be an integer >= 0, got {echo(size)}")
    return size


def check_output_fits(byte_size: int, nbytes: int) -> None:
    """The output's ``nbytes`` fit in the ``byte_size`` its shared-memory window has."""
    if nbytes > byte_size:
        raise InvalidRequest(
            f"output {OUTPUT_NAME!r} needs {nbytes} bytes but its {SHM_SIZE} is {byte_size}"
        )


def write_output(regions: SystemRegions, out: ShmOutput, array: np.ndarray) -> int:
    """Copy the output into its region; the bytes written."""
    flat = np.ascontiguousarray(array).reshape(-1)
    check_output_fits(out.byte_size, flat.nbytes)
    regions.write(out.region, out.offset, memoryview(flat.view(np.uint8)),
                  f"output {OUTPUT_NAME!r}")
    return flat.nbytes


def extensions(shared_memory: bool, cuda: bool = False) -> list[str]:
    """The v2 extensions the server has (the same over HTTP and gRPC)."""
    names = ["binary_tensor_data", "parameters", "statistics"]
    if shared_memory:
        names.append("system_shared_memory")
        if cuda:
            names.append("cuda_shared_memory")
    return names


def tensor_meta(name: object, datatype: object, shape: object,
                max_elements: int, expected: str = INPUT_NAME) -> tuple[str, tuple[int, ...], str]:
    """The input's name, datatype and shape checked: (our wire dtype, shape, where)."""
    if name != expected:
        raise InvalidRequest(
            f"unknown input {echo(name)}; the model's one input is named {INPUT_NAME!r}"
        )
    where = f"input {expected!r}"
    if not isinstance(datatype, str) or datatype not in dtypes.V2_TO_NAME:
        raise InvalidRequest(
            f"{where}: datatype {echo(datatype)} is not supported; use one of "
            f"{', '.join(DATATYPES)}"
        )
    return dtypes.V2_TO_NAME[datatype], check_shape(shape, f"{where} shape", max_elements), where


def array_from_bytes(buf, wire: str, shape: tuple[int, ...], size: int, where: str,
                     offset: int = 0, what: str = "binary_data_size") -> np.ndarray:
    """``size`` raw little-endian bytes at ``offset`` of ``buf`` -> a writable, aligned array."""
    count = math.prod(shape)  # checked python ints: exact, and far cheaper than np.prod
    need = count * dtypes.itemsize(wire)
    if size != need:
        raise InvalidRequest(
            f"{where}: {what} is {size} bytes but shape {list(shape)} of "
            f"{dtypes.NAME_TO_V2[wire]} needs {need}"
        )
    array = np.frombuffer(buf, dtype=dtypes.STORAGE[wire], count=count, offset=offset)
    if not array.flags.aligned or not array.flags.writeable:
        array = array.copy()
    return array.reshape(shape)


def _tensor(tensor: dict, body: bytearray, offset: int | None, max_elements: int,
            regions: SystemRegions | None = None, expected: str = INPUT_NAME,
            cuda: CudaRegions | None = None) -> tuple[np.ndarray, str, DeviceRef | None]:
    datatype = tensor.get("datatype")
    if "shape" not in tensor and tensor.get("name") == expected and datatype in DATATYPES:
        raise InvalidRequest(f"input {expected!r}: missing 'shape'")
    wire, shape, where = tensor_meta(tensor.get("name"), datatype, tensor.get("shape"),
                                     max_elements, expected)
    params = tensor.get("parameters")
    if isinstance(params, dict) and SHM_REGION in params:
        if offset is not None or "data" in tensor:
            raise InvalidRequest(f"{where}: set one of 'data', parameters.binary_data_size or "
                                 f"parameters.{SHM_REGION}")
        array, ref = region_input(params, wire, shape, regions, cuda, where)
        return array, wire, ref
    if offset is None:
        if "data" not in tensor:
            raise InvalidRequest(
                f"{where}: set 'data' (JSON) or parameters.binary_data_size (binary)"
            )
        if datatype not in JSON_DATATYPES:
            raise InvalidRequest(
                f"{where}: {datatype} data cannot travel as JSON; send it as binary "
                "(parameters.binary_data_size and the Inference-Header-Content-Length header)"
            )
        return (array_from_json(tensor["data"], shape, wire, f"{where} data", max_elements),
                wire, None)
    size = tensor["parameters"]["binary_data_size"]
    return array_from_bytes(body, wire, shape, size, where, offset), wire, None


def json_output_problem(dtype: str) -> str | None:
    """Why an output of ``dtype`` cannot be sent as JSON, or None."""
    v2 = dtypes.NAME_TO_V2[dtype]
    if v2 in JSON_DATATYPES:
        return None
    return (f"a {v2} output cannot travel as JSON; ask for binary output "
            f"(outputs[].parameters.binary_data=true or parameters.{BINARY_OUTPUT}=true)")


# -- responses -----------------------------------------------------------------------------
ZERO_COPY_BYTES = 64 * 1024


def encode_lab(model: str, request: V2Request, job: Job,
               result: JobResult) -> tuple[bytes | list, dict[str, str]]:
    """A response with the outputs a lab request asked for (value and/or grad, each binary
    or JSON) and its reports as response parameters (JSON text; docs/lab.md)."""
    payload: dict[str, Any] = {"model_name": model, "model_version": MODEL_VERSION}
    if request.id is not None:
        payload["id"] = request.id
    tensors = []
    if "value" in job.outputs:
        tensors.append((OUTPUT_NAME, result.array, result.dtype, request.binary_output))
    if result.grad is not None:
        tensors.append((GRAD_OUTPUT, result.grad, result.grad_dtype, request.grad_binary))
    outs, binary = [], []
    for name, array, dtype, as_binary in tensors:
        out: dict[str, Any] = {"name": name, "datatype": dtypes.NAME_TO_V2[dtype],
                               "shape": list(array.shape)}
        if as_binary:
            flat = np.ascontiguousarray(array).reshape(-1)
            out["parameters"] = {"binary_data_size": flat.nbytes}
            binary.append(flat.tobytes())
        else:
            problem = json_output_problem(dtype)
            if problem:
                raise InvalidRequest(f"output {name!r}: {problem}")
            out["data"] = dtypes.to_float(array, dtype).reshape(-1)
        outs.append(out)
    payload["outputs"] = outs
    if result.reports:  # every report as JSON text (service/engine/reports)
        payload["parameters"] = {reports.parameter(k): orjson.dumps(v).decode()
                                 for k, v in result.reports.items()}
    head = dumps(payload)
    if not binary:
        return head, {"Content-Type": "application/json"}
    return [head, *binary], {"Content-Type": "application/octet-stream",
                             "Inference-Header-Content-Length": str(len(head))}


def encode(model: str, request: V2Request, array: np.ndarray, dtype: str,
           regions: SystemRegions | None = None) -> tuple[bytes | list, dict[str, str]]:
    """The response body and its headers (Content-Type, Inference-Header-Content-Length).
    A binary answer of ``ZERO_COPY_BYTES`` or more is ``[header, zero-copy view of the
    tensor]``, to be sent in pieces; anything else is one ``bytes``. An output with a
    shared-memory destination is written there and the response names it."""
    out: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": dtypes.NAME_TO_V2[dtype],
                           "shape": list(array.shape)}
    payload: dict[str, Any] = {"model_name": model, "model_version": MODEL_VERSION}
    if request.id is not None:
        payload["id"] = request.id
    payload["outputs"] = [out]
    if request.output_cuda is not None:  # the engine wrote it into the CUDA region
        out["parameters"] = {SHM_REGION: request.output_cuda.region, SHM_SIZE: array.nbytes}
        return orjson.dumps(payload), {"Content-Type": "application/json"}
    if request.output_shm is not None and regions is not None:
        nbytes = write_output(regions, request.output_shm, array)
        out["parameters"] = {SHM_REGION: request.output_shm.region.name, SHM_SIZE: nbytes}
        return orjson.dumps(payload), {"Content-Type": "application/json"}
    if request.binary_output:
        flat = np.ascontiguousarray(array).reshape(-1)
        out["parameters"] = {"binary_data_size": flat.nbytes}
        head = orjson.dumps(payload)  # strings and ints only: no numeric payload to check
        headers = {"Content-Type": "application/octet-stream",
                   "Inference-Header-Content-Length": str(len(head))}
        if flat.nbytes >= ZERO_COPY_BYTES:
            return [head, memoryview(flat.view(np.uint8))], headers
        return head + flat.tobytes(), headers
    problem = json_output_problem(dtype)
    if problem:
        raise InvalidRequest(problem)
    out["data"] = dtypes.to_float(array, dtype).reshape(-1)
    return dumps(payload), {"Content-Type": "application/json"}


def accepted_encoding(accept: str | None) -> str | None:
    """``gzip`` or ``deflate`` when ``Accept-Encoding`` asks for one (gzip preferred)."""
    if not accept:
        return None
    offered = {}
    for part in accept.split(","):
        token, _, rest = part.strip().partition(";")
        q = 1.0
        rest = rest.strip()
        if rest.startswith("q="):
            try:
                q = float(rest[2:])
            except ValueError:
                q = 0.0
        offered[token.strip().lower()] = q
    for name in ("gzip", "deflate"):
        if offered.get(name, 0.0) > 0:
            return name
    return None


def compress(data: bytes, encoding: str) -> bytes:
    """gzip, or zlib-wrapped deflate (what ``Content-Encoding: deflate`` means); level 1."""
    wbits = zlib.MAX_WBITS | 16 if encoding == "gzip" else zlib.MAX_WBITS
    c = zlib.compressobj(1, zlib.DEFLATED, wbits)
    return c.compress(data) + c.flush()


# -- the codec -------------------------------------------------------------------------------
# the decoded request, the response's compression, the shared-memory regions
V2Answer = tuple[V2Request, "str | None", "SystemRegions | None"]


def build_job(activation: Activation, req: V2Request, jobs: JobFactory, api: str) -> Job:
    """The validated job of a decoded v2 request (HTTP or gRPC)."""
    settings = req.settings
    if req.outputs is not None and req.outputs != ("value",):
        settings = {**settings, "outputs": list(req.outputs)}
    job = jobs.build(activation, req.array, req.wire, settings, req.params,
                     api=api, timeout_unit_s=1e-6, where="parameters",
                     grad_output=req.grad_output)
    if job.report:
        reports.check_wire(job.report, "grpc" if api == "grpc" else "v2", "parameters")
    if job.lab and req.output_shm is not None:
        raise InvalidRequest("a shared-memory output carries the value alone; ask for "
                             "gradients and reports with outputs over HTTP")
    if req.input_cuda is not None or req.output_cuda is not None:
        if job.lab:
            raise InvalidRequest("CUDA shared memory carries the value alone; ask for "
                                 "gradients and reports with tensors in the request")
        job.device_in, job.device_out = req.input_cuda, req.output_cuda
    if not job.mode.amp:
        # The output dtype is known before compute: refuse now, not after.
        room = req.output_cuda.nbytes if req.output_cuda is not None else \
            req.output_shm.byte_size if req.output_shm is not None else None
        if room is not None:
            check_output_fits(room, job.numel * dtypes.itemsize(job.compute_dtype))
        elif not req.binary_output and "value" in job.outputs:
            problem = json_output_problem(job.compute_dtype)
            if problem:
                raise InvalidRequest(problem)
    return job


class V2Codec:
    api = "v2"

    def decode(self, body: bytearray, wire: Wire, activation: Activation,
               jobs: JobFactory) -> tuple[Job, V2Answer]:
        refuse_simple_type(wire.content_type)  # a missing one is fine (tritonclient sends none)
        if wire.version is not None and wire.version != MODEL_VERSION:
            raise UnknownActivation(
                f"model {activation.name!r} has no version {echo(wire.version)}; its one "
                f"version is {MODEL_VERSION!r}"
            )
        req = decode(body, wire.header_length, jobs.settings.max_batch_elements, wire.regions,
                     wire.cuda_regions)
        job = build_job(activation, req, jobs, self.api)
        return job, (req, accepted_encoding(wire.accept_encoding), wire.regions)

    def encode(self, job: Job, answer: V2Answer, result: JobResult) -> Encoded:
        req, compression, regions = answer
        model = job.activation.name.split(":", 1)[0]  # inline "expr:<form>" is model expr
        if job.lab:
            body, headers = encode_lab(model, req, job, result)
        else:
            body, headers = encode(model, req, result.array, result.dtype, regions)
        media = headers.pop("Content-Type")
        if compression is not None:
            if isinstance(body, list):
                body = b"".join(body)
            body = compress(body, compression)
            headers["Content-Encoding"] = compression
        return Encoded(body, media, headers)

    def tensor_at(self, wire: Wire) -> int | None:
        """The binary extension's tensors follow the JSON header; a header length that is
        not a plain number is left to ``decode`` to refuse."""
        text = (wire.header_length or "").strip()
        return int(text) if text.isdigit() and text.isascii() and len(text) < 12 else None


CODEC = V2Codec()
