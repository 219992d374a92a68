"""Bounded JSON decoding: limits checked on the raw bytes before any object is built, and
large documents parsed in slices.

``scan`` walks a body of ``SCAN_BYTES`` or more once, 1 MiB at a time, with C-speed byte
operations (a smaller one is bounded by its size, and the parser's own nesting limit of
1,024 levels holds; ``service.errors.echo`` never recurses): it counts the
values (a JSON document holds at most one value more than it has commas) and measures the
nesting depth outside strings. A body with more values than the element limit allows, or
nested deeper than ``MAX_DEPTH``, is refused before the parser allocates anything, so a small
gzip body that inflates to 59 MiB of ``0,`` costs a few milliseconds, not seconds of
parsing and a gigabyte of Python objects.

``loads_sliced`` parses a large document in pieces. The largest arrays outside strings (the
tensor data) are cut at their top-level commas into slices of about ``SLICE_TEXT`` bytes;
each slice is parsed on its own and turned into numpy at once; the rest of the document, now
small, is parsed whole. Each step holds the GIL for a few milliseconds, so when this runs in
a worker thread (``service.http.decode_off_loop``) the event loop keeps answering between
slices. Any surprise (a slice that is not valid JSON on its own) falls back to one whole
parse, which gives the same answer or the same error.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets

import numpy as np
import orjson

from service.codecs.fields import MAX_DIMS
from service.errors import InvalidRequest, RequestTooLarge

MAX_DEPTH = MAX_DIMS + 8  # a document: the object, the v2 inputs list and tensor, 32 dims
VALUE_SLACK = 1024  # values a request holds besides its tensor (fields, shape, params, id)
CHUNK = 1 << 20  # bytes per scanning step
SCAN_BYTES = 8 * 1024  # smaller documents skip the scan: their size bounds them
SLICE_BYTES = 256 * 1024  # documents at least this large are parsed in slices
SLICE_TEXT = 128 * 1024  # bytes of JSON text per parsed slice
MIN_CARVE = 4096  # arrays with fewer top-level items are parsed with the rest
MAX_CARVES = 4  # large arrays taken out of one document
MAX_QUOTES = 4096  # a document with more strings than this is parsed whole

_KEEP = b'[]{}"'
_DELETE = bytes(i for i in range(256) if i not in _KEEP)
_STRING = re.compile(rb'"[^"]*"')
_TOKEN = secrets.token_hex(8)


def _chunks(body) -> list[tuple[int, int]]:
    """1 MiB spans of ``body``, never cut inside a run of backslashes (an escape)."""
    spans = []
    start, n = 0, len(body)
    while start < n:
        end = min(start + CHUNK, n)
        while end < n and body[end - 1] == 0x5C:
            end += 1
        spans.append((start, end))
        start = end
    return spans


def scan(body, max_values: int | None) -> None:
    """Refuse, before parsing, a body with more values than ``max_values`` (plus the
    request's other fields) allows (413) or nested deeper than ``MAX_DEPTH`` (400)."""
    if len(body) < SCAN_BYTES:
        return  # bounded by its size; the parser's own 1,024-level limit holds
    view = memoryview(body)
    commas = 0
    structure = []
    bound = None if max_values is None else max_values + VALUE_SLACK
    for start, end in _chunks(body):
        piece = body if end - start == len(body) else bytes(view[start:end])
        commas += piece.count(b",")
        if bound is not None and commas >= bound:
            raise RequestTooLarge(
                f"the body holds more than {bound} JSON values, over the server's "
                f"max_batch_elements={max_values}")
        if b"\\" in piece:  # escaped backslashes and quotes are not structure
            piece = piece.replace(b"\\\\", b"").replace(b'\\"', b"")
        structure.append(piece.translate(None, _DELETE))
    brackets = b"".join(structure)
    if b'"' in brackets:
        brackets = _STRING.sub(b"", brackets)  # brackets inside strings are text
    if len(brackets) <= MAX_DEPTH:
        return
    deepest = running = 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    for i in range(0, codes.size, CHUNK):
        c = codes[i:i + CHUNK]
        # [ 0x5B and { 0x7B open; ] 0x5D and } 0x7D close (bit 2 set); a stray quote left by
        # an unterminated string counts as an opening, which only errs towards refusing
        step = np.where((c & 4) == 4, np.int32(-1), np.int32(1)).astype(np.int32)
        depth = np.cumsum(step, dtype=np.int32) + running
        deepest = max(deepest, int(depth.max()))
        running = int(depth[-1])
        if deepest > MAX_DEPTH:
            raise InvalidRequest(f"body is not valid JSON here: it is nested deeper than "
                                 f"{MAX_DEPTH} levels")


class Slices:
    """A large JSON array parsed slice by slice: a list of numpy arrays (or of plain lists,
    for a slice numpy cannot hold). ``service.codecs.jsonio.array_from_json`` joins them."""

    __slots__ = ("count", "parts")

    def __init__(self, parts: list, count: int) -> None:
        self.parts = parts
        self.count = count

    def __repr__(self) -> str:
        return f"<array of {self.count} values>"


def _loads(text):
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)  # the NaN / Infinity tokens


