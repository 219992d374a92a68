"""Request fields every API shares: the per-request setting names and shape checks.
Torch-free."""

from __future__ import annotations

from service.errors import InvalidRequest, RequestTooLarge, echo

SETTING_NAMES = ("compute_dtype", "amp", "amp_dtype", "inplace", "timeout", "priority")
MAX_DIMS = 32


def check_shape(raw: object, where: str, max_elements: int) -> tuple[int, ...]:
    """A shape is a list of non-negative ints; its product may not exceed the batch limit."""
    if not isinstance(raw, (list, tuple)) or len(raw) > MAX_DIMS:
        raise InvalidRequest(f"{where}: shape must be a list of at most {MAX_DIMS} integers")
    dims = []
    total = 1
    for d in raw:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise InvalidRequest(f"{where}: shape dimensions must be integers >= 0, got {echo(raw)}")
        dims.append(d)
        total *= d  # python ints: no overflow
    # every dimension is bounded too: (0, 2**64) has no elements but no array can hold it
    if total > max_elements or any(d > max_elements for d in dims):
        what = f"{total} elements" if total > max_elements else f"a dimension of {max(dims)}"
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


