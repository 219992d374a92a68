"""Request fields every API shares: the per-request setting names and shape checks.
Torch-free."""

from __future__ import annotations

from service.errors import InvalidRequest, RequestTooLarge, UnsupportedMediaType, echo

SETTING_NAMES = ("compute_dtype", "amp", "amp_dtype", "inplace", "timeout", "priority", "expr",
                 "outputs", "report")
MAX_DIMS = 32


def check_shape(raw: object, where: str, max_elements: int) -> tuple[int, ...]:
    """A shape is a list of non-negative ints; its product may not exceed the batch limit."""
    if not isinstance(raw, (list, tuple)) or len(raw) > MAX_DIMS:
        raise InvalidRequest(f"{where}: shape must be a list of at most {MAX_DIMS} integers")
    dims = []
    total = 1
    span = 1  # the product of the non-zero dimensions
    for d in raw:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise InvalidRequest(f"{where}: shape dimensions must be integers >= 0, got {echo(raw)}")
        dims.append(d)
        total *= d  # python ints: no overflow
        span *= max(d, 1)
    # the non-zero dimensions are bounded together too: (0, 2**21, 2**21, 2**21) has no
    # elements, but numpy cannot describe it ("array is too big")
    if total > max_elements or span > max_elements:
        if total > max_elements:
            what = f"{total} elements"
        elif max(dims) > max_elements:
            what = f"a dimension of {max(dims)}"
        else:
            what = f"non-zero dimensions whose product is {span}"
        raise RequestTooLarge(
            f"{where}: shape {echo(raw)} has {what}, over the server's "
            f"max_batch_elements={max_elements}"
        )
    return tuple(dims)


def parse_shape_text(text: str, where: str, max_elements: int) -> tuple[int, ...]:
    """``"2,3"`` -> (2, 3); ``""`` -> () for a 0-d scalar."""
    text = text.strip()
    if not text:
        return ()
    try:
        raw = [int(p) for p in text.split(",")]
    except ValueError:
        raise InvalidRequest(
            f"{where}: shape {echo(text)} must be comma-separated integers, e.g. 2,3"
        ) from None
    return check_shape(raw, where, max_elements)


# Content types a browser may POST cross-site without a CORS preflight.
SIMPLE_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded",
                          "multipart/form-data"})


def refuse_simple_type(content_type: str | None) -> None:
    """415 for the content types a browser may POST cross-site without a preflight (the
    routes call it, so the refusal is counted like any other of their answers)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media in SIMPLE_TYPES:
        raise UnsupportedMediaType(
            f"Content-Type {echo(media)} is not accepted (browsers send it cross-site "
            "without asking); use application/json or application/octet-stream")