def _quotes(body, view) -> list[int] | None:
    total = 0
    for start, end in _chunks(body):
        total += bytes(view[start:end]).count(b'"')
        if total > MAX_QUOTES:
            return None
    out = []
    pos = body.find(b'"')
    while pos >= 0:
        out.append(pos)
        pos = body.find(b'"', pos + 1)
    return out


def _largest_array(body, lo: int, hi: int) -> tuple[int, int, np.ndarray] | None:
    """The first array in ``body[lo:hi]`` (a stretch without quotes), as (start, end, the
    offsets of its top-level commas), or None when it is not closed there."""
    start = body.find(b"[", lo, hi)
    if start < 0:
        return None
    codes = np.frombuffer(body, dtype=np.uint8)
    running = 0
    commas = []
    for i in range(start, hi, CHUNK):
        c = codes[i:min(i + CHUNK, hi)]
        step = (((c == 0x5B) | (c == 0x7B)).astype(np.int32)
                - ((c == 0x5D) | (c == 0x7D)).astype(np.int32))
        depth = np.cumsum(step, dtype=np.int32) + running
        closed = np.flatnonzero(depth == 0)
        stop = int(closed[0]) + 1 if closed.size else c.size
        commas.append(np.flatnonzero((c[:stop] == 0x2C) & (depth[:stop] == 1)) + i)
        if closed.size:
            return start, i + int(closed[0]), np.concatenate(commas)
        running = int(depth[-1])
    return None


def _parse_array(body, start: int, end: int, commas: np.ndarray) -> Slices:
    # cut at the top-level commas nearest every SLICE_TEXT bytes (rows of a nested array
    # stay whole): each slice is a few milliseconds of parsing
    targets = np.arange(start + SLICE_TEXT, end, SLICE_TEXT)
    cuts = np.unique(commas[np.minimum(np.searchsorted(commas, targets), commas.size - 1)])
    bounds = [start, *cuts.tolist(), end]
    parts = []
    for a, b in itertools.pairwise(bounds):
        items = _loads(b"[" + bytes(body[a + 1:b]) + b"]")
        try:
            array = np.array(items)
            parts.append(items if array.dtype.kind == "O" else array)
        except (ValueError, TypeError, OverflowError):
            parts.append(items)  # ragged or mixed: array_from_json says what is wrong
    return Slices(parts, commas.size + 1)


def _replace(obj, marks: dict[str, Slices]):
    """Put the parsed slices back where their marks stand (iteratively: no recursion)."""
    if isinstance(obj, str):
        return marks.get(obj, obj)
    stack = [obj]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in list(items):
            if isinstance(value, str) and value in marks:
                node[key] = marks[value]
            elif isinstance(value, (dict, list)):
                stack.append(value)
    return obj


def loads_sliced(body):
    """Parse a large JSON document in slices (see the module docstring)."""
    text = bytes(body)
    marks: dict[str, Slices] = {}
    for n in range(MAX_CARVES):
        if len(text) < SLICE_BYTES:
            break
        quotes = _quotes(text, memoryview(text))
        if quotes is None:
            break
        edges = [-1, *quotes, len(text)]
        gaps = sorted(itertools.pairwise(edges), key=lambda g: g[1] - g[0], reverse=True)
        lo, hi = gaps[0]
        found = _largest_array(text, lo + 1, hi)
        if found is None or found[2].size + 1 < MIN_CARVE:
            break
        start, end, commas = found
        try:
            slices = _parse_array(text, start, end, commas)
        except ValueError:  # not valid on its own: parse the whole document instead
            return _loads(body)
        mark = f"\x00{_TOKEN}-{n}"
        marks[mark] = slices
        text = text[:start] + orjson.dumps(mark) + text[end + 1:]
    return _replace(_loads(text), marks)
